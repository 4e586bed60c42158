"""Driving the stock git-annex client beyond one command at a time.

- ``git annex CMD --batch --json`` fed one file at a time (:class:`Batch`);
- the -J workflow of every tier (own endpoint, node, cluster, onion):
  parallel jobs of one client through one token (:func:`run_parallel_workflow`,
  :class:`JobSteps` for its steps one by one, timed);
- ``git annex copy --batch`` (:class:`BatchCopy`), ``git-annex`` in the
  background (:class:`AnnexProcess`), ``git annex remotedaemon``
  (:class:`RemoteDaemon`);
- the client's view of the wire (``--debug``): the ERROR texts, PUT-FROM
  and GET offsets it saw, and the daemon log's peak of open sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from tests.harness.annex import AnnexRepo, Client
from tests.harness.process import Result

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


class JobSteps:
    """A client's ``-J64`` commands run one by one, each of which must succeed
    for every file (:func:`assert_every_file_ok`); keeps how long each took."""

    def __init__(self, client: Client, where: str = "", jobs: int = JOBS) -> None:
        self.client = client
        self.where = where
        self.jobs = jobs
        self.seconds: dict[str, float] = {}

    def run(self, step: str, command: str, *args: str, timeout: float = 900.0) -> Result:
        result = self.client.annex(command, f"-J{self.jobs}", *args, timeout=timeout)
        self.seconds[step] = result.elapsed
        assert_every_file_ok(result.output, f"{step} {self.where}".strip())
        return result

    def __str__(self) -> str:
        return ", ".join(f"{step} {s:.1f}s" for step, s in self.seconds.items())


class Batch:
    """A stock ``git annex CMD --batch --json`` fed one file at a time."""

    def __init__(self, repo: AnnexRepo, *args: str, timeout: float = 90.0) -> None:
        self.timeout = timeout  # for each answer, and for the exit
        self.proc = subprocess.Popen(
            ["git", "annex", *args, "--batch", "--json"],
            cwd=repo.path,
            env=repo.env.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def do(self, file: str) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(file.encode() + b"\n")
        self.proc.stdin.flush()
        try:
            raw = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"no answer for {file} after {self.timeout}s") from None
        assert raw is not None, f"git annex exited: {self.stderr()}"
        result: dict[str, object] = json.loads(raw)
        assert result.get("success") is True, (result, self.stderr())
        return result

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=self.timeout) == 0, self.stderr()


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


# --- the client's view --------------------------------------------------------------------


ERROR_LINE = re.compile(r"P2P < ERROR (.*)")


def p2p_errors(result: Result) -> list[str]:
    """The ``ERROR`` texts the client received (needs ``--debug``)."""
    return ERROR_LINE.findall(result.output)


def put_offsets(result: Result) -> list[int]:
    """The offsets in ``PUT-FROM`` answers the client received (``--debug``)."""
    return [int(n) for n in re.findall(r"P2P < PUT-FROM (\d+)", result.output)]


def get_offsets(result: Result) -> list[int]:
    """The offsets of the ``GET`` requests the client sent (``--debug``)."""
    return [int(n) for n in re.findall(r"P2P > GET (\d+) ", result.output)]


def error_naming(result: Result, node: str, *causes: str) -> str:
    """The client's ``P2P < ERROR`` line that names ``node`` and every cause."""
    for text in p2p_errors(result):
        if node in text and all(c in text for c in causes):
            return text
    raise AssertionError(
        f"no `P2P < ERROR` naming {node!r} and {causes} (got {p2p_errors(result)}):\n"
        f"{result.describe()[-4000:]}"
    )


class AnnexProcess:
    """A client's ``git-annex`` running in the background (to be killed by a fault).

    The binary itself, not ``git annex``: its pid is git-annex's own.
    """

    def __init__(self, client: Client, *args: str) -> None:
        self.args = ["git-annex", *args]
        self.client = client
        self.proc = subprocess.Popen(
            self.args,
            cwd=client.path,
            env=client.env.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 120.0) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.kill_group()
        return Result(
            self.args,
            self.client.path,
            self.proc.returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            time.monotonic() - self.started,
            out,
        )

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class RemoteDaemon:
    """``git annex remotedaemon --foreground`` with its stdin held open.

    It prints CONNECTED / SYNCING / DONESYNCING lines as it goes; a reader
    thread queues them. ``prefix``: e.g. ``ip netns exec NS`` (the Tor tier).
    """

    def __init__(self, repo: AnnexRepo, prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, "git", "annex", "remotedaemon", "--foreground"],
            cwd=repo.path,
            env=repo.env.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {prefix!r} from the remotedaemon; it said {self.seen}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"the remotedaemon exited; it said {self.seen}"
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(b"STOP\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
