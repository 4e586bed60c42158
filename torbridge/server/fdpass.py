"""Local clients hand the bridge their pipes instead of copying through them.

``git-annex-p2p-torbridge`` sits between git-annex's pipes and an endpoint
socket. Copying through it would add a hop to every message, so it passes
git-annex's stdin/stdout to the daemon with SCM_RIGHTS and then only waits:
the daemon speaks to git-annex directly. A connection that does not start
with the marker (any Tor client: tor carries no ancillary data) is an
ordinary P2P stream, and the bytes read are handed on.
"""

from __future__ import annotations

import array
import os
import socket
import stat

import trio

MARKER = b"\0torbridge-fds\n"
_FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


class PassedPipes(trio.abc.HalfCloseableStream):
    """git-annex's pipes, received from the transport program.

    Closing also closes the control socket: that is what tells the program
    to exit.
    """

    def __init__(self, read_fd: int, write_fd: int, control: trio.SocketStream) -> None:
        self._in = trio.lowlevel.FdStream(read_fd)
        self._out = trio.lowlevel.FdStream(write_fd)
        self.control = control

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._out.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._out.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._out.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._in.receive_some(max_bytes)

    def splice_read_fd(self) -> int:
        return self._in.fileno()

    def splice_write_fd(self) -> int:
        return self._out.fileno()

    async def wait_reader_gone(self) -> None:
        """Return once git-annex no longer reads its stdout (it exited).

        The write end of a pipe whose reader closed polls ERR, and trio wakes
        a reader's wait on any ERR: it never polls IN, so nothing else does.
        """
        await trio.lowlevel.wait_readable(self._out.fileno())

    async def aclose(self) -> None:
        try:
            await self._out.aclose()
            await self._in.aclose()
        finally:
            await self.control.aclose()


def _usable(fd: int) -> bool:
    # Only pipes and sockets: never a file, a tty or a device someone passes us.
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def accept_stream(stream: trio.SocketStream) -> tuple[trio.abc.Stream, bytes]:
    """The client's stream, and bytes already read from it."""
    data, ancdata, _flags, _addr = await stream.socket.recvmsg(65536, _FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if data == MARKER and len(fds) == 2 and all(_usable(fd) for fd in fds):
        return PassedPipes(fds[0], fds[1], stream), b""
    for fd in fds:  # unexpected descriptors are never used
        os.close(fd)
    return stream, data
