"""The framing Decoder: lines, DATA bodies, limits and end of stream.

In the manner of h11's tests: the same byte transcript, fed in every possible
split, must give the same events; body bytes are never read as lines.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol.framing import (
    NEED_DATA,
    BadLine,
    Chunk,
    Decoder,
    EndOfStream,
    Event,
    LineTooLong,
    NeedData,
)
from torbridge.protocol.messages import (
    MAX_LINE,
    AlreadyHavePlus,
    Auth,
    AuthSuccess,
    CheckPresent,
    Data,
    Error,
    Failure,
    Get,
    Invalid,
    Message,
    Put,
    PutFrom,
    Success,
    Valid,
    Version,
    serialise,
)

PROPS = settings(
    max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

KEY = "SHA256E-s11--e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.txt"
UUID = "f9e4ee1a-3a2e-4e5b-8f42-2d2d0b1f6c11"
# A body that looks like protocol lines: it must still come out as bytes.
TRICKY = b"SUCCESS\nDATA 5\nERROR x\r\n\n\x00\xff" + b"A" * 40 + b"\n"

TRANSCRIPT = b"".join(
    [
        b"AUTH " + UUID.encode() + b" abcDEF0123\n",
        b"AUTH-SUCCESS " + UUID.encode() + b"\r\n",
        b"VERSION 1\n",
        b"PUT  " + KEY.encode() + b"\n",
        b"PUT-FROM 0\n",
        b"DATA %d\n" % len(TRICKY),
        TRICKY,
        b"VALID\n",
        b"SUCCESS\n",
        b"this is not a message\n",
        b"\n",
        b"GET 0 f%%ile " + KEY.encode() + b"\n",
        b"DATA 0\n",
        b"INVALID\n",
        b"DATA 1\n\nCHECKPRESENT " + KEY.encode() + b"\n",
        b"ALREADY-HAVE-PLUS a b\n",
        b"\xff\xfe garbage \x00\n",
        b"ERROR bye now\n",
    ]
)

EXPECTED: list[object] = [
    Auth(UUID, "abcDEF0123"),
    AuthSuccess(UUID),
    Version(1),
    Put(None, KEY),
    PutFrom(0),
    Data(len(TRICKY)),
    Chunk(TRICKY),
    Valid(),
    Success(),
    BadLine,
    BadLine,
    Get(0, "f%ile", KEY),
    Data(0),
    Invalid(),
    Data(1),
    Chunk(b"\n"),
    CheckPresent(KEY),
    AlreadyHavePlus(("a", "b")),
    BadLine,
    Error("bye now"),
    EndOfStream(clean=True),
]


def drain(d: Decoder, out: list[Event], max_chunk: int = 1 << 20) -> None:
    """Take events until the decoder needs data (or the stream ended)."""
    while True:
        ev = d.next_event(max_chunk)
        if ev is NEED_DATA:
            return
        assert not isinstance(ev, NeedData)
        if isinstance(ev, Chunk):
            assert 0 < len(ev.data) <= max_chunk
        out.append(ev)
        if isinstance(ev, EndOfStream | LineTooLong):
            return


def decode(pieces: list[bytes], *, eof: bool = True, max_chunk: int = 1 << 20) -> list[Event]:
    d = Decoder()
    out: list[Event] = []
    for p in pieces:
        d.feed(p)
        drain(d, out, max_chunk)
    if eof:
        d.feed_eof()
        drain(d, out, max_chunk)
    return out


def normalise(events: list[Event]) -> list[object]:
    """Join adjacent chunks (their boundaries depend on the split) and reduce
    BadLine to its type (the reason is free text)."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, Chunk) and out and isinstance(out[-1], Chunk):
            out[-1] = Chunk(out[-1].data + ev.data)
        elif isinstance(ev, BadLine):
            out.append(BadLine)
        else:
            out.append(ev)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- the same events whatever the split ----------------------------------------


def test_transcript_in_one_piece() -> None:
    assert normalise(decode([TRANSCRIPT])) == EXPECTED


def test_transcript_byte_by_byte() -> None:
    pieces = [TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))]
    assert normalise(decode(pieces)) == EXPECTED


def test_transcript_every_two_piece_split() -> None:
    for i in range(len(TRANSCRIPT) + 1):
        assert normalise(decode([TRANSCRIPT[:i], TRANSCRIPT[i:]])) == EXPECTED, i


def test_transcript_with_empty_feeds() -> None:
    pieces = []
    for i in range(0, len(TRANSCRIPT), 7):
        pieces += [b"", TRANSCRIPT[i : i + 7], b""]
    assert normalise(decode(pieces)) == EXPECTED


@PROPS
@given(st.lists(st.integers(0, len(TRANSCRIPT)), max_size=60), st.integers(1, 100))
def test_transcript_random_splits(cuts: list[int], max_chunk: int) -> None:
    events = decode(split_at(TRANSCRIPT, cuts), max_chunk=max_chunk)
    assert normalise(events) == EXPECTED


# Random conversations: messages, each DATA followed by its body.
_simple = st.sampled_from(
    [
        Success(),
        Failure(),
        Valid(),
        Invalid(),
        Version(2),
        PutFrom(7),
        Error("a b"),
        Put(None, KEY),
        Get(3, "x", KEY),
        CheckPresent(KEY),
    ]
)
_body = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"\n", b"\r\n", TRICKY, b"DATA 3\n", b"x" * 1000]),
)
_item = st.one_of(_simple.map(lambda m: (m, None)), _body.map(lambda b: (Data(len(b)), b)))


@PROPS
@given(
    st.lists(_item, max_size=12), st.lists(st.integers(0, 10**6), max_size=30), st.integers(1, 64)
)
def test_conversations_any_split(
    items: list[tuple[Message, bytes | None]], cuts: list[int], max_chunk: int
) -> None:
    wire = b""
    expected: list[object] = []
    for m, body in items:
        wire += serialise(m)
        expected.append(m)
        if body is not None:
            wire += body
            if body:
                expected.append(Chunk(body))
    expected.append(EndOfStream(clean=True))
    events = decode(split_at(wire, cuts), max_chunk=max_chunk)
    assert normalise(events) == expected
    assert all(not isinstance(e, BadLine) for e in events)


# --- DATA bodies ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 65535, 65536, 65537, 3 * 1024 * 1024 + 5])
def test_data_bodies(size: int) -> None:
    rng = random.Random(size)
    pattern = b"SUCCESS\nDATA 9\nERROR y\n\r\n" + bytes(range(256))
    body = (pattern * (size // len(pattern) + 1))[:size]
    wire = b"DATA %d\n" % size + body + b"VALID\nSUCCESS\n"
    pieces = []
    i = 0
    while i < len(wire):
        n = rng.choice([1, 2, 13, 1000, 4096, 65536, 200_000])
        pieces.append(wire[i : i + n])
        i += n
    events = decode(pieces, max_chunk=rng.choice([1 << 20, 65536, 1000]))
    assert events[0] == Data(size)
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert b"".join(c.data for c in chunks) == body
    assert all(c.data for c in chunks)
    rest = [e for e in events if not isinstance(e, Chunk)]
    assert rest == [Data(size), Valid(), Success(), EndOfStream(clean=True)]


def test_body_remaining_accounting() -> None:
    d = Decoder()
    assert d.body_remaining == 0
    d.feed(b"DATA 10\n0123")
    assert d.next_event() == Data(10)
    assert d.body_remaining == 10
    assert d.next_event() == Chunk(b"0123")
    assert d.body_remaining == 6
    assert d.next_event() is NEED_DATA
    assert d.body_remaining == 6
    d.feed(b"456789SUCCESS\n")
    assert d.next_event(max_chunk=4) == Chunk(b"4567")
    assert d.body_remaining == 2
    assert d.next_event() == Chunk(b"89")
    assert d.body_remaining == 0
    assert d.next_event() == Success()
    assert d.body_remaining == 0
    d.feed(b"DATA 0\nVALID\n")
    assert d.next_event() == Data(0)
    assert d.body_remaining == 0
    assert d.next_event() == Valid()


@PROPS
@given(st.integers(0, 5000), st.integers(1, 700), st.lists(st.integers(1, 900), min_size=1))
def test_body_remaining_decreases_by_each_chunk(
    size: int, max_chunk: int, sizes: list[int]
) -> None:
    d = Decoder()
    d.feed(b"DATA %d\n" % size)
    assert d.next_event() == Data(size)
    body = bytes(i % 251 for i in range(size)) + b"SUCCESS\n"
    got = b""
    i = 0
    k = 0
    while d.body_remaining:
        before = d.body_remaining
        ev = d.next_event(max_chunk)
        if ev is NEED_DATA:
            n = sizes[k % len(sizes)]
            k += 1
            d.feed(body[i : i + n])
            i += n
            continue
        assert isinstance(ev, Chunk)
        assert len(ev.data) <= max_chunk
        assert d.body_remaining == before - len(ev.data)
        got += ev.data
    assert got == body[:size]
    d.feed(body[i:])
    assert d.next_event() == Success()


def test_max_chunk() -> None:
    d = Decoder()
    d.feed(b"DATA 20\n" + b"x" * 20 + b"FAILURE\n")
    assert d.next_event(max_chunk=7) == Data(20)  # max_chunk does not touch lines
    sizes = []
    while d.body_remaining:
        ev = d.next_event(max_chunk=7)
        assert isinstance(ev, Chunk)
        sizes.append(len(ev.data))
    assert sizes == [7, 7, 6]
    assert d.next_event(max_chunk=7) == Failure()


def test_default_max_chunk_bounds_huge_buffered_body() -> None:
    size = 3 << 20
    d = Decoder()
    d.feed(b"DATA %d\n" % size + b"z" * size)
    assert d.next_event() == Data(size)
    lengths = []
    while d.body_remaining:
        ev = d.next_event()
        assert isinstance(ev, Chunk)
        lengths.append(len(ev.data))
    assert lengths == [1 << 20] * 3


def test_body_read_directly() -> None:
    d = Decoder()
    d.feed(b"DATA 10\nabc")
    assert d.next_event() == Data(10)
    with pytest.raises(RuntimeError):
        d.body_read_directly(3)  # bytes are still buffered
    assert d.next_event() == Chunk(b"abc")
    d.body_read_directly(5)
    assert d.body_remaining == 2
    with pytest.raises(RuntimeError):
        d.body_read_directly(3)  # more than the body
    d.body_read_directly(2)
    d.feed(b"VALID\n")
    assert d.next_event() == Valid()


# --- long lines ---------------------------------------------------------------------


def test_line_too_long_before_newline() -> None:
    d = Decoder()
    d.feed(b"ERROR ")
    for _ in range(MAX_LINE // 1024):
        assert d.next_event() is NEED_DATA
        d.feed(b"x" * 1024)
    assert d.buffered == MAX_LINE + 6
    assert d.next_event() == LineTooLong()


def test_line_too_long_exactly_max_plus_one() -> None:
    d = Decoder()
    d.feed(b"x" * MAX_LINE)
    assert d.next_event() is NEED_DATA  # MAX_LINE bytes may still end well
    d.feed(b"x")
    assert d.next_event() == LineTooLong()
    assert d.next_event() == LineTooLong()  # it stays that way: drop the peer


def test_line_too_long_newline_arrives_late() -> None:
    line = b"ERROR " + b"y" * (MAX_LINE - 5)  # MAX_LINE + 1 bytes
    d = Decoder()
    d.feed(line + b"\nSUCCESS\n")
    assert d.next_event() == LineTooLong()
    d = Decoder()
    d.feed(line[:20000])
    assert d.next_event() is NEED_DATA
    d.feed(line[20000:] + b"\n")
    assert d.next_event() == LineTooLong()


def test_line_too_long_after_earlier_lines() -> None:
    d = Decoder()
    d.feed(b"SUCCESS\n" * 100 + b"z" * (MAX_LINE + 1))
    for _ in range(100):
        assert d.next_event() == Success()
    assert d.next_event() == LineTooLong()


def test_exactly_max_line_is_fine() -> None:
    line = b"ERROR " + b"y" * (MAX_LINE - 6)
    assert len(line) == MAX_LINE
    assert decode([line + b"\n"]) == [Error("y" * (MAX_LINE - 6)), EndOfStream(clean=True)]
    pieces = [line[i : i + 1000] for i in range(0, len(line), 1000)] + [b"\nVALID\n"]
    assert decode(pieces) == [Error("y" * (MAX_LINE - 6)), Valid(), EndOfStream(clean=True)]


def test_long_body_is_not_a_long_line() -> None:
    body = b"b" * (4 * MAX_LINE)  # no newline in it
    events = decode([b"DATA %d\n" % len(body) + body + b"SUCCESS\n"])
    assert not any(isinstance(e, LineTooLong) for e in events)
    assert normalise(events) == [Data(len(body)), Chunk(body), Success(), EndOfStream(clean=True)]


def test_custom_max_line() -> None:
    d = Decoder(max_line=10)
    d.feed(b"SUCCESS\n" + b"ERROR 1234\n" + b"ERROR 12345\n")
    assert d.next_event() == Success()
    assert d.next_event() == Error("1234")
    assert d.next_event() == LineTooLong()


# --- bad lines, end of stream -------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\r",
        b"hello",
        b"\x00\xff\xfe",
        b"SUCCESS extra",
        b"DATA -1",
        b"DATA x",
        b"PUT /etc/passwd " + KEY.encode(),
        b"GET 0  notakey",
        b" " * 100,
    ],
)
def test_bad_line_then_normal_events(garbage: bytes) -> None:
    events = decode([garbage + b"\nSUCCESS\nDATA 2\nab" + b"VALID\n"])
    assert isinstance(events[0], BadLine)
    assert events[0].reason
    assert events[1:] == [Success(), Data(2), Chunk(b"ab"), Valid(), EndOfStream(clean=True)]


def test_bad_data_line_starts_no_body() -> None:
    d = Decoder()
    d.feed(b"DATA 1x\nSUCCESS\n")
    assert isinstance(d.next_event(), BadLine)
    assert d.body_remaining == 0
    assert d.next_event() == Success()


@PROPS
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=10))
def test_any_bytes_give_only_events(data: bytes, cuts: list[int]) -> None:
    events = decode(split_at(data, cuts))
    assert isinstance(events[-1], EndOfStream | LineTooLong)
    assert all(isinstance(e, Message | Chunk | BadLine | EndOfStream | LineTooLong) for e in events)
    assert normalise(events) == normalise(decode([data]))


def test_end_of_stream_clean_at_boundary() -> None:
    d = Decoder()
    assert d.next_event() is NEED_DATA
    d.feed(b"SUCCESS\n")
    assert d.next_event() == Success()
    assert d.next_event() is NEED_DATA
    d.feed_eof()
    assert d.next_event() == EndOfStream(clean=True)
    assert d.next_event() == EndOfStream(clean=True)


def test_end_of_stream_right_after_body() -> None:
    assert decode([b"DATA 3\nabc"]) == [Data(3), Chunk(b"abc"), EndOfStream(clean=True)]


def test_end_of_stream_on_empty_stream() -> None:
    assert decode([]) == [EndOfStream(clean=True)]


@pytest.mark.parametrize("partial", [b"S", b"SUCCESS", b"SUCCESS\r", b"\r", b"DATA 5"])
def test_end_of_stream_inside_line(partial: bytes) -> None:
    assert decode([b"VALID\n" + partial]) == [Valid(), EndOfStream(clean=False)]


@pytest.mark.parametrize(
    ("wire", "events"),
    [
        (b"DATA 5\n", [Data(5), EndOfStream(clean=False)]),
        (b"DATA 5\nab", [Data(5), Chunk(b"ab"), EndOfStream(clean=False)]),
        (b"DATA 5\nabcd", [Data(5), Chunk(b"abcd"), EndOfStream(clean=False)]),
    ],
)
def test_end_of_stream_inside_body(wire: bytes, events: list[Event]) -> None:
    assert decode([wire]) == events
    d = Decoder()
    d.feed(wire)
    d.feed_eof()
    got = []
    while True:
        ev = d.next_event()
        got.append(ev)
        if isinstance(ev, EndOfStream):
            break
    assert got == events
    assert d.body_remaining > 0


def test_need_data_while_waiting() -> None:
    d = Decoder()
    assert d.next_event() is NEED_DATA
    d.feed(b"SUCC")
    assert d.next_event() is NEED_DATA
    d.feed(b"ESS\r")
    assert d.next_event() is NEED_DATA
    d.feed(b"\nDATA 3\n")
    assert d.next_event() == Success()
    assert d.next_event() == Data(3)
    assert d.next_event() is NEED_DATA  # inside the body, nothing buffered
    d.feed(b"a")
    assert d.next_event() == Chunk(b"a")
    assert d.next_event() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


def test_feed_after_eof_raises() -> None:
    d = Decoder()
    d.feed(b"SUCCESS\n")
    d.feed_eof()
    with pytest.raises(RuntimeError):
        d.feed(b"FAILURE\n")
    with pytest.raises(RuntimeError):
        d.feed(b"")
    assert d.next_event() == Success()
    assert d.next_event() == EndOfStream(clean=True)


# --- memory ---------------------------------------------------------------------------


def _long_stream(total: int, seed: int) -> bytes:
    rng = random.Random(seed)
    parts: list[bytes] = []
    size = 0
    while size < total:
        kind = rng.random()
        if kind < 0.6:
            part = rng.choice(
                [
                    b"SUCCESS\n",
                    b"VALID\n",
                    b"CHECKPRESENT " + KEY.encode() + b"\n",
                    b"PUT  " + KEY.encode() + b"\n",
                    b"garbage line\n",
                ]
            )
        else:
            n = rng.choice([0, 1, 100, 3000, 70000])
            part = b"DATA %d\n" % n + bytes([rng.randrange(256)]) * n
        parts.append(part)
        size += len(part)
    return b"".join(parts)


@pytest.mark.parametrize("piece", [1024, 1000, 7777])
def test_buffer_stays_bounded(piece: int) -> None:
    wire = _long_stream(10 * 1024 * 1024, piece)
    d = Decoder()
    biggest = 0
    body = 0
    n_events = 0
    for i in range(0, len(wire), piece):
        d.feed(wire[i : i + piece])
        biggest = max(biggest, len(d._buf))
        while (ev := d.next_event(max_chunk=4096)) is not NEED_DATA:
            assert not isinstance(ev, LineTooLong | EndOfStream)
            n_events += 1
            if isinstance(ev, Chunk):
                body += len(ev.data)
        biggest = max(biggest, len(d._buf))
    d.feed_eof()
    assert d.next_event() == EndOfStream(clean=True)
    assert n_events > 2_000
    assert body > 1024 * 1024
    # Whatever the stream's length, the buffer holds at most what was fed
    # since the last compaction (64 KiB) plus a piece.
    assert biggest <= 65536 + 2 * piece + 100, biggest


def test_buffer_stays_bounded_with_unaligned_lines() -> None:
    # Every feed ends inside a line, so the buffer is never empty when fed:
    # only the compaction can keep it small.
    line = b"CHECKPRESENT " + KEY.encode() + b"\n"
    wire = line * (5 * 1024 * 1024 // len(line))
    d = Decoder()
    biggest = 0
    count = 0
    for i in range(0, len(wire), 1024):
        d.feed(wire[i : i + 1024])
        while (ev := d.next_event()) is not NEED_DATA:
            assert ev == CheckPresent(KEY)
            count += 1
        biggest = max(biggest, len(d._buf))
    assert count == len(wire) // len(line)
    assert biggest <= 65536 + 2048 + len(line), biggest
