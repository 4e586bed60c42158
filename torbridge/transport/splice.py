"""DATA bodies moved by the kernel: splice(2) from one side's descriptor to the other's.

A relayed body needs no look from Python: its length is known from the
DATA line. Copying it through user space costs the daemon a read and a
write per piece and, on a small host, the CPU the client and the node
need. Where one side of the copy is a pipe (git-annex's pipes handed over
by git-annex-p2p-torbridge, a peer program's stdin/stdout) and the other a
pipe or a socket, ``splice`` moves the bytes inside the kernel.

Streams say which descriptor they read from or write to: trio's socket
and fd streams are known here; wrappers define ``splice_read_fd()`` /
``splice_write_fd()`` (None while they hold bytes of their own).
"""

from __future__ import annotations

import errno
import os
import select
import stat
from typing import Protocol, runtime_checkable

import trio

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# errnos that say splice cannot join these two descriptors (not that one broke)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


@runtime_checkable
class SpliceSource(Protocol):
    def splice_read_fd(self) -> int | None: ...


@runtime_checkable
class SpliceSink(Protocol):
    def splice_write_fd(self) -> int | None: ...


def read_fd(stream: object) -> int | None:
    """The descriptor ``stream`` receives from, if nothing is buffered above it."""
    if isinstance(stream, SpliceSource):
        return stream.splice_read_fd()
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if isinstance(stream, trio.lowlevel.FdStream):
        return stream.fileno()
    if isinstance(stream, trio.StapledStream):
        return read_fd(stream.receive_stream)
    return None


def write_fd(stream: object) -> int | None:
    """The descriptor ``stream`` sends to."""
    if isinstance(stream, SpliceSink):
        return stream.splice_write_fd()
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if isinstance(stream, trio.lowlevel.FdStream):
        return stream.fileno()
    if isinstance(stream, trio.StapledStream):
        return write_fd(stream.send_stream)
    return None


def can_splice(src: int, dst: int) -> bool:
    """splice(2) needs a pipe on at least one end."""
    try:
        return stat.S_ISFIFO(os.fstat(src).st_mode) or stat.S_ISFIFO(os.fstat(dst).st_mode)
    except OSError:
        return False


class SpliceUnsupported(Exception):
    """These descriptors cannot be spliced; copy through user space instead."""


async def splice_some(src: int, dst: int, max_bytes: int) -> int:
    """Move up to ``max_bytes`` from ``src`` to ``dst``; 0 when ``src`` is at EOF.

    Splices again while both sides are ready (no trio round per pipe-full),
    and waits, with trio, for whichever side is not ready. An OSError says
    one side broke; SpliceUnsupported that splice cannot join the two.
    """
    moved = 0
    source_ready = True  # until EAGAIN says otherwise
    while moved < max_bytes:
        try:
            n = os.splice(src, dst, max_bytes - moved, flags=_FLAGS)
        except BlockingIOError:
            if moved:
                return moved
            # EAGAIN does not say which end was not ready. Most often the
            # source has nothing yet; if it had, the destination is full.
            if source_ready:
                source_ready = False
                await trio.lowlevel.wait_readable(src)
            else:
                source_ready = True
                await trio.lowlevel.wait_writable(dst)
            continue
        except OSError as e:
            if moved:
                return moved  # the next call meets it again
            if e.errno in _UNSUPPORTED:
                raise SpliceUnsupported(str(e)) from e
            raise
        if n == 0:
            return moved  # EOF (0 if nothing came before it)
        moved += n
        source_ready = True
    return moved


def waiting_for_reader(src: int, dst: int) -> bool:
    """After a stall: True if the destination was not taking bytes (else the
    source had none to give)."""
    return _ready(src, select.POLLIN) and not _ready(dst, select.POLLOUT)


def _ready(fd: int, event: int) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    return any(ev & (event | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
