"""Parallel jobs of one stock client through one token: the workflow the
-J tests of every tier drive (own endpoint, node, cluster, onion)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator

from tests.harness.annex import Client

JOBS = 64
FILES = 100
SIZE = 4096
REFUSALS = ("Unable to authenticate", "Lost connection", "Problem communicating", "failed")


def parallel_files(client: Client, n: int = FILES) -> dict[str, bytes]:
    files = {f"p{i:03d}.bin": os.urandom(SIZE) for i in range(n)}
    client.add_files(files, "parallel files")
    return files


def assert_every_file_ok(result_output: str, what: str) -> None:
    for word in REFUSALS:
        assert word not in result_output, f"{what}: {word!r} in:\n{result_output[-5000:]}"


def run_parallel_workflow(
    client: Client,
    remote: str,
    files: dict[str, bytes],
    holds: Callable[[str], bool],
    timeout: float = 900.0,
    jobs: int = JOBS,
    sync: bool = True,
    force_local_drop: bool = False,
) -> None:
    """copy --to, get --from, drop --from and sync --content, each with -J.

    Every command must succeed for every file; ``holds(key)`` says whether
    the far side has a key.
    """
    j = f"-J{jobs}"
    keys = {name: client.key(name) for name in files}
    out = client.annex("copy", "--to", remote, j, ".", timeout=timeout).output
    assert_every_file_ok(out, "copy --to")
    assert all(holds(k) for k in keys.values())

    # Local copies away (each one LOCKCONTENTs the remote's copy), then back.
    # (A cluster answers LOCKCONTENT with FAILURE, as git-annex's gateway:
    # a local drop cannot count on it, so it is forced there.)
    force = ["--force"] if force_local_drop else []
    out = client.annex("drop", *force, j, ".", timeout=timeout).output
    assert_every_file_ok(out, "drop")
    assert client.present_here() == set()
    out = client.annex("get", "--from", remote, j, ".", timeout=timeout).output
    assert_every_file_ok(out, "get --from")
    for name, content in files.items():
        assert client.read(name) == content, name

    out = client.annex("drop", "--from", remote, j, ".", timeout=timeout).output
    assert_every_file_ok(out, "drop --from")
    assert not any(holds(k) for k in keys.values())

    if sync:
        out = client.annex("sync", "--content", j, remote, timeout=timeout).output
        assert_every_file_ok(out, "sync --content")
        assert all(holds(k) for k in keys.values())


class BatchCopy:
    """``git annex copy --to REMOTE --batch --json``: one process, many transfers."""

    def __init__(self, client: Client, remote: str, *options: str) -> None:
        self.proc = subprocess.Popen(
            [
                "git-annex",
                "copy",
                "--to",
                remote,
                *options,
                "--batch",
                "--json",
                "--json-error-messages",
                "--debug",
            ],
            cwd=client.path,
            env=client.env.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.stderr: str | None = None

    def copy(self, name: str, timeout: float = 120.0) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(name.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        # A hang shows as a test timeout of the whole run; readline has none,
        # so the process is killed at the deadline by the caller's finally.
        line = self.proc.stdout.readline()
        assert time.monotonic() < deadline, f"no answer for {name} within {timeout}s"
        assert line, f"git-annex exited: {self.close()}"
        answer: dict[str, object] = json.loads(line)
        return answer

    def close(self) -> str:
        """Ends the process; its stderr (the --debug transcript)."""
        assert self.proc.stdin is not None
        if self.stderr is not None:
            return self.stderr
        try:  # closes stdin: the batch ends
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.stderr = err.decode(errors="replace")
        return self.stderr


@contextlib.contextmanager
def batch_copy(client: Client, remote: str, *options: str) -> Iterator[BatchCopy]:
    batch = BatchCopy(client, remote, *options)
    try:
        yield batch
    finally:
        batch.close()


SESSION_EVENT = re.compile(r"session (start|end), token")


def peak_sessions(log: str) -> int:
    """The most sessions the daemon's log shows open at once."""
    open_now = peak = 0
    for match in SESSION_EVENT.finditer(log):
        open_now += 1 if match.group(1) == "start" else -1
        peak = max(peak, open_now)
    return peak
