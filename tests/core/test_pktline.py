"""Transcripts of git's pkt-lines as the bridge reads them (protocol/pktline.py):
how git's truncated output is completed and a failure told, whether a push
asked for side-band."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol.pktline import CAPS_WINDOW, PktStream, pkt_line

MESSAGE = "torbridge: git upload-pack was killed by signal 9"


def packets(data: bytes) -> list[bytes]:
    """Split a pkt-line stream into payloads (flush = b""); asserts it is whole."""
    out = []
    while data:
        length = int(data[:4], 16)
        assert length == 0 or length >= 4, data[:4]
        out.append(data[4:length] if length else b"")
        data = data[max(length, 4) :]
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
    for cut in (
        len(ADVERTISEMENT) + 1,
        len(ADVERTISEMENT) + 3,
        len(ADVERTISEMENT) + 100,
        len(stream) - 1,
    ):
        p = PktStream()
        p.feed(stream[:cut])
        got = packets(stream[:cut] + p.failure_tail(MESSAGE))
        assert got[-1].endswith(MESSAGE.encode() + b"\n"), cut
        # Once a side-band payload has begun, the message goes on band 3.
        assert got[-1].startswith(b"\x03") == (cut > len(ADVERTISEMENT) + 4), cut


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans(), st.data())
def test_any_cut_of_any_pkt_stream_becomes_whole(
    payloads: list[bytes], sideband: bool, data: st.DataObject
) -> None:
    """However git's output is cut and chunked, output + tail is whole pkt-lines."""
    stream = b"".join(pkt_line((b"\x01" if sideband else b"") + p) for p in payloads)
    cut = data.draw(st.integers(0, len(stream)))
    p = PktStream()
    pos = 0
    while pos < cut:  # fed in random chunks, as git's stdout is read
        n = data.draw(st.integers(1, cut - pos))
        p.feed(stream[pos : pos + n])
        pos += n
    got = packets(stream[:cut] + p.failure_tail(MESSAGE))
    assert got[-1].endswith(MESSAGE.encode() + b"\n")


ZERO = "0" * 40
NEW = "1" * 40
PUSH_CAPS = b" report-status side-band-64k agent=git/2.47\n"


def test_pkt_line_framing() -> None:
    assert pkt_line("ERR no\n") == b"000bERR no\n"
    assert pkt_line(b"") == b"0004"


def test_push_that_asked_for_sideband_is_seen_whatever_the_chunks() -> None:
    request = pkt_line(f"{ZERO} {NEW} refs/heads/main\0".encode() + PUSH_CAPS) + b"0000"
    for size in (1, 7, len(request)):
        p = PktStream()
        for i in range(0, len(request), size):
            p.client_wrote(request[i : i + size])
        assert p.client_asked_sideband, size
        p.feed(pkt_line("unpack ok\n"))
        assert packets(p.failure_tail(MESSAGE))[-1].startswith(b"\x03"), size


def test_push_without_sideband_gets_an_err_line() -> None:
    request = pkt_line(f"{ZERO} {NEW} refs/heads/main\0 report-status\n".encode()) + b"0000"
    p = PktStream()
    p.client_wrote(request + b"PACK" + bytes(100))
    assert not p.client_asked_sideband
    assert packets(p.failure_tail(MESSAGE)) == [f"ERR {MESSAGE}\n".encode()]


def test_capabilities_are_looked_for_only_at_the_start() -> None:
    p = PktStream()
    p.client_wrote(bytes(CAPS_WINDOW))
    p.client_wrote(b"side-band-64k")
    assert not p.client_asked_sideband
