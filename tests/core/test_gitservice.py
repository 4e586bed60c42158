"""PktStream: how git's truncated output is completed and a failure told; how git is
ended when its client leaves (server/gitservice.py)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.server.gitservice import PktStream, end_git, exit_text, pkt_line

MESSAGE = "torbridge: git upload-pack was killed by signal 9"


def packets(data: bytes) -> list[bytes]:
    """Split a pkt-line stream into payloads (flush = b""); asserts it is whole."""
    out = []
    while data:
        length = int(data[:4], 16)
        assert length == 0 or length >= 4, data[:4]
        out.append(data[4:length] if length else b"")
        data = data[max(length, 4):]
    return out


ADVERTISEMENT = pkt_line("0" * 40 + " refs/heads/main\0side-band-64k\n") + b"0000"
SIDEBAND_PACK = pkt_line(b"\x01PACK" + bytes(2000)) + pkt_line(b"\x02progress\n")


def test_whole_plain_stream_gets_an_err_line() -> None:
    p = PktStream()
    p.feed(ADVERTISEMENT)
    tail = p.failure_tail(MESSAGE)
    assert packets(tail) == [f"ERR {MESSAGE}\n".encode()]


def test_sideband_stream_gets_a_band_3_message() -> None:
    p = PktStream()
    p.feed(ADVERTISEMENT + SIDEBAND_PACK)
    assert packets(p.failure_tail(MESSAGE)) == [b"\x03" + MESSAGE.encode() + b"\n"]


def test_push_that_asked_for_sideband_gets_band_3() -> None:
    p = PktStream()
    p.feed(ADVERTISEMENT)
    p.client_asked_sideband = True
    assert packets(p.failure_tail(MESSAGE))[-1].startswith(b"\x03")


def test_cut_inside_a_packet_is_completed_first() -> None:
    stream = ADVERTISEMENT + SIDEBAND_PACK
    for cut in (len(ADVERTISEMENT) + 1, len(ADVERTISEMENT) + 3, len(ADVERTISEMENT) + 100,
                len(stream) - 1):
        p = PktStream()
        p.feed(stream[:cut])
        got = packets(stream[:cut] + p.failure_tail(MESSAGE))
        assert got[-1].endswith(MESSAGE.encode() + b"\n"), cut
        # Once a side-band payload has begun, the message goes on band 3.
        assert got[-1].startswith(b"\x03") == (cut > len(ADVERTISEMENT) + 4), cut


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans(), st.data())
def test_any_cut_of_any_pkt_stream_becomes_whole(payloads: list[bytes], sideband: bool,
                                                 data: st.DataObject) -> None:
    """However git's output is cut and chunked, output + tail is whole pkt-lines."""
    stream = b"".join(pkt_line((b"\x01" if sideband else b"") + p) for p in payloads)
    cut = data.draw(st.integers(0, len(stream)))
    p = PktStream()
    pos = 0
    while pos < cut:  # fed in random chunks, as git's stdout is read
        n = data.draw(st.integers(1, cut - pos))
        p.feed(stream[pos:pos + n])
        pos += n
    got = packets(stream[:cut] + p.failure_tail(MESSAGE))
    assert got[-1].endswith(MESSAGE.encode() + b"\n")


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
