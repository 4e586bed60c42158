"""Running commands and waiting: every subprocess with a timeout, every wait with a deadline.

Synchronous and blocking on purpose: the daemon under test is a separate
process and the clients are real git/git-annex processes, so a test reads
like the shell session it replaces. A hang is a failure (never a stuck test
run), and every failure carries the command's stdout and stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRACE = bool(os.environ.get("TORBRIDGE_E2E_TRACE"))
"""Print every command with its run time (see with ``pytest -s``)."""

DEFAULT_TIMEOUT = 120.0
"""Seconds any one command may take unless the caller says otherwise."""


class CommandError(AssertionError):
    """A command failed (or timed out); the message has its full output."""

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Result:
    args: list[str]
    cwd: Path | None
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    stdout_bytes: bytes = field(repr=False, default=b"")

    @property
    def output(self) -> str:
        """stdout and stderr together, for "the message appears somewhere" checks."""
        return self.stdout + self.stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}   (cwd={self.cwd}, exit {self.returncode}, "
            f"{self.elapsed:.1f}s)\n"
            f"--- stdout ---\n{self.stdout.rstrip()}\n"
            f"--- stderr ---\n{self.stderr.rstrip()}\n"
        )


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path | None = None,
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run a command, capture its output, raise :class:`CommandError` on failure.

    The command runs in its own process group: on timeout the whole group
    (git-annex, its transport program, git) is killed, and the error message
    holds whatever output there was.
    """
    args = [os.fspath(c) for c in cmd]
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = b"", b"(output lost: pipes held open by a surviving process)"
        result = Result(
            args, cwd, -9, _decode(out), _decode(err), time.monotonic() - start, out or b""
        )
        raise CommandError(
            f"command timed out after {timeout:.0f}s (a hang):\n{result.describe()}", result
        ) from None
    finally:
        # Kill leftovers of the group (a transport program that outlived
        # git-annex, say); harmless when the group is already gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    result = Result(
        args, cwd, proc.returncode, _decode(out), _decode(err), time.monotonic() - start, out
    )
    if TRACE:
        print(f"[e2e {result.elapsed:6.2f}s exit {result.returncode}] {' '.join(args)}")
    if check and result.returncode != 0:
        raise CommandError(f"command failed:\n{result.describe()}", result)
    return result


def wait_for(
    what: str, done: Callable[[], object], timeout: float = 60.0, interval: float = 0.05
) -> float:
    """Poll ``done`` every ``interval`` s until it is true; the seconds it took.

    AssertionError naming ``what`` after ``timeout`` s (a deadline, never a
    timed assertion: callers give generous ones).
    """
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The state and ppid follow the ")" that ends the command name.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        cmdlines[child] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, cmdlines[child]))
            todo.append(child)
    return found
