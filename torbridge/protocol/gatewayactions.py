"""What the cluster gateway (protocol/gateway.py) asks of the I/O layer, no I/O.

Each ``Action`` is carried out by transport/cluster.py, which reports back
with the gateway's events (``node_opened``, ``node_reply``, ``node_lost``,
``locations``...): the protocol of one request is in gateway.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from torbridge.protocol import messages as m


@dataclass(frozen=True)
class OpenNode:
    """Open ``node`` (connect, AUTH, VERSION ``version``, BYPASS) within the
    connect deadline; report ``node_opened`` or ``node_lost``."""

    node: str
    version: int
    bypass: tuple[str, ...]


@dataclass(frozen=True)
class ProbeNode:
    """Open ``node`` and close it again, in the background (nobody waits);
    report ``probe_done`` to the health object."""

    node: str
    version: int


@dataclass(frozen=True)
class ToNode:
    """Send ``message`` to ``node``; with ``reply``, read its next line and
    report ``node_reply``. A failure is reported with ``node_lost``."""

    node: str
    message: m.Message | None
    reply: bool = False


@dataclass(frozen=True)
class ToNodeBody:
    node: str
    data: bytes


@dataclass(frozen=True)
class NodeBodyStaged:
    """The transport holds the client's next ``length`` body bytes for
    ``node`` itself (moved there by the kernel, transport/fanout.py):
    deliver them; report ``node_sent`` or ``node_lost``, as for ToNodeBody."""

    node: str
    length: int


@dataclass(frozen=True)
class ReadNodeBody:
    """Read up to ``max_bytes`` of ``node``'s DATA body; report ``node_body``."""

    node: str
    max_bytes: int


@dataclass(frozen=True)
class CloseNode:
    node: str
    why: str


@dataclass(frozen=True)
class QueryLocations:
    """Ask the location log who has ``key``; report ``locations`` (or ``query_failed``)."""

    key: str


@dataclass(frozen=True)
class QueryWanted:
    """Ask git-annex which of ``nodes`` want ``key``; report ``wanted`` (or
    ``query_failed``)."""

    nodes: tuple[str, ...]
    key: str
    af: str | None


@dataclass(frozen=True)
class ReadClock:
    """Read the protocol clock (whole seconds); report ``clock``."""


@dataclass(frozen=True)
class ToClient:
    message: m.Message


@dataclass(frozen=True)
class ToClientBody:
    data: bytes


@dataclass(frozen=True)
class CutClient:
    """The GET body cannot be finished by any node: the client's connection
    is closed mid-body (docs/clusters.md says why that, and not padding)."""

    why: str


@dataclass(frozen=True)
class Record:
    """The proxy's location log: ``uuid`` has ``key`` now, or not."""

    key: str
    uuid: str
    present: bool


@dataclass(frozen=True)
class Log:
    """A line for the operator's log (never the client's)."""

    text: str


Action = (
    OpenNode
    | ProbeNode
    | ToNode
    | ToNodeBody
    | NodeBodyStaged
    | ReadNodeBody
    | CloseNode
    | QueryLocations
    | QueryWanted
    | ReadClock
    | ToClient
    | ToClientBody
    | CutClient
    | Record
    | Log
)
