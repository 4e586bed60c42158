"""Framing of the P2P byte stream: lines, and the raw bodies after ``DATA n``.

A ``Decoder`` is fed bytes as they arrive and hands out events, h11-style:
it does no I/O and never blocks. Body bytes are handed out as ``Chunk``
events and the decoder will not produce the next line before the whole body
has been taken, which is what keeps binary data out of the line parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from torbridge.protocol.messages import MAX_LINE, Data, Message, ParseError, parse


@dataclass(frozen=True)
class Chunk:
    """Some bytes of the body of the DATA message last handed out."""

    data: bytes


@dataclass(frozen=True)
class BadLine:
    """A complete line that is not a message (answered, not fatal)."""

    reason: str


@dataclass(frozen=True)
class LineTooLong:
    """More than MAX_LINE bytes without a newline: the peer must be dropped."""


@dataclass(frozen=True)
class EndOfStream:
    """The peer closed. ``clean`` is False if it closed inside a line or body."""

    clean: bool


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

LineEvent = Message | BadLine | LineTooLong | EndOfStream
Event = LineEvent | Chunk


class Decoder:
    """Turns the bytes of one direction of a P2P connection into events."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._eof = False
        self._max_line = max_line
        self.body_remaining = 0
        """Bytes of the current DATA body not yet handed out."""

    def feed(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("feed after end of stream")
        if self._pos and self._pos == len(self._buf):
            # Everything was consumed: restart cheaply instead of compacting.
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self, max_chunk: int = 1 << 20) -> Event | NeedData:
        if self.body_remaining:
            return self._next_chunk(max_chunk)
        nl = self._buf.find(b"\n", self._pos)
        if nl < 0:
            if self.buffered > self._max_line:
                return LineTooLong()
            if self._eof:
                return EndOfStream(clean=self.buffered == 0)
            return NEED_DATA
        if nl - self._pos > self._max_line:
            return LineTooLong()
        line = bytes(self._buf[self._pos : nl])
        self._consume(nl + 1)
        try:
            message = parse(line)
        except ParseError as e:
            return BadLine(str(e))
        if isinstance(message, Data):
            self.body_remaining = message.length
        return message

    def body_read_directly(self, n: int) -> None:
        """The caller read ``n`` body bytes straight from the stream.

        Allowed only with nothing buffered; it spares a copy per chunk on
        large transfers.
        """
        if self.buffered or n > self.body_remaining:
            raise RuntimeError("body bytes read past the decoder")
        self.body_remaining -= n

    def _next_chunk(self, max_chunk: int) -> Chunk | EndOfStream | NeedData:
        n = min(self.buffered, self.body_remaining, max_chunk)
        if n == 0:
            return EndOfStream(clean=False) if self._eof else NEED_DATA
        data = bytes(self._buf[self._pos : self._pos + n])
        self._consume(self._pos + n)
        self.body_remaining -= n
        return Chunk(data)

    def _consume(self, upto: int) -> None:
        self._pos = upto
        # Compact now and then so a long session does not grow the buffer.
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
