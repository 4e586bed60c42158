"""A cluster as one peer: the channel the relay talks to fans out to the nodes.

The relay (protocol/relay.py) drives a cluster endpoint exactly as it
drives a single node; this channel stands in for that node. Everything is
decided by the sans-I/O gateway (protocol/gateway.py): this channel feeds
it what the relay sends and what the nodes answer, and carries out the
actions it returns (actions for different nodes concurrently). Each
request is answered when the relay asks for the answer. Nodes are opened
lazily at the client's version, each negotiating its own, within the
connect deadline; a node that fails is marked down in the cluster's
``NodeHealth`` (protocol/nodehealth.py), which later sessions read. Every
wait on a node has a deadline shorter than the relay's own, so a slow
node is dropped (and a GET goes on from another node) before the session
gives up on the cluster. Some 510 lines, left whole: ``ClusterChannel``
is one executor of one gateway's actions.

A PUT body is fanned out by the kernel where the client and the nodes are
reached through descriptors (transport/fanout.py: tee(2) into a stage pipe
per node, then splice(2) into each node at its pace); the gateway sees the
same per-node body events either way (``NodeBodyStaged`` in place of
``ToNodeBody``), so failover, drops and the -PLUS answers do not change.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from torbridge.annex.query import QueryError
from torbridge.protocol import clienttext
from torbridge.protocol import cluster as c
from torbridge.protocol import gateway as g
from torbridge.protocol import gatewayactions as ga
from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream, LineEvent
from torbridge.protocol.nodehealth import NodeHealth
from torbridge.transport.base import PeerChannel, PeerUnavailable, SessionInfo, Transport
from torbridge.transport.fanout import BodyFanout, deliver
from torbridge.transport.framed import FramedStream, StreamLost

log = logging.getLogger("torbridge.cluster")

# The share of the channel's own deadline that one node may use up: each
# node's waits end first, so a silent node is dropped and the others'
# answers are still used.
NODE_SHARE = 0.8
# A GET body read waits this share of the stall limit for the serving node;
# the rest is left for going on from another node before the session's own
# stall deadline (one stall window per body read) runs out.
GET_BODY_SHARE = 0.75
DEFAULT_CONNECT_TIMEOUT = 20.0


class ClusterKnowledge(Protocol):
    """What git-annex knows of the proxy repository (annex/query.py).

    Both raise ``QueryError`` when git-annex cannot be asked.
    """

    async def locations(self, key: str) -> frozenset[str]: ...

    async def wanted(
        self, remotes: Sequence[str], key: str, af: str | None
    ) -> Mapping[str, bool]: ...


class Recorder(Protocol):
    """The proxy's location log (annex/locationlog.py)."""

    def record(self, key: str, uuid: str, present: bool) -> None: ...


@dataclass(frozen=True)
class ClusterNode:
    ref: c.NodeRef
    transport: Transport
    # For the same cluster reached through another gateway: that gateway's
    # repository UUID (BYPASS naming it keeps the node out: no loops).
    gateway: str | None = None


class ClusterTransport(Transport):
    def __init__(
        self,
        name: str,
        uuid: str,
        own_uuid: str,
        nodes: Sequence[ClusterNode],
        knowledge: ClusterKnowledge,
        recorder: Recorder | None,
        node_timeout: float,
        stall_timeout: float,
        rng: random.Random | None = None,
        members: frozenset[str] = frozenset(),
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        health: NodeHealth | None = None,
        kernel_fanout: bool = True,
    ) -> None:
        self.name = name
        # PUT bodies by tee(2)/splice(2) where descriptors allow (False: the
        # user-space copy only, as bench/bench_splice.py compares).
        self.kernel_fanout = kernel_fanout
        self.uuid = uuid  # the cluster's
        self.own_uuid = own_uuid  # this gateway's repository: always bypassed by nodes
        self.nodes = list(nodes)
        self.knowledge = knowledge
        self.recorder = recorder
        self.node_timeout = node_timeout
        self.stall_timeout = stall_timeout
        self.rng = rng or random.Random()
        # connect + AUTH + VERSION: bounded on its own, shorter than any
        # transfer timeout, so a dead or silent node costs that much once.
        self.connect_timeout = min(connect_timeout, node_timeout)
        # Shared by every session of the cluster: a node that failed is skipped.
        self.health = health or NodeHealth([n.ref.name for n in self.nodes])
        # The cluster's nodes (cluster.log, with the nodes behind other
        # gateways): the only UUIDs a node's PLUS list may pass on.
        self.members = frozenset(members).union(
            *(n.ref.behind for n in self.nodes),
            (n.ref.uuid for n in self.nodes if n.gateway is None),
        )

    async def open(
        self,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> PeerChannel:
        # The nodes' versions are not known and would be slow to learn: the
        # client gets ours, and each node is adapted to on its own.
        return ClusterChannel(self, nursery, session, min(version, m.MAX_VERSION), bypass)

    def status(self) -> dict[str, dict[str, object]]:
        """Each node's health, for ``torbridge status`` and the metrics."""
        return self.health.snapshot(trio.current_time())


class ClusterChannel(PeerChannel):
    def __init__(
        self,
        transport: ClusterTransport,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> None:
        self.t = transport
        self.uuid = transport.uuid
        self.version = version
        self._nursery = nursery
        self._session = session
        self._by_name = {n.ref.name: n for n in transport.nodes}
        self.gw = g.Gateway(
            transport.name,
            version,
            [g.Node(n.ref, n.gateway) for n in transport.nodes],
            transport.own_uuid,
            bypass,
            transport.members,
            transport.health,
            transport.rng,
        )
        self._open: dict[str, PeerChannel] = {}
        self._deferred: list[ga.Action] = []  # worked out when the answer is asked for
        self._body: deque[bytes] = deque()  # GET body bytes for the relay
        self._cut: str | None = None  # no node can finish the GET body
        self._answering: trio.Event | None = None  # set when the answer is out
        self._work_scope = trio.CancelScope()  # the answering task's, for aclose
        self._deadline = math.inf  # no node wait outlasts the current call
        self._fanout: BodyFanout | None = None  # the current PUT body's, by the kernel

    # --- the PeerChannel the relay sees --------------------------------------------

    async def send(self, message: m.Message) -> None:
        self._end_fanout()  # a line after a body: that body is over
        try:
            actions = self._feed(lambda: self.gw.client_message(message))
        except g.GatewayError as e:
            raise self._broken(e) from e
        if self.gw.answer_due:
            # A request: worked out when the relay asks for the answer (in a
            # task of its own, so a cancelled wait loses nothing).
            self._deferred.extend(actions)
        else:
            await self._guarded(lambda: actions, self.t.stall_timeout)

    async def _guarded(self, event: Callable[[], list[ga.Action]], within: float) -> None:
        """Feed ``event`` and carry out what follows; a gateway out of step
        (a bug) ends the peer, as a lost connection would."""
        try:
            await self._carry_out(self._feed(event), within)
        except (g.GatewayError, ExceptionGroup) as e:
            raise self._broken(e) from e

    def _broken(self, e: Exception) -> StreamLost:
        log.error("%s: the gateway is out of step: %r", self.t.name, e)
        self._dispatch_now(self.gw.fail(f"{self.t.name}: internal error"))
        return StreamLost(f"{self.t.name}: internal error")

    async def receive_event(self) -> LineEvent:
        """The answer to the last request; cancel-safe.

        The session may cancel this wait and ask again (it watches the
        client for a hang-up meanwhile): the answer is worked out by a task
        of its own, which a cancelled wait leaves running, so no node is
        left mid-exchange and no request is lost.
        """
        answering = self._answering
        if answering is None and not self.gw.answer_ready:
            if not self.gw.answer_due and not self._deferred:
                raise StreamLost(f"{self.t.name}: asked for an answer to nothing")
            answering = self._answering = trio.Event()
            self._work_scope = trio.CancelScope()
            self._nursery.start_soon(self._work_out, answering)
        if answering is not None:
            # The work ends before the answer is taken: a renewed wait never
            # overlaps the next request with this one's last node actions.
            await answering.wait()
        if not self.gw.answer_ready:
            raise StreamLost(f"{self.t.name}: no answer")
        return self.gw.take_answer()

    async def _work_out(self, done: trio.Event) -> None:
        try:
            with self._work_scope:
                actions, self._deferred = self._deferred, []
                await self._carry_out(actions, self.t.node_timeout)
                # (The answer may already be taken: a wait the session
                # cancelled and renewed returns it as soon as it is queued.)
                if self.gw.answer_due and not self.gw.answer_ready:
                    raise g.GatewayError(f"no answer in {self.gw.phase.value}")
        except Exception:
            log.exception("%s: answering failed", self.t.name)
            # Some node may be mid-exchange and out of step: start afresh.
            self._dispatch_now(self.gw.fail(f"{self.t.name}: internal error"))
        finally:
            if self._answering is done:
                self._answering = None
            done.set()

    async def send_body(self, data: bytes) -> None:
        await self._guarded(lambda: self.gw.client_body(data), self.t.stall_timeout)

    async def receive_body(self, max_bytes: int) -> bytes:
        if self._cut is not None:
            raise StreamLost(self._cut)
        if not self._body:
            # A node's silence, and going on from the next one, within one
            # stall window of the session's.
            await self._guarded(
                lambda: self.gw.client_wants_body(max_bytes),
                self.t.stall_timeout / NODE_SHARE * 0.95,
            )
        if self._body:
            return self._body.popleft()
        why = self._cut or f"{self.t.name}: no body from the nodes"
        raise StreamLost(why)

    async def aclose(self) -> None:
        self._work_scope.cancel()
        self._end_fanout()
        await self._close_nodes()

    # --- a PUT body by the kernel (transport/fanout.py) ------------------------------

    def kernel_fanout(self, src: FramedStream) -> BodyFanout | None:
        """The kernel fanout of the client's current body, for the session."""
        self._end_fanout()
        if not self.t.kernel_fanout:
            return None
        self._fanout = BodyFanout(src, self)
        return self._fanout

    def fanout_takers(self) -> dict[str, FramedStream] | None:
        takers = self.gw.whole_body_takers()
        if takers is None:
            return None
        streams: dict[str, FramedStream] = {}
        for name in takers:
            channel = self._open.get(name)
            framed = channel.framed_stream() if channel is not None else None
            if framed is None:
                return None
            streams[name] = framed
        return streams

    async def fanout_staged(self, length: int) -> None:
        # Shielded from the session's waits: the nodes' waits are bounded by
        # our own deadline (shorter than the session's), and a round cut in
        # two would leave staged bytes nobody accounts for.
        with trio.CancelScope(shield=True):
            await self._guarded(lambda: self.gw.client_body_staged(length), self.t.stall_timeout)

    def _end_fanout(self) -> None:
        fanout, self._fanout = self._fanout, None
        if fanout is not None:
            if fanout.moved:
                log.debug(
                    "%s: %d body bytes fanned out by tee in %d rounds",
                    self.t.name,
                    fanout.moved,
                    fanout.rounds,
                )
            fanout.close()

    async def _close_nodes(self) -> None:
        with trio.CancelScope(shield=True):
            for channel in self._open.values():
                await channel.aclose()
            self._open.clear()

    def _dispatch_now(self, actions: list[ga.Action]) -> None:
        """Actions that need no waiting (closes go to the session's nursery)."""
        for action in actions:
            if isinstance(action, ga.CloseNode):
                closing = self._open.pop(action.node, None)
                if closing is not None:
                    self._nursery.start_soon(self._aclose, closing)
            elif isinstance(action, ga.Log):
                log.warning("%s: %s", self.t.name, action.text)

    # --- carrying out the gateway's actions --------------------------------------

    def _feed(self, event: Callable[[], list[ga.Action]]) -> list[ga.Action]:
        self.gw.at(trio.current_time())
        return event()

    async def _carry_out(self, actions: list[ga.Action], within: float) -> None:
        """Carry out ``actions`` and all that follow from them; return when
        nothing is left to do. No node wait outlasts ``within`` from now."""
        self._deadline = trio.current_time() + within
        try:
            async with trio.open_nursery() as nursery:
                self._dispatch(nursery, actions)
        finally:
            self._deadline = math.inf

    def _dispatch(self, nursery: trio.Nursery, actions: list[ga.Action]) -> None:
        for action in actions:
            match action:
                case ga.ToClient():
                    pass  # queued in the gateway: the relay takes it with receive_event
                case ga.ToClientBody(data=data):
                    self._body.append(data)
                case ga.CutClient(why=why):
                    log.warning("%s", why)
                    self._cut = why
                case ga.Record(key=key, uuid=uuid, present=present):
                    if self.t.recorder is not None:
                        self.t.recorder.record(key, uuid, present)
                case ga.Log(text=text):
                    log.warning("%s: %s", self.t.name, text)
                case ga.CloseNode(node=name):
                    closing = self._open.pop(name, None)
                    if closing is not None:
                        log.warning("%s: node %s closed", self.t.name, name)
                        nursery.start_soon(self._aclose, closing)
                case ga.ProbeNode(node=name, version=version):
                    # In the background: nobody waits for a down node.
                    self._nursery.start_soon(self._probe, name, version)
                case _:
                    nursery.start_soon(self._node_task, nursery, action)

    async def _node_task(self, nursery: trio.Nursery, action: ga.Action) -> None:
        follow = await self._perform(action)
        self.gw.at(trio.current_time())
        self._dispatch(nursery, follow())

    async def _perform(self, action: ga.Action) -> Callable[[], list[ga.Action]]:
        """One node (or query) action; returns the event it reports."""
        gw = self.gw
        match action:
            case ga.OpenNode(node=name, version=version, bypass=bypass):
                node = self._by_name[name]
                try:
                    channel = await self._open_node(node, version, bypass)
                except (PeerUnavailable, trio.TooSlowError) as e:
                    why = str(e) or "no answer within the connect deadline"
                    return lambda: gw.node_lost(name, f"unreachable: {why}", clienttext.UNREACHABLE)
                self._open[name] = channel
                return lambda: gw.node_opened(name, channel.version)
            case ga.ToNode(node=name, message=message, reply=reply):
                sending = self._open.get(name)
                if sending is None:
                    return lambda: gw.node_lost(name, "closed", "connection closed")
                if message is not None:
                    lost = await self._guard(sending.send(message), self.t.stall_timeout)
                    if lost is not None:
                        return lambda: gw.node_lost(name, f"lost at {message}: {lost}")
                if not reply:
                    return lambda: gw.node_sent(name)
                return await self._read(name, sending)
            case ga.ToNodeBody(node=name, data=data):
                taking = self._open.get(name)
                if taking is None:
                    return lambda: gw.node_lost(name, "closed", "connection closed")
                lost = await self._guard(taking.send_body(data), self.t.stall_timeout)
                if lost is not None:
                    return lambda: gw.node_lost(name, f"lost while sending it data: {lost}")
                return lambda: gw.node_sent(name)
            case ga.NodeBodyStaged(node=name, length=length):
                taking = self._open.get(name)
                fanout = self._fanout
                stage = fanout.stage(name) if fanout is not None else None
                framed = taking.framed_stream() if taking is not None else None
                if fanout is None or stage is None or framed is None:
                    if fanout is not None:
                        fanout.drop(name)
                    return lambda: gw.node_lost(name, "closed", "connection closed")
                lost = await self._guard(deliver(stage, framed, length), self.t.stall_timeout)
                if lost is not None:
                    fanout.drop(name)
                    return lambda: gw.node_lost(name, f"lost while sending it data: {lost}")
                return lambda: gw.node_sent(name)
            case ga.ReadNodeBody(node=name, max_bytes=max_bytes):
                serving = self._open.get(name)
                if serving is None:
                    return lambda: gw.node_lost(name, "closed", "connection closed")
                try:
                    with trio.fail_at(self._wait_until(self.t.stall_timeout * GET_BODY_SHARE)):
                        data = await serving.receive_body(max_bytes)
                except trio.TooSlowError:
                    return lambda: gw.node_lost(name, "stalled during GET", "stalled")
                except StreamLost as e:
                    why = f"lost during GET: {e}"
                    return lambda: gw.node_lost(name, why)
                return lambda: gw.node_body(name, data)
            case ga.QueryLocations(key=key):
                try:
                    logged = await self.t.knowledge.locations(key)
                except QueryError as e:
                    text = f"cannot read the location log: {e}"
                    return lambda: gw.query_failed("locations", text)
                return lambda: gw.locations(logged)
            case ga.QueryWanted(nodes=names, key=key, af=af):
                try:
                    wanted = await self.t.knowledge.wanted(list(names), key, af)
                except QueryError as e:
                    text = f"preferred content not known: {e}"
                    return lambda: gw.query_failed("wanted", text)
                return lambda: gw.wanted(wanted)
            case ga.ReadClock():
                now = int(time.monotonic())
                return lambda: gw.clock(now)
        raise g.GatewayError(f"unhandled action {action!r}")

    def _wait_until(self, limit: float) -> float:
        return min(trio.current_time() + limit, self._deadline)

    async def _open_node(
        self, node: ClusterNode, version: int, bypass: tuple[str, ...]
    ) -> PeerChannel:
        with trio.fail_at(self._wait_until(self.t.connect_timeout)):
            return await node.transport.open(self._nursery, self._session, version, bypass)

    async def _probe(self, name: str, version: int) -> None:
        """Open a down node and close it again; its health says what came of it."""
        node = self._by_name[name]
        bypass = tuple(sorted(self.gw.bypass))
        try:
            with trio.fail_after(self.t.connect_timeout):
                channel = await node.transport.open(self._nursery, self._session, version, bypass)
        except (PeerUnavailable, trio.TooSlowError) as e:
            self.gw.at(trio.current_time()).probe_done(name, False, str(e) or "probe: no answer")
            log.info("%s: node %s still down: %s", self.t.name, name, e or "no answer")
            return
        except trio.Cancelled:
            self.gw.probe_done(name, False, "cancelled")
            raise
        await channel.aclose()
        self.gw.probe_done(name, True)
        log.info("%s: node %s answers again", self.t.name, name)

    async def _read(self, name: str, channel: PeerChannel) -> Callable[[], list[ga.Action]]:
        gw = self.gw
        try:
            with trio.fail_at(self._wait_until(self.t.node_timeout * NODE_SHARE)):
                event = await channel.receive_event()
        except trio.TooSlowError:
            why = "no answer before the deadline"
            return lambda: gw.node_lost(name, why, why)
        except StreamLost as e:
            # The cause (it may name an onion or a path) is for the log only.
            text = str(e)
            return lambda: gw.node_lost(name, text, clienttext.CONNECTION_LOST)
        if isinstance(event, m.Message):
            message = event
            return lambda: gw.node_reply(name, message)
        if isinstance(event, EndOfStream):
            return lambda: gw.node_lost(name, "connection closed", "connection closed")
        bad = f"bad line: {event}"
        return lambda: gw.node_lost(name, bad, clienttext.PROTOCOL_ERROR)

    async def _guard(self, op: Awaitable[None], within: float) -> str | None:
        """Run one send; None, or why it failed."""
        try:
            with trio.fail_at(self._wait_until(within)):
                await op
        except trio.TooSlowError:
            return "not reading"
        except StreamLost as e:
            return str(e) or "connection lost"
        return None

    @staticmethod
    async def _aclose(channel: PeerChannel) -> None:
        with trio.CancelScope(shield=True):
            await channel.aclose()
