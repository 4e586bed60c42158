"""What the relay (protocol/relay.py) and the I/O layer say to each other, no I/O.

The relay is fed ``InEvent``s, one side's lines, and answers with ``Action``
objects, which the session (server/session.py) carries out in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torbridge.protocol import messages as m
from torbridge.protocol.framing import BadLine, EndOfStream, LineTooLong


class Side(enum.Enum):
    CLIENT = "client"
    PEER = "peer"


# --- actions: what the I/O layer must do -----------------------------------------


@dataclass(frozen=True)
class Send:
    to: Side
    message: m.Message


@dataclass(frozen=True)
class CopyBody:
    """Copy ``length`` body bytes from ``source`` to the other side, then call
    ``body_done``. If the destination fails, report it with ``side_lost`` and
    keep draining the source; if the source fails, report that instead."""

    source: Side
    length: int


@dataclass(frozen=True)
class DiscardBody:
    """Read and drop ``length`` body bytes from the client (no report)."""

    length: int


@dataclass(frozen=True)
class CheckAuth:
    """Check the token; answer with ``auth_accepted`` or ``auth_rejected``."""

    client_uuid: str
    token: str


@dataclass(frozen=True)
class OpenPeer:
    """Open the peer at ``version`` (no VERSION sent at 0), passing ``bypass``;
    answer with ``peer_opened`` or ``side_lost(Side.PEER, ...)``."""

    version: int
    bypass: tuple[str, ...]


@dataclass(frozen=True)
class ClosePeer:
    reason: str


@dataclass(frozen=True)
class RunService:
    """Run the git service in the proxy's own repository; the session ends after.

    Unless ``may_rewrite``, a push may not rewrite or delete a protected
    branch (protocol/gitaccess.py; server/pushguard.py enforces it)."""

    service: str
    may_rewrite: bool = False


@dataclass(frozen=True)
class RefuseService:
    """Make the client's git fail with ``reason``; the session ends after."""

    service: str
    reason: str


@dataclass(frozen=True)
class WatchRefs:
    """Wait until the proxy repository's refs change (since this session last
    heard of them), then answer with ``refs_changed``; or ``side_lost(Side.CLIENT)``
    if the client leaves meanwhile. No deadline: a remotedaemon waits for hours."""


@dataclass(frozen=True)
class Stored:
    """``uuids`` now have ``key`` (for the proxy's location log)."""

    key: str
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class Removed:
    """``uuids`` no longer have ``key`` (for the proxy's location log)."""

    key: str
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class EndSession:
    reason: str
    clean: bool = True
    linger: float = 0.0  # seconds to wait before closing (failed AUTH)


Action = (
    Send
    | CopyBody
    | DiscardBody
    | CheckAuth
    | OpenPeer
    | ClosePeer
    | RunService
    | RefuseService
    | WatchRefs
    | Stored
    | Removed
    | EndSession
)

InEvent = m.Message | BadLine | LineTooLong | EndOfStream
