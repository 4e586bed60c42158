"""The client's stream, watched for a hang-up while its session waits on the peer.

The protocol is request-synchronous: while a request is with the peer the
client has nothing to say, so the session reads nothing from it and would
notice a client that hung up only when the peer answered, holding a peer
(a git-annex-shell, a node connection) and a token's slot until then.
``WatchedStream.hung_up`` reads ahead during that wait; what it reads is
kept, in order, for the next ``receive_some``, so no byte is lost or
reordered. Leaving is a broken stream, or an EOF once nobody reads our
side either: a half-close (a script that pipes its requests in and closes
its stdin) still gets its answers, as from git-annex's own server.
"""

from __future__ import annotations

import select
from typing import Protocol, runtime_checkable

import trio

from torbridge.transport import splice

# At most this much is read ahead (a stock client sends nothing while it
# waits): past it the watch stops reading, and memory stays bounded.
READ_AHEAD_LIMIT = 64 * 1024

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# How often a half-closed socket is polled for the rest of the hang-up:
# epoll has no event for it that trio waits on (the socket stays readable).
HANGUP_POLL_INTERVAL = 0.25


@runtime_checkable
class ReaderWatch(Protocol):
    """A stream that can tell when its far end stops reading what we send."""

    async def wait_reader_gone(self) -> None: ...


async def wait_reader_gone(stream: trio.abc.Stream) -> None:
    """Return once nobody reads what is sent on ``stream``.

    At once for a stream that cannot tell (an in-memory one): its EOF is
    taken as the whole hang-up, which frees the session soonest.
    """
    if isinstance(stream, ReaderWatch):
        await stream.wait_reader_gone()
    elif isinstance(stream, trio.SocketStream):
        # A unix socket whose peer closed (not just shut its sending side)
        # polls HUP. TCP learns that only from a later write: not waited for.
        if stream.socket.family != trio.socket.AF_UNIX:
            return
        await _unix_hangup(stream)


async def wait_closed(stream: trio.abc.Stream) -> None:
    """Return once the far end of ``stream`` has closed it, without reading from it.

    For a client whose bytes are still to be read (a DATA body held up by
    a peer that takes nothing): reading ahead would not reach its EOF.
    Never returns for a stream that cannot tell (TCP, in-memory).
    """
    if isinstance(stream, ReaderWatch):
        await stream.wait_reader_gone()
    elif isinstance(stream, trio.SocketStream) and stream.socket.family == trio.socket.AF_UNIX:
        await _unix_hangup(stream)
    else:
        await trio.sleep_forever()


async def _unix_hangup(stream: trio.SocketStream) -> None:
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN)
    while True:  # nothing to wake on but time
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0)):
            return
        await trio.sleep(HANGUP_POLL_INTERVAL)


class WatchedStream(trio.abc.HalfCloseableStream):
    def __init__(self, stream: trio.abc.Stream, limit: int = READ_AHEAD_LIMIT) -> None:
        self.stream = stream
        self._limit = limit
        self._ahead = bytearray()  # read by the watch, not yet by the session
        self._eof = False
        self._error: Exception | None = None

    async def hung_up(self) -> str:
        """Return, saying why, once the client has hung up (EOF or a broken stream).

        Cancel it to stop watching; nothing read so far is lost.
        """
        while True:
            if self._error is not None:
                return str(self._error) or type(self._error).__name__
            if self._eof:
                await wait_reader_gone(self.stream)
                return "closed the connection"
            room = self._limit - len(self._ahead)
            if room <= 0:
                await trio.sleep_forever()  # out of step: read in turn later
            try:
                data = await self.stream.receive_some(room)
            except _STREAM_ERRORS as e:
                self._error = e
                continue
            if data:
                self._ahead += data
            else:
                self._eof = True

    async def closed(self) -> str:
        """Like ``hung_up``, but reads nothing: for a client that is sending a body."""
        if self._error is not None:
            return str(self._error) or type(self._error).__name__
        await wait_closed(self.stream)
        return "closed the connection"

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._ahead:
            n = len(self._ahead) if max_bytes is None else min(max_bytes, len(self._ahead))
            data = bytes(self._ahead[:n])
            del self._ahead[:n]
            return data
        if self._error is not None:
            raise self._error
        if self._eof:
            return b""
        return await self.stream.receive_some(max_bytes)

    def splice_read_fd(self) -> int | None:
        if self._ahead or self._eof or self._error is not None:
            return None  # what the watch read comes first
        return splice.read_fd(self.stream)

    def splice_write_fd(self) -> int | None:
        return splice.write_fd(self.stream)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
