"""The one interface between a session and whatever serves its endpoint.

A ``Transport`` knows how to reach one peer: a local ``git-annex-shell
p2pstdio``, a tor-annex node through SOCKS5, a ``git-annex-p2p-NET``
program, a cluster of those. ``open`` returns a ``PeerChannel`` that has
already been through AUTH and VERSION (protocol/handshake.py), so the relay (server/session.py)
talks to every kind of peer the same way.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.framing import LineEvent
from torbridge.protocol.handshake import Handshake, HandshakeFailed
from torbridge.protocol.permissions import Mode
from torbridge.transport.framed import FramedStream, StreamLost


class PeerUnavailable(Exception):
    """The peer could not be reached or refused us; the text says why."""


@dataclass(frozen=True)
class SessionInfo:
    """What a transport may need to know of the client's session."""

    client_uuid: str
    mode: Mode


class PeerChannel(abc.ABC):
    """An open P2P conversation with a peer, past AUTH and VERSION."""

    uuid: str
    version: int

    @abc.abstractmethod
    async def send(self, message: m.Message) -> None: ...

    @abc.abstractmethod
    async def send_body(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def receive_event(self) -> LineEvent: ...

    @abc.abstractmethod
    async def receive_body(self, max_bytes: int) -> bytes: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; must not block for long and must not raise."""

    def framed_stream(self) -> FramedStream | None:
        """The byte stream under the channel, where bodies may bypass it."""
        return None


class Transport(abc.ABC):
    name: str  # for logs and the client's error texts
    uuid: str  # the UUID the peer must announce
    # The highest P2P version the peer agrees to, where it is known without
    # opening the peer (then a client's VERSION is answered without it); None:
    # VERSION opens the peer to ask (relay.Relay's peer_max_version).
    known_max_version: int | None = None

    @abc.abstractmethod
    async def open(
        self,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> PeerChannel:
        """Reach the peer and negotiate; raise PeerUnavailable on failure.

        ``nursery`` may hold helper tasks that live as long as the channel.
        """


class StreamChannel(PeerChannel):
    """A peer spoken to over a byte stream (a pipe pair or a socket)."""

    def __init__(self, framed: FramedStream, uuid: str, version: int) -> None:
        self.framed = framed
        self.uuid = uuid
        self.version = version

    async def send(self, message: m.Message) -> None:
        await self.framed.send(message)

    async def send_body(self, data: bytes) -> None:
        await self.framed.send_body(data)

    async def receive_event(self) -> LineEvent:
        return await self.framed.receive_event()

    async def receive_body(self, max_bytes: int) -> bytes:
        return await self.framed.receive_body(max_bytes)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.framed.aclose()

    def framed_stream(self) -> FramedStream | None:
        return self.framed


async def negotiate(
    framed: FramedStream,
    name: str,
    expected_uuid: str,
    version: int,
    bypass: tuple[str, ...],
    auth: m.Auth | None,
) -> int:
    """Carry out protocol/handshake.py's ``Handshake`` over ``framed``.

    AUTH (unless the peer speaks first, as git-annex-shell does), VERSION,
    BYPASS; returns the version the peer agreed to.
    """
    handshake = Handshake(name, expected_uuid, version, bypass, auth)
    try:
        for message in handshake.start():
            await framed.send(message)
        while not handshake.done:
            for message in handshake.receive(await framed.receive_event()):
                await framed.send(message)
    except HandshakeFailed as e:
        raise PeerUnavailable(str(e)) from None
    except StreamLost as e:
        raise PeerUnavailable(f"{name}: {e}") from e
    return handshake.agreed
