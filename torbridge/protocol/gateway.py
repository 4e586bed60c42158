"""A cluster gateway as a state machine with no I/O.

One ``Gateway`` stands in for one peer of one client session: the relay
(protocol/relay.py) drives it as it drives any peer, and the gateway
spreads each request over the cluster's nodes. It is fed events (the
client's lines and body bytes, the nodes' replies and bodies, a node lost,
the location log's answers, a clock reading) and answers with actions that
the I/O layer (transport/cluster.py) carries out; it never looks at I/O.
The actions are protocol/gatewayactions.py, node health
protocol/nodehealth.py, the choices and the answers' arithmetic
protocol/cluster.py. The state machine stays whole here (some 950 lines):
every request's phases share one per-node bookkeeping (open, busy, queued,
waited for) and one answer queue, and read best side by side.

The protocol of one request, as the I/O layer sees it:

- every action a method returns is carried out; node actions for different
  nodes may run concurrently, and each reports back with exactly one event
  (``node_opened``/``node_reply``/``node_body``/``node_lost``...);
- the gateway never has more than one action outstanding per node;
- ``answer_ready`` says when the client's next line is queued
  (``ToClient``), and ``ToClientBody`` carries GET body bytes.

The decisions: which node serves a GET or CHECKPRESENT (cheapest logged
holder first, protocol/cluster.py), where a PUT goes and from which offset
each node takes it, REMOVE to every node and the ``-PLUS`` answers, the
clock translation for REMOVE-BEFORE, BYPASS, failover (a GET whose node is
lost mid-body goes on from the next holder at the offset already sent), and
node health (``NodeHealth``, protocol/nodehealth.py: a node that failed is
skipped by later sessions until a probe finds it answering again).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torbridge.protocol import cluster as c
from torbridge.protocol import messages as m
from torbridge.protocol.clienttext import CONNECTION_LOST, relayed_error
from torbridge.protocol.gatewayactions import (
    Action,
    CloseNode,
    CutClient,
    Log,
    NodeBodyStaged,
    OpenNode,
    ProbeNode,
    QueryLocations,
    QueryWanted,
    ReadClock,
    ReadNodeBody,
    Record,
    ToClient,
    ToClientBody,
    ToNode,
    ToNodeBody,
)
from torbridge.protocol.nodehealth import NodeHealth
from torbridge.protocol.versions import Feature, supports


class Phase(enum.Enum):
    IDLE = "idle"
    CHECKPRESENT = "checkpresent"
    REMOVE = "remove"
    TIMESTAMP = "timestamp"
    GET_START = "get start"  # looking for a node to answer DATA
    GET_BODY = "get body"
    GET_VALIDITY = "get validity"  # the body is through: VALID/INVALID owed
    GET_VERDICT = "get verdict"  # the client's SUCCESS/FAILURE goes to the node
    PUT_OFFERS = "put offers"  # the nodes' answers to PUT
    PUT_DATA = "put data"  # the client was told PUT-FROM: its DATA comes next
    PUT_BODY = "put body"
    PUT_VALIDITY = "put validity"  # the body is through: the client's VALID next
    PUT_RESULTS = "put results"  # the nodes' SUCCESS/FAILURE
    DONE = "done"  # answered; the next client line starts a request


@dataclass(frozen=True)
class Node:
    """One node as the gateway sees it."""

    ref: c.NodeRef
    # For the same cluster reached through another gateway: that gateway's
    # repository UUID (BYPASS naming it keeps the node out: no loops).
    gateway: str | None = None

    @property
    def name(self) -> str:
        return self.ref.name


class GatewayError(Exception):
    """An event the gateway did not ask for (a bug in the I/O layer)."""


@dataclass
class _Get:
    key: str
    af: str | None
    offset: int  # the client's
    candidates: list[str]
    why: list[str] = field(default_factory=list)
    node: str | None = None  # serving now
    length: int | None = None  # the DATA the client was told
    sent: int = 0  # body bytes passed on
    want: int = 0  # the client waits for up to this many bytes (0: not waiting)
    served_by: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Pending:
    """Placeholder queued behind an OpenNode: what the node is told depends
    on the version it agrees to (REMOVE-BEFORE, GETTIMESTAMP)."""

    node: str


class Gateway:
    """One client session's view of the cluster (see the module docstring)."""

    def __init__(
        self,
        name: str,
        version: int,
        nodes: Sequence[Node],
        own_uuid: str,
        bypass: Sequence[str] = (),
        members: frozenset[str] = frozenset(),
        health: NodeHealth | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.nodes = list(nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self.bypass = {*bypass, own_uuid}
        self.members = frozenset(members).union(
            *(n.ref.behind for n in self.nodes),
            (n.ref.uuid for n in self.nodes if n.gateway is None),
        )
        self.health = health if health is not None else NodeHealth([n.name for n in self.nodes])
        self.rng = rng or random.Random()
        self.now = 0.0  # the health clock, as last read by the I/O layer
        self.phase = Phase.IDLE
        self.open: dict[str, int] = {}  # node -> the version it agreed to
        self._busy: set[str] = set()  # nodes with an action outstanding
        self._answers: list[m.Message] = []
        self._timestamps = c.TimestampMap()
        # The request in progress.
        self._request: m.Message | None = None
        self._get: _Get | None = None
        self._put: c.PutFanout | None = None
        self._put_key = ""
        self._put_request: m.Put | None = None
        self._body_left = 0
        self._replies: dict[str, m.Message | str] = {}
        self._clocks: dict[str, int] = {}
        self._waiting: set[str] = set()  # nodes whose answer the step waits for
        self._queued: dict[str, list[Action | _Pending]] = {}  # a node's next, once open
        self._put_logged: frozenset[str] = frozenset()
        self._remove_now = 0  # the protocol clock when a REMOVE-BEFORE came

    # --- what the I/O layer asks ---------------------------------------------------

    @property
    def _validity(self) -> bool:
        """Whether this conversation has VALID/INVALID after a DATA body."""
        return supports(self.version, Feature.VALIDITY)

    @property
    def answer_ready(self) -> bool:
        return bool(self._answers)

    def take_answer(self) -> m.Message:
        return self._answers.pop(0)

    @property
    def answer_due(self) -> bool:
        """A client line is owed: the I/O layer works until ``answer_ready``."""
        return self.phase in (
            Phase.CHECKPRESENT,
            Phase.REMOVE,
            Phase.TIMESTAMP,
            Phase.GET_START,
            Phase.GET_VALIDITY,
            Phase.PUT_OFFERS,
            Phase.PUT_RESULTS,
        ) or bool(self._answers)

    @property
    def busy(self) -> frozenset[str]:
        return frozenset(self._busy)

    def at(self, now: float) -> Gateway:
        """The health clock's reading, for the event that follows."""
        self.now = now
        return self

    # --- events from the client ---------------------------------------------------

    def client_message(self, message: m.Message) -> list[Action]:
        if isinstance(message, m.Bypass):
            self.bypass.update(message.uuids)
            return []
        if isinstance(message, m.UnlockContent):
            return []  # LOCKCONTENT is always refused: nothing is held
        if self.phase is Phase.PUT_DATA and isinstance(message, m.Data):
            return self._put_data(message.length)
        if self.phase is Phase.PUT_DATA and isinstance(message, m.DataPresent):
            return self._put_tell(message)
        if self.phase is Phase.PUT_VALIDITY and isinstance(message, (m.Valid, m.Invalid)):
            return self._put_tell(message)
        if isinstance(message, (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus)):
            # The client's verdict on a GET: for the node that served it.
            return self._get_verdict(message) if self.phase is Phase.GET_VERDICT else []
        return self._start(message)

    def client_body(self, data: bytes) -> list[Action]:
        put = self._put
        if self.phase is not Phase.PUT_BODY or put is None:
            return []  # the PUT failed early: the body is only drained
        pieces = put.slices(data)
        out: list[Action] = [
            ToNodeBody(name, piece) for name, piece in pieces.items() if name in self.open
        ]
        return out + self._body_counted(len(data))

    def whole_body_takers(self) -> tuple[str, ...] | None:
        """The nodes that take the whole of the client's next body piece, when
        every node still sent to does (no PUT-FROM offset ahead of the body's
        position); None otherwise, or when no body is being fanned out.

        For a transport that moves the piece to them itself (``client_body_staged``).
        """
        put = self._put
        if self.phase is not Phase.PUT_BODY or put is None:
            return None
        takers = tuple(name for name in put.offsets if name in self.open)
        if not takers or any(put.offsets[name] > put.position for name in takers):
            return None
        return takers

    def client_body_staged(self, length: int) -> list[Action]:
        """As ``client_body``, for ``length`` bytes the transport moved for
        ``whole_body_takers`` itself: the same accounting, with
        NodeBodyStaged in place of ToNodeBody."""
        takers = self.whole_body_takers()
        put = self._put
        if takers is None or put is None:
            raise GatewayError("no body to stage")
        put.position += length
        out: list[Action] = [NodeBodyStaged(name, length) for name in takers]
        return out + self._body_counted(length)

    def _body_counted(self, length: int) -> list[Action]:
        self._body_left -= length
        out: list[Action] = []
        if self._body_left <= 0:
            if self._validity:
                self.phase = Phase.PUT_VALIDITY
            else:
                # No VALID below v1: the results come now.
                out.extend(self._put_read_results())
        return out

    def client_wants_body(self, max_bytes: int) -> list[Action]:
        get = self._get
        if self.phase is not Phase.GET_BODY or get is None or get.length is None:
            raise GatewayError("no GET body in progress")
        get.want = max(1, min(max_bytes, get.length - get.sent))
        if get.node is None or get.node in self._busy:
            return []  # a failover is under way: its DATA brings the bytes
        return self._read_body(get)

    # --- events from the nodes ---------------------------------------------------------

    def node_opened(self, name: str, version: int) -> list[Action]:
        self._busy.discard(name)
        self.open[name] = version
        self.health.succeeded(name)
        return self._run_queued(name)

    def node_lost(self, name: str, why: str, told: str = CONNECTION_LOST) -> list[Action]:
        """``name`` failed: could not be opened, stalled, closed, broke the protocol.

        ``why`` is for the log (it may name an onion or a path), ``told`` is
        what the client may hear of it."""
        self._busy.discard(name)
        self._queued.pop(name, None)
        was_open = self.open.pop(name, None) is not None
        self.health.failed(name, why, self.now)
        said = f"node {name} {why}" if why.startswith("unreachable") else f"node {name} lost: {why}"
        out: list[Action] = [Log(said)]
        if was_open:
            out.append(CloseNode(name, why))
        return out + self._lost_in_step(name, told)

    def node_sent(self, name: str) -> list[Action]:
        """A ``ToNode`` without reply (or a ``ToNodeBody``) went out."""
        self._busy.discard(name)
        return self._run_queued(name)

    def node_reply(self, name: str, reply: m.Message) -> list[Action]:
        self._busy.discard(name)
        if isinstance(reply, m.Error):
            told = relayed_error(name, reply)
            if told is not reply:
                return [Log(f"node {name} said ERROR {reply.text}"), *self._reply(name, told)]
        return self._reply(name, reply)

    def node_body(self, name: str, data: bytes) -> list[Action]:
        self._busy.discard(name)
        get = self._get
        if get is None or get.node != name or get.length is None:
            raise GatewayError(f"body from {name} unasked")
        if not data:
            return self.node_lost(name, "connection closed mid-body", "connection closed")
        get.sent += len(data)
        get.want = 0
        out: list[Action] = [ToClientBody(data)]
        if get.sent >= get.length:
            out.extend(self._get_body_done())
        return out

    def probe_done(self, name: str, ok: bool, why: str = "") -> None:
        if ok:
            self.health.succeeded(name)
        elif why == "cancelled":
            self.health.probe_abandoned(name)
        else:
            self.health.failed(name, why, self.now)

    # --- events from the proxy's own knowledge ------------------------------------------

    def locations(self, logged: frozenset[str]) -> list[Action]:
        request = self._request
        if isinstance(request, m.CheckPresent):
            return self._checkpresent(request.key, logged)
        if isinstance(request, m.Get):
            return self._get_start(request, logged)
        if isinstance(request, m.Put):
            return self._put_targets(request, logged)
        raise GatewayError("locations unasked")

    def wanted(self, wanted: Mapping[str, bool]) -> list[Action]:
        if self._put_request is None or self.phase is not Phase.PUT_OFFERS:
            raise GatewayError("preferred content unasked")
        return self._put_offer_to(self._put_request, wanted)

    def query_failed(self, what: str, text: str) -> list[Action]:
        """A ``QueryLocations`` (``what`` "locations") or ``QueryWanted``
        ("wanted") failed; ``text`` says why, for the log."""
        if self._put_request is not None and self.phase is Phase.PUT_OFFERS and what == "wanted":
            # Counted as wanted: a copy too many is safe, one too few is not.
            return [
                Log(f"{text}: every node asked"),
                *self._put_offer_to(self._put_request, {}),
            ]
        return self._answer(m.Error(f"{self.name}: cannot read the location log"), [Log(text)])

    def fail(self, text: str) -> list[Action]:
        """The I/O layer broke down answering: every node in the exchange is
        closed, and the client hears ``text`` as an ERROR."""
        busy = set(self._busy) | set(self._waiting)
        out = self._abandon()
        for name in sorted(busy & set(self.open)):
            self.open.pop(name, None)
            out.append(CloseNode(name, "left mid-exchange"))
        return self._answer(m.Error(text), out)

    def clock(self, now: int) -> list[Action]:
        request = self._request
        if isinstance(request, m.GetTimestamp):
            # Our clock is read after theirs: the client's window can only shrink.
            return self._answer(self._timestamps.answer(self._clocks, now))
        if isinstance(request, m.RemoveBefore):
            return self._remove_send(request, now)
        raise GatewayError("clock unasked")

    # --- requests ---------------------------------------------------------------------

    def _start(self, message: m.Message) -> list[Action]:
        closes: list[Action] = []
        if self.phase not in (Phase.IDLE, Phase.DONE):
            # Whatever the last request left is over (the relay moved on).
            closes = self._abandon()
        return closes + self._begin(message)

    def _begin(self, message: m.Message) -> list[Action]:
        self._request = message
        self._replies = {}
        self._clocks = {}
        match message:
            case m.CheckPresent(key=key):
                self.phase = Phase.CHECKPRESENT
                return [QueryLocations(key)]
            case m.LockContent():
                # The cluster is not one disk: clients lock content on nodes.
                return self._answer(m.Failure())
            case m.Remove() | m.RemoveBefore():
                self.phase = Phase.REMOVE
                if isinstance(message, m.RemoveBefore):
                    return [ReadClock()]
                return self._remove_send(message, 0)
            case m.GetTimestamp():
                self.phase = Phase.TIMESTAMP
                return self._timestamp_ask()
            case m.Get(key=key):
                self.phase = Phase.GET_START
                return [QueryLocations(key)]
            case m.Put(key=key):
                self.phase = Phase.PUT_OFFERS
                self._put_request = message
                return [QueryLocations(key)]
        return self._answer(m.Error("unexpected command"))

    def _abandon(self) -> list[Action]:
        """The relay moved on mid-exchange (the client stopped short): every
        node still in the old exchange is out of step and is closed."""
        out: list[Action] = []
        stale: set[str] = set(self._busy) | set(self._waiting)
        if (
            self._get is not None
            and self._get.node is not None
            and self.phase
            in (
                Phase.GET_BODY,
                Phase.GET_VALIDITY,
                Phase.GET_VERDICT,
            )
        ):
            stale.add(self._get.node)
        if self._put is not None and self.phase in (
            Phase.PUT_DATA,
            Phase.PUT_BODY,
            Phase.PUT_VALIDITY,
            Phase.PUT_RESULTS,
        ):
            stale.update(self._put.receiving)
        for name in sorted(stale):
            if self.open.pop(name, None) is not None:
                out.append(CloseNode(name, f"left mid-exchange ({self.phase.value})"))
        self._busy.clear()
        self._get = None
        self._put = None
        self._put_request = None
        self._waiting.clear()
        self._queued.clear()
        self.phase = Phase.IDLE
        return out

    def _answer(self, message: m.Message, extra: Sequence[Action] = ()) -> list[Action]:
        self.phase = Phase.DONE
        self._answers.append(message)
        return [*extra, ToClient(message)]

    # --- nodes ------------------------------------------------------------------------

    def usable(self) -> list[Node]:
        """The nodes this session may use: none the client's BYPASS names."""
        bypass = self.bypass
        return [
            n
            for n in self.nodes
            if n.ref.uuid not in bypass and (n.gateway is None or n.gateway not in bypass)
        ]

    def _split_by_health(self, names: Sequence[str]) -> tuple[list[str], list[str], list[Action]]:
        """``names`` in two: those up, and those down (skipped unless none is up);
        probes for the down ones that are due."""
        up = [n for n in names if not self.health.is_down(n)]
        down = [n for n in names if self.health.is_down(n)]
        probes: list[Action] = [
            ProbeNode(n, self.version) for n in down if self.health.probe_due(n, self.now)
        ]
        return up, down, probes

    def _bypass_for(self, node: Node) -> tuple[str, ...]:
        bypass = set(self.bypass)
        if node.gateway is not None:
            # Every gateway this one fans out to is served here: naming them
            # all keeps each from passing the request on to another, so a
            # node behind one is reached once, not once per path to it.
            bypass |= {n.gateway for n in self.usable() if n.gateway is not None}
        return tuple(sorted(bypass))

    def _with_node(self, name: str, actions: list[Action | _Pending]) -> list[Action]:
        """``actions`` for ``name``: now if it is open, else once it is."""
        if name in self.open:
            return self._go(name, actions)
        self._queued[name] = actions
        self._busy.add(name)
        return [OpenNode(name, self.version, self._bypass_for(self._by_name[name]))]

    def _go(self, name: str, actions: Sequence[Action | _Pending]) -> list[Action]:
        if not actions:
            return []
        first, rest = actions[0], list(actions[1:])
        assert not isinstance(first, _Pending)
        if rest:
            self._queued[name] = rest
        self._busy.add(name)
        return [first]

    def _run_queued(self, name: str) -> list[Action]:
        queued = self._queued.pop(name, [])
        ready: list[Action] = []
        for item in queued:
            if isinstance(item, _Pending):
                decided = self._decide_pending(name)
                if decided is None:
                    return self._step_done(name)
                ready.append(decided)
            else:
                ready.append(item)
        return self._go(name, ready)

    def _decide_pending(self, name: str) -> Action | None:
        """What a node just opened is told, at the version it agreed to."""
        version = self.open[name]
        request = self._request
        if isinstance(request, m.RemoveBefore):
            told = self._timestamps.remove_for(name, version, request, self._remove_now)
            if isinstance(told, str):
                self._replies[name] = told
                return None
            return ToNode(name, told, reply=True)
        if c.for_node(m.GetTimestamp(), version) is None:
            return None
        return ToNode(name, m.GetTimestamp(), reply=True)

    def _ask(self, name: str, message: m.Message) -> list[Action]:
        self._waiting.add(name)
        return self._with_node(name, [ToNode(name, message, reply=True)])

    def _reply(self, name: str, reply: m.Message) -> list[Action]:
        match self.phase:
            case Phase.CHECKPRESENT:
                return self._checkpresent_reply(name, reply)
            case Phase.REMOVE:
                self._replies[name] = reply
                return self._step_done(name)
            case Phase.TIMESTAMP:
                if isinstance(reply, m.Timestamp):
                    self._clocks[name] = reply.timestamp
                return self._step_done(name)
            case Phase.GET_START | Phase.GET_BODY:
                return self._get_reply(name, reply)
            case Phase.GET_VALIDITY:
                return self._get_validity(name, reply)
            case Phase.PUT_OFFERS:
                assert self._put is not None
                self._put.answered(name, reply)
                return self._step_done(name)
            case Phase.PUT_RESULTS:
                assert self._put is not None
                self._put.result(name, reply)
                return self._step_done(name)
        raise GatewayError(f"reply from {name} unasked in {self.phase.value}")

    def _lost_in_step(self, name: str, told: str) -> list[Action]:
        match self.phase:
            case Phase.CHECKPRESENT if name in self._waiting:
                return self._checkpresent_next(f"{name}: {told}")
            case Phase.REMOVE if name in self._waiting:
                self._replies[name] = told
                return self._step_done(name)
            case Phase.TIMESTAMP if name in self._waiting:
                return self._step_done(name)
            case Phase.GET_START | Phase.GET_BODY | Phase.GET_VALIDITY:
                return self._get_lost(name, told)
            case (
                Phase.PUT_OFFERS
                | Phase.PUT_DATA
                | Phase.PUT_BODY
                | Phase.PUT_VALIDITY
                | (Phase.PUT_RESULTS)
            ):
                if self._put is not None:
                    self._put.fail(name, told)
                if name in self._waiting:
                    return self._step_done(name)
        return []

    def _step_done(self, name: str) -> list[Action]:
        self._waiting.discard(name)
        if self._waiting:
            return []
        match self.phase:
            case Phase.REMOVE:
                return self._remove_done()
            case Phase.TIMESTAMP:
                return [ReadClock()]
            case Phase.PUT_OFFERS:
                return self._put_offered()
            case Phase.PUT_RESULTS:
                return self._put_done()
        return []

    # --- CHECKPRESENT -----------------------------------------------------------------

    def _holders(self, key: str, logged: frozenset[str]) -> tuple[list[str], list[Action]]:
        """The logged holders in the order to ask them: cheapest first; those
        down last, so they are asked only when no live one answers."""
        refs = c.holders([n.ref for n in self.usable()], logged, self.rng)
        up, down, probes = self._split_by_health([r.name for r in refs])
        return up + down, probes

    def _checkpresent(self, key: str, logged: frozenset[str]) -> list[Action]:
        order, probes = self._holders(key, logged)
        if not order:
            return self._answer(m.Failure(), probes)
        self._get = _Get(key, None, 0, order)  # the candidates, as for a GET
        return probes + self._checkpresent_next(None)

    def _checkpresent_next(self, why: str | None) -> list[Action]:
        get = self._get
        assert get is not None
        if why is not None:
            get.why.append(why)
        self._waiting.clear()
        if not get.candidates:
            self._get = None
            return self._answer(
                m.Error(f"{self.name}: no node that has it answered ({'; '.join(get.why)})")
            )
        return self._ask(get.candidates.pop(0), m.CheckPresent(get.key))

    def _checkpresent_reply(self, name: str, reply: m.Message) -> list[Action]:
        self._waiting.discard(name)
        self._get = None
        return self._answer(reply)

    # --- REMOVE -------------------------------------------------------------------------

    def _remove_send(self, request: m.Remove | m.RemoveBefore, now: int) -> list[Action]:
        # Every node, logged or not: a drop must really remove it everywhere.
        usable = [n.name for n in self.usable()]
        self._remove_now = now
        self._replies = dict.fromkeys(usable, "unreachable")
        out: list[Action] = []
        # Nodes marked down are asked too: a drop that skipped a node that
        # is back would fail for nothing (one that is still down fails the
        # drop either way, after the connect deadline).
        for name in usable:
            if isinstance(request, m.RemoveBefore) and name in self.open:
                told = self._timestamps.remove_for(name, self.open[name], request, now)
                if isinstance(told, str):
                    self._replies[name] = told
                    continue
                out.extend(self._ask(name, told))
            elif isinstance(request, m.RemoveBefore):
                # Opened first: what it is told depends on its version.
                self._waiting.add(name)
                out.extend(self._with_node(name, [_Pending(name)]))
            else:
                out.extend(self._ask(name, request))
        if not self._waiting:
            return out + self._remove_done()
        return out

    def _remove_done(self) -> list[Action]:
        request = self._request
        assert isinstance(request, (m.Remove, m.RemoveBefore))
        usable = self.usable()
        uuids = {n.name: n.ref.uuid for n in usable}
        in_order = {n.name: self._replies.get(n.name, "unreachable") for n in usable}
        answer, removed = c.remove_outcome(self.version, in_order, uuids, self.members)
        records: list[Action] = [
            Record(request.key, u, present=False) for u in removed if not c.is_cluster_uuid(u)
        ]
        return self._answer(answer, records)

    # --- GETTIMESTAMP -----------------------------------------------------------------

    def _timestamp_ask(self) -> list[Action]:
        # Every node, down or not: a clock not read now refuses the
        # REMOVE-BEFORE that follows (see _remove_send).
        out: list[Action] = []
        for name in (n.name for n in self.usable()):
            version = self.open.get(name)
            if version is not None and c.for_node(m.GetTimestamp(), version) is None:
                continue
            if version is None:
                self._waiting.add(name)
                out.extend(self._with_node(name, [_Pending(name)]))
            else:
                out.extend(self._ask(name, m.GetTimestamp()))
        if not self._waiting:
            out.append(ReadClock())
        return out

    # --- GET --------------------------------------------------------------------------

    def _get_start(self, request: m.Get, logged: frozenset[str]) -> list[Action]:
        order, probes = self._holders(request.key, logged)
        if not order:
            # No node has it: nothing to send, and nothing the client may keep.
            self.phase = Phase.GET_VERDICT
            answers = [m.Data(0), m.Invalid()] if self._validity else [m.Data(0)]
            self._answers.extend(answers)
            return [*probes, *(ToClient(a) for a in answers)]
        self._get = _Get(request.key, request.af, request.offset, order)
        return probes + self._get_next(None)

    def _get_next(self, why: str | None) -> list[Action]:
        """Ask the next holder for the rest of the object."""
        get = self._get
        assert get is not None
        if why is not None:
            get.why.append(why)
        get.node = None
        if not get.candidates:
            reasons = "; ".join(get.why)
            if get.length is None:
                self._get = None
                return self._answer(
                    m.Error(f"{self.name}: no node that has it answered ({reasons})")
                )
            # Mid-body, no node can go on: the client's connection is cut.
            self._get = None
            self.phase = Phase.DONE
            return [CutClient(f"{self.name}: no node can finish the GET ({reasons})")]
        name = get.candidates.pop(0)
        get.node = name
        request = m.Get(get.offset + get.sent, get.af, get.key)
        self._waiting = {name}
        return self._with_node(name, [ToNode(name, request, reply=True)])

    def _get_reply(self, name: str, reply: m.Message) -> list[Action]:
        get = self._get
        assert get is not None and get.node == name
        self._waiting.discard(name)
        if isinstance(reply, m.Data):
            if get.length is None:
                get.length = reply.length
                get.served_by.append(name)
                self.phase = Phase.GET_BODY
                out: list[Action] = [ToClient(reply)]
                self._answers.append(reply)
                if reply.length == 0:
                    out.extend(self._get_body_done())
                return out
            if reply.length != get.length - get.sent:
                # Not the same object: its body must not follow the first's.
                return [
                    CloseNode(name, "another size"),
                    *self._forget(name),
                    *self._get_next(f"{name}: DATA {reply.length}, not the rest"),
                ]
            get.served_by.append(name)
            if get.want:
                return self._read_body(get)
            return []
        if get.length is None and isinstance(reply, m.Error):
            self._get = None
            return self._answer(reply)  # the node's ERROR, relayed; the session goes on
        # Anything else mid-transfer: the node is out of step.
        return [
            CloseNode(name, "out of step"),
            *self._forget(name),
            *self._get_next(f"{name}: {type(reply).__name__}"),
        ]

    def _forget(self, name: str) -> list[Action]:
        self.open.pop(name, None)
        self._queued.pop(name, None)
        return []

    def _read_body(self, get: _Get) -> list[Action]:
        assert get.node is not None
        self._busy.add(get.node)
        return [ReadNodeBody(get.node, get.want)]

    def _get_body_done(self) -> list[Action]:
        if self._validity:
            self.phase = Phase.GET_VALIDITY
            get = self._get
            assert get is not None and get.node is not None
            if not supports(self.open.get(get.node, 0), Feature.VALIDITY):
                # The node vouches for nothing: the client verifies.
                return self._get_validity_answer(m.Invalid())
            self._waiting = {get.node}
            return self._go(get.node, [ToNode(get.node, None, reply=True)])
        self.phase = Phase.GET_VERDICT
        return []

    def _get_validity(self, name: str, reply: m.Message) -> list[Action]:
        self._waiting.discard(name)
        if isinstance(reply, (m.Valid, m.Invalid)):
            return self._get_validity_answer(reply)
        return [
            CloseNode(name, f"no VALID after GET: {type(reply).__name__}"),
            *self._forget(name),
            *self._get_validity_answer(m.Invalid()),
        ]

    def _get_validity_answer(self, answer: m.Message) -> list[Action]:
        get = self._get
        self.phase = Phase.GET_VERDICT
        if get is not None and get.node is not None and get.node not in self.open:
            get.node = None
        self._answers.append(answer)
        return [ToClient(answer)]

    def _get_lost(self, name: str, why: str) -> list[Action]:
        get = self._get
        if get is None or get.node != name:
            return []
        if self.phase is Phase.GET_VALIDITY:
            # The whole body came through; the node vouches for nothing now.
            get.node = None
            return self._get_validity_answer(m.Invalid())
        return self._get_next(f"{name}: {why}")

    def _get_verdict(self, verdict: m.Message) -> list[Action]:
        get, self._get = self._get, None
        self.phase = Phase.DONE
        if get is None or get.node is None or get.node not in self.open:
            return []
        # At every version the node waits for it (git-annex's sendContent).
        return self._go(get.node, [ToNode(get.node, verdict)])

    # --- PUT ---------------------------------------------------------------------------

    def _put_targets(self, request: m.Put, logged: frozenset[str]) -> list[Action]:
        self._put_logged = logged
        usable = self.usable()
        # Each node's preferred content, evaluated by git-annex as that node;
        # another gateway weighs its own nodes' itself.
        asked = tuple(n.name for n in usable if n.gateway is None and n.ref.uuid not in logged)
        if asked:
            return [QueryWanted(asked, request.key, request.af)]
        return self._put_offer_to(request, {})

    def _put_offer_to(self, request: m.Put, wanted: Mapping[str, bool]) -> list[Action]:
        usable = self.usable()
        refs = c.put_targets(
            [n.ref for n in usable], self._put_logged, lambda r: wanted.get(r.name, True)
        )
        names = [r.name for r in refs]
        up, down, probes = self._split_by_health(names)
        if not up:
            up, down = down, []  # every target down: asked all the same
        self._put = c.PutFanout(
            self.version, {n: self._by_name[n].ref.uuid for n in up + down}, self.members
        )
        self._put_key = request.key
        for name in down:
            self._put.fail(name, "down (skipped until a probe finds it answering)")
        out: list[Action] = list(probes)
        for name in up:
            out.extend(self._ask(name, request))
        return out

    def _put_offered(self) -> list[Action]:
        put = self._put
        assert put is not None
        offer = put.offer()
        records: list[Action] = [
            Record(self._put_key, u, present=True) for u in put.already if not c.is_cluster_uuid(u)
        ]
        told, logs = self._told(put, offer)
        if isinstance(offer, m.PutFrom):
            self._answers.append(told)
            self.phase = Phase.PUT_DATA
            return [*records, *logs, ToClient(told)]
        self._put = None
        return self._answer(told, [*records, *logs])

    def _put_data(self, length: int) -> list[Action]:
        put = self._put
        assert put is not None
        headers = put.data(length)
        self._body_left = length
        self.phase = Phase.PUT_BODY
        out: list[Action] = []
        # Every node is told its DATA before any of the client's bytes are read.
        for name, header in headers.items():
            if name in self.open:
                out.extend(self._go(name, [ToNode(name, header)]))
            else:
                put.fail(name, "connection closed")
        if length == 0:
            if self._validity:
                self.phase = Phase.PUT_VALIDITY
            else:
                out.extend(self._put_read_results())
        return out

    def _put_tell(self, message: m.Message) -> list[Action]:
        put = self._put
        assert put is not None
        out: list[Action] = []
        for name in put.receiving:
            version = self.open.get(name)
            if version is None:
                put.fail(name, "connection closed")
                continue
            told = c.for_node(message, version)
            if told is None:
                if isinstance(message, m.DataPresent):
                    put.fail(name, "DATA-PRESENT needs protocol version 4")
                    # It answered PUT-FROM and waits for DATA: closed, or it
                    # would take the next request as that DATA.
                    self.open.pop(name, None)
                    out.append(CloseNode(name, "DATA-PRESENT needs protocol version 4"))
                    continue
                # Below v1 a node has no VALID to be told: its result is read.
                out.extend(self._go(name, [ToNode(name, None, reply=True)]))
            else:
                out.extend(self._go(name, [ToNode(name, told, reply=True)]))
            self._waiting.add(name)
        self.phase = Phase.PUT_RESULTS
        if not self._waiting:
            return out + self._put_done()
        return out

    def _put_read_results(self) -> list[Action]:
        put = self._put
        assert put is not None
        self.phase = Phase.PUT_RESULTS
        out: list[Action] = []
        for name in put.receiving:
            if name not in self.open:
                put.fail(name, "connection closed")
                continue
            self._waiting.add(name)
            out.extend(self._queue_after(name, ToNode(name, None, reply=True)))
        if not self._waiting:
            return out + self._put_done()
        return out

    def _queue_after(self, name: str, action: Action) -> list[Action]:
        """``action`` after whatever ``name`` is doing now (a body piece in flight)."""
        if name in self._busy:
            self._queued.setdefault(name, []).append(action)
            return []
        return self._go(name, [action])

    def _put_done(self) -> list[Action]:
        put, self._put = self._put, None
        assert put is not None
        records: list[Action] = [
            Record(self._put_key, u, present=True) for u in put.stored if not c.is_cluster_uuid(u)
        ]
        told, logs = self._told(put, put.outcome())
        return self._answer(told, [*records, *logs])

    def _told(self, put: c.PutFanout, answer: m.Message) -> tuple[m.Message, list[Action]]:
        """A FAILURE becomes an ERROR that says why; the reasons are logged."""
        order = {n.name: i for i, n in enumerate(self.nodes)}  # not finishing order
        failed = sorted(put.failed.items(), key=lambda item: order.get(item[0], len(order)))
        reasons = [f"{name}: {why}" for name, why in failed]
        put.failed.clear()
        logs: list[Action] = [Log(f"node left out of a PUT: {r}") for r in reasons]
        if isinstance(answer, m.Failure):
            told = "; ".join(reasons) or "the cluster has no node to take it"
            return m.Error(f"{self.name}: no node stored it ({told})"), logs
        return answer, logs
