"""A PUT body fanned out to a cluster's nodes by the kernel: tee(2) and splice(2).

The user-space fanout reads each piece of the client's body into Python
and writes it to every node: one read and N writes of every byte. Here the
bytes stay in the kernel. Each round:

1. the client's pipe is the source; a client on a socket (tor) has its
   bytes spliced into an *inlet* pipe of ours first, since tee(2) joins
   pipes only;
2. ``tee`` duplicates the source's next bytes into one *stage* pipe per
   node, all of them empty, so every stage takes the same ``n`` bytes
   (tee cannot go on part-way into a pipe, so a stage must never hold a
   part of an earlier round when the next is teed);
3. those ``n`` bytes are spliced out of the source into /dev/null;
4. each node's stage is spliced into the node's pipe or socket at that
   node's pace (transport/cluster.py carries this out as the gateway's
   ``NodeBodyStaged`` actions, so the gateway sees the same per-node body
   events, failures and drops as with the user-space copy).

At the first trouble (a short tee, an errno that says splice cannot join
two descriptors) the stages are emptied, whatever the inlet already took
from the client goes on through the user-space fanout, and the rest of the
body follows it there (``usable`` turns False), as the single path does
(transport/kernelcopy.py's ``KernelCopy``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import trio

from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.process import PIPES

log = logging.getLogger("torbridge.cluster")

_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
# errnos that say splice cannot join these two descriptors (not that one broke)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

_libc = ctypes.CDLL(None, use_errno=True)
_tee = getattr(_libc, "tee", None)
if _tee is not None:
    _tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    _tee.restype = ctypes.c_ssize_t


def tee(src: int, dst: int, length: int) -> int:
    """tee(2), never blocking: bytes duplicated (0: ``src`` is empty at EOF).

    BlockingIOError when ``src`` is empty or ``dst`` full; OSError else.
    """
    if _tee is None:
        raise OSError(errno.ENOSYS, "tee(2) is not available")
    n = _tee(src, dst, length, _NONBLOCK)
    if n < 0:
        e = ctypes.get_errno()
        if e == errno.EAGAIN:
            raise BlockingIOError(e, os.strerror(e))
        raise OSError(e, os.strerror(e))
    return int(n)


def is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class FanoutTrouble(Exception):
    """The kernel cannot (or can no longer) fan this body out."""


class _Woken(Exception):
    """The source had nothing after all."""


class Stage:
    """A pipe of ours: a node's bytes of the current round, or the client's inlet."""

    def __init__(self, sink: int | None = None) -> None:
        self.sink = sink  # the node's descriptor this stage goes to
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.large = PIPES.enlarge([self.w])
        self.capacity = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        self.held = 0  # bytes in the pipe

    def discard(self, null: int) -> None:
        """Empty the pipe (its bytes are copies, or already given up)."""
        while self.held:
            try:
                n = os.splice(self.r, null, self.held, flags=_NONBLOCK)
            except OSError:
                n = 0
            if not n:
                break
            self.held -= n
        if self.held:  # cannot happen with /dev/null; read them out all the same
            while self.held and (data := _read_some(self.r, self.held)):
                self.held -= len(data)

    def close(self) -> None:
        large, self.large = self.large, 0
        PIPES.release(large)
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held = 0


def _read_some(fd: int, n: int) -> bytes:
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return b""


async def deliver(stage: Stage, framed: FramedStream, length: int) -> None:
    """Move ``length`` bytes of ``stage`` into the node's descriptor, at its pace.

    Where splice cannot join the two, they go through user space
    (``framed.send_body``). StreamLost when the node's end broke.
    """
    fd = stage.sink
    left = length
    while left:
        if fd is not None:
            try:
                n = os.splice(stage.r, fd, left, flags=_NONBLOCK | _MOVE)
            except BlockingIOError:  # the stage holds bytes: the node's end is full
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as e:
                if e.errno in _UNSUPPORTED:
                    fd = None
                    continue
                raise StreamLost(e.strerror or str(e)) from e
            if not n:  # our own pipe does not end: the node's side did
                raise StreamLost("closed")
            framed.spliced_out(n)
        else:
            data = _read_some(stage.r, left)
            if not data:
                raise StreamLost("staged bytes went missing")  # a bug: never lose bytes silently
            n = len(data)
            stage.held -= n
            left -= n
            await framed.send_body(data)
            continue
        stage.held -= n
        left -= n


class FanoutSink(Protocol):
    """What the fanout needs of the cluster channel (transport/cluster.py)."""

    def fanout_takers(self) -> Mapping[str, FramedStream] | None:
        """The nodes that take the whole next piece (with their streams), or None."""

    async def fanout_staged(self, length: int) -> None:
        """``length`` bytes are staged for every taker: deliver them (the
        gateway's NodeBodyStaged); returns when each took them or was dropped."""

    async def send_body(self, data: bytes) -> None:
        """The user-space fanout."""


@runtime_checkable
class KernelFanoutCapable(Protocol):
    def kernel_fanout(self, src: FramedStream) -> BodyFanout | None: ...


class BodyFanout:
    """One PUT body from the client's descriptor to every node, by tee and splice.

    Used by server/bodycopy.py's ``copy_body`` like a ``KernelCopy``: ``move``
    returns the bytes taken from the client and delivered (0: not now, or
    never again once ``usable`` is False; the user-space copy goes on).
    """

    def __init__(self, src: FramedStream, sink: FanoutSink) -> None:
        self.src = src
        self.sink = sink
        self.usable = True
        self.moved = 0  # body bytes fanned out by the kernel
        self.rounds = 0
        self.stages: dict[str, Stage] = {}
        self._inlet: Stage | None = None  # a client on a socket: its bytes go here first
        self._client: int | None = None  # the client's descriptor
        self._null: int | None = None

    # --- the session's side ---------------------------------------------------------

    async def move(self, max_bytes: int) -> int:
        if not self.usable:
            return 0
        takers = self.sink.fanout_takers()
        if takers is None:
            return 0  # this piece is for user space (an offset ahead, the PUT over)
        # Once the kernel took a first piece, nothing else reads the client
        # during the body: its descriptor is asked for once.
        fd = self._client if self._client is not None else self.src.splice_source()
        if fd is None:
            return 0  # not yet: the client's bytes are buffered above it
        try:
            if not self._prepare(fd, takers):
                return 0  # not yet: a node's DATA line is held
        except (FanoutTrouble, OSError) as e:
            self._give_up(f"cannot set up: {e}")
            return 0
        if self._inlet is None:
            return await self._from_pipe(fd, takers, max_bytes)
        return await self._from_socket(fd, takers, max_bytes)

    def waiting_for_reader(self) -> bool:
        # The nodes' waits are the cluster's (each under its own deadline,
        # shielded): only the wait for the client is ever cut short.
        return False

    def close(self) -> None:
        for stage in self.stages.values():
            stage.close()
        self.stages.clear()
        if self._inlet is not None:
            self._inlet.close()
            self._inlet = None
        if self._null is not None:
            os.close(self._null)
            self._null = None
        self.usable = False

    def stage(self, node: str) -> Stage | None:
        return self.stages.get(node)

    def drop(self, node: str) -> None:
        """``node`` left the body: its staged bytes go nowhere."""
        stage = self.stages.pop(node, None)
        if stage is not None:
            stage.close()

    # --- the rounds ---------------------------------------------------------------

    def _prepare(self, fd: int, takers: Mapping[str, FramedStream]) -> bool:
        """Stages for ``takers``; False while a node cannot be spliced to yet."""
        for name, framed in takers.items():
            if name not in self.stages and framed.splice_sink() is None:
                return False  # its DATA line is held for its first piece
        if self._client is None:
            if _tee is None:
                raise FanoutTrouble("no tee(2)")
            self._client = fd
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            if not is_pipe(fd):
                self._inlet = Stage()
        elif fd != self._client:
            raise FanoutTrouble("the client's descriptor changed")
        for name, framed in takers.items():
            if name not in self.stages:
                self.stages[name] = Stage(framed.splice_sink())
        for name in [n for n in self.stages if n not in takers]:
            self.drop(name)  # a node dropped meanwhile
        return True

    def _ordered(self, takers: Mapping[str, FramedStream]) -> list[Stage]:
        # The smallest stage first: the first tee takes what every stage can.
        return sorted((self.stages[n] for n in takers), key=lambda s: s.capacity)

    async def _from_pipe(self, fd: int, takers: Mapping[str, FramedStream], max_bytes: int) -> int:
        await trio.lowlevel.wait_readable(fd)  # the only wait the session may cut short
        try:
            n = self._tee_round(fd, self._ordered(takers), max_bytes)
        except _Woken:
            return 0  # woken for nothing: the session asks again
        except FanoutTrouble as e:
            self._give_up(str(e))
            return 0
        if not n:
            self.usable = False  # EOF: the user-space read says so
            return 0
        self.src.spliced_in(n)
        await self._staged(n)
        return n

    async def _from_socket(
        self, sock: int, takers: Mapping[str, FramedStream], max_bytes: int
    ) -> int:
        inlet = self._inlet
        assert inlet is not None and self._null is not None
        await trio.lowlevel.wait_readable(sock)  # the only wait the session may cut short
        try:
            pulled = os.splice(sock, inlet.w, min(max_bytes, inlet.capacity), flags=_NONBLOCK)
        except BlockingIOError:
            return 0  # woken for nothing: the session asks again
        except OSError as e:
            self._give_up(f"splice from the client: {e}")
            return 0
        if not pulled:
            self.usable = False  # EOF: the user-space read says so
            return 0
        inlet.held += pulled
        self.src.spliced_in(pulled)
        # Everything the inlet took goes out in this call, by tee or, at
        # the first trouble, through user space.
        while inlet.held:
            takers_now = self.sink.fanout_takers()
            if takers_now is None:
                await self._rest_by_copy("a node's offset changed")
                break
            try:
                if not self._prepare(sock, takers_now):
                    raise FanoutTrouble("a node's stream changed")
                n = self._tee_round(inlet.r, self._ordered(takers_now), inlet.held)
            except _Woken:
                await self._rest_by_copy("tee found the inlet empty")
                break
            except (FanoutTrouble, OSError) as e:
                await self._rest_by_copy(str(e))
                break
            if not n:
                await self._rest_by_copy("tee took nothing from the inlet")
                break
            inlet.held -= n
            await self._staged(n)
            if not self.usable:
                await self._rest_by_copy("the fanout ended")
                break
        return pulled

    def _tee_round(self, source: int, stages: list[Stage], limit: int) -> int:
        """Duplicate the source's next bytes into every (empty) stage, then
        take them out of the source; how many (0: the source is at EOF).
        No wait in here: the session cannot cut a round in two."""
        assert self._null is not None
        first, *rest = stages
        limit = min(limit, first.capacity)
        try:
            n = tee(source, first.w, limit)
        except BlockingIOError:
            raise _Woken from None
        except OSError as e:
            raise FanoutTrouble(f"tee: {e}") from e
        if not n:
            return 0
        first.held = n
        for stage in rest:
            try:
                got = tee(source, stage.w, n)
            except OSError as e:
                got, why = 0, str(e)
            else:
                why = f"tee duplicated {got} of {n} bytes"
            stage.held = got
            if got != n:
                self._empty_stages()
                raise FanoutTrouble(why)
        taken = 0
        while taken < n:  # the source holds at least n: /dev/null takes them all
            try:
                k = os.splice(source, self._null, n - taken, flags=_NONBLOCK | _MOVE)
            except OSError as e:
                # The stages hold copies of bytes still in the source: a copy
                # of what is left would send some twice. This cannot happen
                # with a pipe we read alone; say so loudly.
                self._empty_stages()
                raise FanoutTrouble(f"cannot take teed bytes from the source: {e}") from e
            if not k:
                self._empty_stages()
                raise FanoutTrouble("the source lost teed bytes")
            taken += k
        self.rounds += 1
        return n

    async def _staged(self, n: int) -> None:
        """Every taker takes its ``n`` staged bytes or is dropped. A broken
        cluster (StreamLost) ends the kernel fanout; the bytes count as
        taken from the client all the same (the cluster failed the PUT)."""
        try:
            await self.sink.fanout_staged(n)
        except StreamLost as e:
            self._give_up(f"the cluster broke: {e}")
            return
        self.moved += n
        for name, stage in list(self.stages.items()):
            if stage.held:  # cannot happen: each took its bytes or was dropped
                log.error("kernel fanout: %d bytes left staged for %s", stage.held, name)
                self._give_up("bytes left staged")

    async def _rest_by_copy(self, why: str) -> None:
        """What the inlet holds goes through the user-space fanout; the rest too."""
        inlet = self._inlet
        assert inlet is not None
        if self.usable:
            log.info("kernel fanout ends: %s", why)
        self.usable = False
        # Bytes taken from the inlet are nowhere else: shielded from the
        # session's waits (the cluster bounds its own).
        with trio.CancelScope(shield=True):
            while inlet.held:
                data = _read_some(inlet.r, inlet.held)
                if not data:
                    raise StreamLost("the inlet lost bytes")  # a bug: never lose bytes silently
                inlet.held -= len(data)
                await self.sink.send_body(data)

    def _empty_stages(self) -> None:
        assert self._null is not None
        for stage in self.stages.values():
            stage.discard(self._null)

    def _give_up(self, why: str) -> None:
        log.info("kernel fanout ends: %s", why)
        if self._null is not None:
            self._empty_stages()
        self.usable = False
