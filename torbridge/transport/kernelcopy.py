"""One DATA body from one stream's descriptor to another's by splice(2).

The session (server/session.py, server/bodycopy.py) tries this first for
every body it copies; a cluster's PUT body goes to every node by
transport/fanout.py instead.
"""

from __future__ import annotations

from torbridge.transport import splice
from torbridge.transport.base import PeerChannel
from torbridge.transport.fanout import BodyFanout, KernelFanoutCapable
from torbridge.transport.framed import FramedStream


class KernelCopy:
    """A DATA body from one side's descriptor to the other's by splice(2).

    The first piece always goes through user space, with the DATA line
    that was held for it; the rest moves in the kernel where a pipe is on
    one end (transport/splice.py). ``usable`` turns False for good at the
    first trouble, and the copy goes on through user space.
    """

    def __init__(self, src: FramedStream, dst: FramedStream) -> None:
        self.src = src
        self.dst = dst
        self.usable = True
        self.moved = 0  # bytes the kernel moved
        self._fds: tuple[int, int] | None = None

    @classmethod
    def between(
        cls, src: FramedStream | PeerChannel, dst: FramedStream | PeerChannel
    ) -> KernelCopy | BodyFanout | None:
        if isinstance(src, FramedStream) and isinstance(dst, KernelFanoutCapable):
            return dst.kernel_fanout(src)  # a cluster: to every node (transport/fanout.py)
        s = src if isinstance(src, FramedStream) else src.framed_stream()
        d = dst if isinstance(dst, FramedStream) else dst.framed_stream()
        return None if s is None or d is None else cls(s, d)

    async def move(self, max_bytes: int) -> int:
        """Bytes moved; 0 when it cannot (or can no longer) be used."""
        if self._fds is None:
            src_fd, dst_fd = self.src.splice_source(), self.dst.splice_sink()
            if src_fd is None or dst_fd is None:
                return 0  # not yet: a DATA line is held, or bytes are buffered
            if not splice.can_splice(src_fd, dst_fd):
                self.usable = False
                return 0
            self._fds = (src_fd, dst_fd)
        try:
            moved = await splice.splice_some(*self._fds, max_bytes)
        except (splice.SpliceUnsupported, OSError):
            moved = 0
        if not moved:
            self.usable = False
            return 0
        self.src.spliced_in(moved)
        self.dst.spliced_out(moved)
        self.moved += moved
        return moved

    def waiting_for_reader(self) -> bool:
        return self._fds is not None and splice.waiting_for_reader(*self._fds)
