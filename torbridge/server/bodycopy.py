"""A session's DATA bodies: copied from one side to the other, or drained.

The relay (protocol/relay.py) says which body moves where (``CopyBody``,
``DiscardBody``); this carries it out for the session (server/session.py)
under the stall deadlines, through the kernel (transport/kernelcopy.py,
transport/fanout.py) where both ends allow it, else through user space.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from torbridge.config import Limits
from torbridge.protocol import relay as r
from torbridge.protocol import relayactions as ra
from torbridge.protocol.relayactions import Side
from torbridge.transport.base import PeerChannel
from torbridge.transport.fanout import BodyFanout
from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.kernelcopy import KernelCopy

# The session's logger: these lines are the session's.
log = logging.getLogger("torbridge.session")

BODY_CHUNK = 256 * 1024
SPLICE_CHUNK = 4 << 20  # bytes moved in the kernel per deadline check


class Carrier(Protocol):
    """What a body copy needs of its session (server/session.py)."""

    id: int
    relay: r.Relay
    client: FramedStream
    limits: Limits

    def channel(self, side: Side) -> FramedStream | PeerChannel | None: ...

    def stall(self, side: Side) -> float: ...

    async def lost(
        self, side: Side, reason: str, header_unsent: bool = False, retry: bool = True
    ) -> list[ra.Action]: ...

    async def perform(self, action: ra.Action) -> list[ra.Action]: ...


async def copy_body(carrier: Carrier, source: Side, length: int) -> list[ra.Action]:
    """Copy one DATA body of ``length`` bytes from ``source`` to the other
    side, under each side's stall deadline; the relay's next actions.

    A destination that fails is reported and the source drained to the end
    of the body; a source that fails or stalls is reported at once."""
    src = carrier.channel(source)
    dst_side = Side.PEER if source is Side.CLIENT else Side.CLIENT
    assert src is not None
    remaining = length
    kernel: KernelCopy | BodyFanout | None = None
    # Since when nothing moved, and until when the kernel copy waits
    # before it finds out which side holds it up.
    still_since = trio.current_time()
    check_at = still_since + min(carrier.stall(source), carrier.stall(dst_side))
    while remaining:
        dst = carrier.channel(dst_side)
        if dst is not None and kernel is None:
            kernel = KernelCopy.between(src, dst)
        if dst is not None and kernel is not None and kernel.usable:
            with trio.move_on_at(check_at) as waited:
                moved = await kernel.move(min(remaining, SPLICE_CHUNK))
            if waited.cancelled_caught:
                stuck = dst_side if kernel.waiting_for_reader() else source
                check_at = still_since + carrier.stall(stuck)
                if trio.current_time() < check_at:
                    continue  # the side holding it up has longer: wait on
                if stuck is source:
                    return await carrier.lost(source, "stalled inside a DATA body")
                follow = await carrier.lost(dst_side, "not reading")
                if any(isinstance(a, ra.EndSession) for a in follow):
                    return follow
                for action in follow:  # ClosePeer: carried out now, draining goes on
                    await carrier.perform(action)
                continue
            if moved:
                remaining -= moved
                still_since = trio.current_time()
                check_at = still_since + min(carrier.stall(source), carrier.stall(dst_side))
                continue
            # Not spliceable after all, or a side broke: the copy below
            # meets the same and says whose it is.
        try:
            with trio.fail_after(carrier.stall(source)):
                chunk = await src.receive_body(min(remaining, BODY_CHUNK))
        except (trio.TooSlowError, StreamLost) as e:
            reason = str(e) or "stalled inside a DATA body"
            unsent = source is Side.PEER and carrier.client.discard_held()
            return await carrier.lost(source, reason, header_unsent=unsent)
        remaining -= len(chunk)
        dst = carrier.channel(dst_side)
        if dst is None:
            continue  # the destination failed: drain the rest, then the relay says so
        try:
            with trio.fail_after(carrier.stall(dst_side)):
                await dst.send_body(chunk)
        except (trio.TooSlowError, StreamLost) as e:
            follow = await carrier.lost(dst_side, str(e) or "not reading")
            if any(isinstance(a, ra.EndSession) for a in follow):
                return follow
            for action in follow:  # ClosePeer: carried out now, draining goes on
                await carrier.perform(action)
        still_since = trio.current_time()
        check_at = still_since + min(carrier.stall(source), carrier.stall(dst_side))
    if kernel is not None and kernel.moved:
        log.debug("[%d] %d of %d body bytes moved by splice", carrier.id, kernel.moved, length)
    return carrier.relay.body_done()


async def discard_body(carrier: Carrier, length: int) -> list[ra.Action]:
    """Read and drop ``length`` body bytes from the client."""
    remaining = length
    while remaining:
        try:
            with trio.fail_after(carrier.limits.client_stall):
                remaining -= len(await carrier.client.receive_body(min(remaining, BODY_CHUNK)))
        except (trio.TooSlowError, StreamLost) as e:
            return await carrier.lost(Side.CLIENT, str(e) or "stalled")
    return []
