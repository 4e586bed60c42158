"""Waiting on the peer while watching the client for a hang-up.

A session that waits on its peer (an answer, a body, a slot at a cap, the
refs to change) has nothing to read from its client meanwhile; a client
that leaves ends the wait at once instead of at the peer's deadline. The
waits here never raise for that: they return ``ClientLeft``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from torbridge.protocol.framing import LineEvent
from torbridge.server.watched import WatchedStream
from torbridge.transport.base import PeerChannel

# A peer silent this long (seconds) gets its client watched for a hang-up.
WATCH_CLIENT_AFTER = 0.5
T = TypeVar("T")


@dataclass(frozen=True)
class ClientLeft:
    """The client hung up while the session waited on its peer."""

    reason: str


async def receive_from_peer(
    watched: WatchedStream, channel: PeerChannel, deadline: float
) -> LineEvent | ClientLeft:
    """The peer's next event by ``deadline``, unless the client hangs up first.

    Most answers come at once, and watching costs a task and a
    cancellation (0.1-0.3 ms, a good part of a relayed round trip), so
    the watch starts only once the peer has been silent for a moment.
    That cancels and repeats ``receive_event``, which is safe for a
    StreamChannel: its FramedStream feeds the decoder only after a read
    returns (a PeerChannel must keep that true).
    """
    with trio.CancelScope(deadline=min(deadline, trio.current_time() + WATCH_CLIENT_AFTER)):
        return await channel.receive_event()
    with trio.fail_at(deadline):
        return await unless_client_leaves(watched, channel.receive_event)


async def unless_client_leaves(
    watched: WatchedStream,
    wait: Callable[[], Awaitable[T]],
    what: str = "the peer",
    reading: bool = True,
) -> T | ClientLeft:
    """``wait()`` (on the peer), unless the client hangs up first.

    The client has nothing to say meanwhile, so only its EOF or a broken
    stream is looked for; whatever it does send is kept for later reads.
    With ``reading`` False the client is not read at all (its DATA body
    is what ``wait`` reads): only a connection it closed is noticed.
    """
    left: list[ClientLeft] = []

    async def watch(scope: trio.CancelScope) -> None:
        why = await (watched.hung_up() if reading else watched.closed())
        left.append(ClientLeft(f"hung up while waiting for {what}: {why}"))
        scope.cancel()

    answer = await wait_beside(wait, watch)
    # An answer that came in time is used even if the client left as well.
    return answer[0] if answer is not None else left[0]


async def wait_beside(
    wait: Callable[[], Awaitable[T]],
    beside: Callable[[trio.CancelScope], Awaitable[None]],
) -> tuple[T] | None:
    """``wait()`` with ``beside`` running next to it; ``beside`` is cancelled
    once ``wait()`` returns, and may end the wait early by cancelling the
    scope it is given (then None). ``wait()``'s exceptions come out as
    themselves, not wrapped in the nursery's ExceptionGroup."""
    answer: list[T] = []
    failed: list[Exception] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(beside, nursery.cancel_scope)
        try:
            answer.append(await wait())
        except Exception as e:
            failed.append(e)
        finally:
            nursery.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return (answer[0],) if answer else None
