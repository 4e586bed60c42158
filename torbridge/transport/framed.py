"""A P2P conversation over any trio byte stream: the Decoder plus the I/O."""

from __future__ import annotations

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.framing import Chunk, Decoder, LineEvent, NeedData
from torbridge.transport import splice

RECEIVE_SIZE = 256 * 1024


class StreamLost(Exception):
    """The stream broke (EOF inside a body, reset, closed under us)."""


_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class FramedStream:
    """Messages and DATA bodies over one trio ``Stream``.

    A DATA header is held back and written together with the first bytes of
    its body: the stock client writes them as two small packets, and a relay
    that copies that pattern onto TCP meets Nagle and delayed ACKs.
    """

    def __init__(self, stream: trio.abc.Stream, initial: bytes = b"") -> None:
        self.stream = stream
        self._decoder = Decoder()
        if initial:  # read already, before the stream was known to be P2P
            self._decoder.feed(initial)
        self._held = b""  # a DATA header waiting for its first body bytes
        self.bytes_in = 0
        self.bytes_out = 0

    # --- receiving ------------------------------------------------------------

    async def receive_event(self) -> LineEvent:
        """The next line event (bodies are read with receive_body)."""
        if self._decoder.body_remaining:
            raise RuntimeError("line read while a DATA body is unread")
        while True:
            event = self._decoder.next_event()
            if isinstance(event, NeedData):
                await self._fill()
                continue
            assert not isinstance(event, Chunk)
            return event

    async def receive_body(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the current DATA body; StreamLost at EOF."""
        remaining = self._decoder.body_remaining
        if not remaining:
            raise RuntimeError("no DATA body in progress")
        want = min(max_bytes, remaining)
        if self._decoder.buffered == 0:
            data = await self._receive_some(want)
            if not data:
                raise StreamLost("closed inside a DATA body")
            self._decoder.body_read_directly(len(data))
            return data
        event = self._decoder.next_event(want)
        if isinstance(event, Chunk):
            return event.data
        raise StreamLost("closed inside a DATA body")

    @property
    def body_remaining(self) -> int:
        return self._decoder.body_remaining

    # --- bodies moved by the kernel (transport/splice.py) ------------------------

    def splice_source(self) -> int | None:
        """The descriptor the rest of the current body can be spliced from."""
        if not self._decoder.body_remaining or self._decoder.buffered:
            return None
        return splice.read_fd(self.stream)

    def spliced_in(self, n: int) -> None:
        self._decoder.body_read_directly(n)
        self.bytes_in += n

    def splice_sink(self) -> int | None:
        """The descriptor body bytes can be spliced to: not before a held DATA
        line is out with the first piece (until then the line can still be
        taken back, and an ERROR sent instead)."""
        return None if self._held else splice.write_fd(self.stream)

    def spliced_out(self, n: int) -> None:
        self.bytes_out += n

    async def _fill(self) -> None:
        data = await self._receive_some(RECEIVE_SIZE)
        if data:
            self._decoder.feed(data)
        else:
            self._decoder.feed_eof()

    async def _receive_some(self, n: int) -> bytes:
        try:
            data = await self.stream.receive_some(n)
        except _STREAM_ERRORS as e:
            raise StreamLost(str(e) or type(e).__name__) from e
        self.bytes_in += len(data)
        return bytes(data)

    # --- sending ----------------------------------------------------------------

    async def send(self, message: m.Message) -> None:
        wire = m.serialise(message)
        if isinstance(message, m.Data) and message.length > 0:
            self._held = wire
            return
        await self._send_all(wire)

    async def send_body(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        await self._send_all(data)

    async def _send_all(self, data: bytes) -> None:
        if self._held:
            raise RuntimeError("message sent before the held DATA body")
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as e:
            raise StreamLost(str(e) or type(e).__name__) from e
        self.bytes_out += len(data)

    def discard_held(self) -> bool:
        """Forget a DATA header not yet sent; True if there was one."""
        held, self._held = self._held, b""
        return bool(held)

    async def aclose(self) -> None:
        await self.stream.aclose()
