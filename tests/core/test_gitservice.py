"""How git is ended when its client leaves (server/gitservice.py); the pkt-lines
of git's output are tests/core/test_pktline.py's."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import trio

from torbridge.server.gitservice import end_git, exit_text


def test_exit_text() -> None:
    assert exit_text(-9) == "was killed by signal 9"
    assert exit_text(128) == "exited with status 128"


# --- ending git: close its pipes, let it finish, kill only after a grace period -------------


async def _started(script: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        ["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


async def test_git_that_finishes_after_eof_is_not_killed(tmp_path: Path) -> None:
    # As receive-pack does when its client left: it reads EOF, cleans up, exits.
    done = tmp_path / "cleaned-up"
    process = await _started(f"cat >/dev/null; sleep 0.3; touch {done}; exit 3")
    await end_git(process, "receive-pack", grace=30)
    assert process.returncode == 3  # its own exit, not a signal
    assert done.exists()


async def test_git_that_writes_after_its_client_left_stops_on_its_own() -> None:
    # Its next write meets the closed pipe: SIGPIPE, git's own way out.
    process = await _started("cat >/dev/null; while :; do echo keepalive; sleep 0.05; done")
    await end_git(process, "upload-pack", grace=30)
    assert process.returncode == -signal.SIGPIPE


async def test_git_that_does_not_stop_is_killed_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = await _started("trap '' PIPE; exec sleep 60 </dev/null >/dev/null")
    start = trio.current_time()
    await end_git(process, "receive-pack", grace=0.5)
    assert process.returncode == -signal.SIGKILL
    assert trio.current_time() - start >= 0.5
    assert "still running 0s after its pipes were closed: killed" in caplog.text
