"""A cluster as one peer: the channel the relay talks to fans out to the nodes.

The relay (protocol/relay.py) drives a cluster endpoint exactly as it
drives a single node; this channel stands in for that node. Each request
the relay sends is answered when the relay asks for the answer: the
channel then asks the nodes (through their own transports, concurrently
where the request goes to several) and says what protocol/cluster.py
decides. Nodes are opened lazily at the client's version, each negotiating
its own, and a node that fails is dropped from the request and reopened on
the next one. Every wait on a node has a deadline shorter than the relay's
own, so a slow node is dropped before the session gives up on the cluster.
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

from torbridge.protocol import clienttext
from torbridge.protocol import cluster as c
from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream, LineEvent
from torbridge.transport.base import PeerChannel, PeerUnavailable, SessionInfo, Transport
from torbridge.transport.framed import StreamLost

log = logging.getLogger("torbridge.cluster")

# The share of the channel's own deadline that one node may use up: each
# node's waits end first, so a silent node is dropped and the others'
# answers are still used.
NODE_SHARE = 0.8


class QueryFailed(Exception):
    """The location log or preferred content could not be read."""


class ClusterKnowledge(Protocol):
    """What git-annex knows of the proxy repository (annex/query.py)."""

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
    ) -> None:
        self.name = name
        self.uuid = uuid  # the cluster's
        self.own_uuid = own_uuid  # this gateway's repository: always bypassed by nodes
        self.nodes = list(nodes)
        self.knowledge = knowledge
        self.recorder = recorder
        self.node_timeout = node_timeout
        self.stall_timeout = stall_timeout
        self.rng = rng or random.Random()
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


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name


_PUT_RESULT = _Marker("put result")  # the client's body (and VALID) went out
_GET_VALIDITY = _Marker("get validity")  # a GET body was passed on

Pending = m.Message | _Marker


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
        self._bypass = {*bypass, transport.own_uuid}
        self._open: dict[str, PeerChannel] = {}
        self._pending: Pending | None = None
        self._out: deque[LineEvent] = deque()
        self._answering: trio.Event | None = None  # set when the answer is out
        self._work_scope = trio.CancelScope()  # the answering task's, for aclose
        self._timestamps = c.TimestampMap()
        self._node_deadline = math.inf  # no node wait outlasts the current answer
        # GET in progress: the node it comes from, and what of its body is left.
        self._get: tuple[ClusterNode, PeerChannel] | None = None
        self._get_verdict_owed = False  # the client's SUCCESS/FAILURE goes to the node
        self._body_left = 0
        # PUT in progress.
        self._put: c.PutFanout | None = None
        self._put_key = ""

    # --- the PeerChannel the relay sees --------------------------------------------

    async def send(self, message: m.Message) -> None:
        if isinstance(message, m.Bypass):
            self._bypass.update(message.uuids)
        elif isinstance(message, m.Data) and self._put is not None:
            await self._put_data(message.length)
        elif isinstance(message, (m.Valid, m.Invalid, m.DataPresent)) and self._put is not None:
            await self._put_tell(message)
            self._pending = _PUT_RESULT
        elif isinstance(message, (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus)):
            await self._get_verdict(message)
        elif isinstance(message, m.UnlockContent):
            pass  # LOCKCONTENT is always refused: nothing is held
        else:
            self._reset()
            self._pending = message

    async def receive_event(self) -> LineEvent:
        """The answer to the last request; cancel-safe.

        The session may cancel this wait and ask again (it watches the
        client for a hang-up meanwhile): the answer is worked out by a task
        of its own, which a cancelled wait leaves running, so no node is
        left mid-exchange and no request is lost.
        """
        if not self._out:
            if self._answering is None:
                pending, self._pending = self._pending, None
                if pending is None:
                    raise StreamLost(f"{self.t.name}: asked for an answer to nothing")
                self._answering = trio.Event()
                self._work_scope = trio.CancelScope()
                self._nursery.start_soon(self._work_out, pending, self._answering)
            await self._answering.wait()
            self._answering = None
        return self._out.popleft()

    async def _work_out(self, pending: Pending, done: trio.Event) -> None:
        try:
            with self._work_scope:
                self._node_deadline = trio.current_time() + self.t.node_timeout * NODE_SHARE
                with trio.move_on_after(self.t.node_timeout) as scope:
                    self._out.extend(await self._answer(pending))
                self._node_deadline = math.inf
                if scope.cancelled_caught:
                    # Some node is mid-exchange and out of step: start afresh.
                    self._reset()
                    await self._close_nodes()
                    self._out.append(m.Error(f"{self.t.name}: no answer from the nodes in time"))
        except Exception:
            log.exception("%s: answering %s failed", self.t.name, pending)
            self._reset()
            await self._close_nodes()
            self._out.append(m.Error(f"{self.t.name}: internal error"))
        finally:
            done.set()

    async def send_body(self, data: bytes) -> None:
        put = self._put
        if put is None:
            return
        pieces = put.slices(data)
        self._body_left -= len(data)

        async def one(node: ClusterNode, channel: PeerChannel) -> None:
            piece = pieces.get(node.ref.name)
            if piece is None:
                return
            if not await self._guard(node, self.t.stall_timeout, channel.send_body(piece)):
                put.fail(node.ref.name, "lost while sending it data")

        await self._each(self._receiving(put), one)
        if self._body_left <= 0 and self.version == 0:
            self._pending = _PUT_RESULT  # no VALID below v1: the results come now

    async def receive_body(self, max_bytes: int) -> bytes:
        if self._get is None:
            raise StreamLost(f"{self.t.name}: no DATA in progress")
        node, channel = self._get
        try:
            with trio.fail_after(self.t.stall_timeout):
                data = await channel.receive_body(max_bytes)
        except (StreamLost, trio.TooSlowError) as e:
            await self._drop(node, f"lost during GET: {e or 'stalled'}")
            self._get = None
            raise StreamLost(f"{node.ref.name} lost during GET") from e
        self._body_left -= len(data)
        if self._body_left <= 0 and self.version >= 1:
            self._pending = _GET_VALIDITY
        return data

    async def aclose(self) -> None:
        self._work_scope.cancel()
        await self._close_nodes()

    async def _close_nodes(self) -> None:
        with trio.CancelScope(shield=True):
            for channel in self._open.values():
                await channel.aclose()
            self._open.clear()

    # --- the requests ----------------------------------------------------------------

    async def _answer(self, pending: Pending) -> list[LineEvent]:
        try:
            if pending is _PUT_RESULT:
                return await self._put_result()
            if pending is _GET_VALIDITY:
                return await self._get_validity()
            assert isinstance(pending, m.Message)
            match pending:
                case m.CheckPresent(key=key):
                    return await self._checkpresent(key)
                case m.LockContent():
                    # The cluster is not one disk: clients lock content on nodes.
                    return [m.Failure()]
                case m.Remove() | m.RemoveBefore():
                    return await self._remove(pending)
                case m.GetTimestamp():
                    return await self._gettimestamp()
                case m.Get():
                    return await self._get_start(pending)
                case m.Put():
                    return await self._put_start(pending)
            return [m.Error("unexpected command")]
        except QueryFailed as e:
            log.warning("%s: %s", self.t.name, e)
            return [m.Error(f"{self.t.name}: cannot read the location log")]

    async def _locations(self, key: str) -> frozenset[str]:
        try:
            return await self.t.knowledge.locations(key)
        except Exception as e:  # the query layer's own error types
            raise QueryFailed(f"cannot read the location log: {e}") from e

    async def _holders(self, key: str) -> list[ClusterNode]:
        usable = {n.ref: n for n in self._usable()}
        refs = c.holders(list(usable), await self._locations(key), self.t.rng)
        return [usable[ref] for ref in refs]

    async def _checkpresent(self, key: str) -> list[LineEvent]:
        candidates = await self._holders(key)
        if not candidates:
            return [m.Failure()]
        why: list[str] = []
        for node in candidates:
            reply = await self._request(node, m.CheckPresent(key))
            if isinstance(reply, m.Message):
                return [reply]
            why.append(f"{node.ref.name}: {reply}")
        return [m.Error(f"{self.t.name}: no node that has it answered ({'; '.join(why)})")]

    async def _remove(self, request: m.Remove | m.RemoveBefore) -> list[LineEvent]:
        # Every node, logged or not: a drop must really remove it everywhere.
        replies: dict[str, m.Message | str] = {}

        async def one(node: ClusterNode) -> None:
            channel = await self._channel(node)
            if channel is None:
                replies[node.ref.name] = "unreachable"
                return
            message: m.Message | str = request
            if isinstance(request, m.RemoveBefore):
                now = int(time.monotonic())
                message = self._timestamps.remove_for(node.ref.name, channel.version, request, now)
            if isinstance(message, str):
                replies[node.ref.name] = message
                return
            replies[node.ref.name] = await self._exchange(node, channel, message)

        usable = self._usable()
        await self._each_node(usable, one)
        uuids = {n.ref.name: n.ref.uuid for n in usable}
        in_order = {name: replies[name] for name in uuids}  # not the order they finished in
        answer, removed = c.remove_outcome(self.version, in_order, uuids, self.t.members)
        for uuid in removed:
            self._record(request.key, uuid, present=False)
        return [answer]

    async def _gettimestamp(self) -> list[LineEvent]:
        clocks: dict[str, int] = {}

        async def one(node: ClusterNode) -> None:
            channel = await self._channel(node)
            if channel is None or c.for_node(m.GetTimestamp(), channel.version) is None:
                return
            reply = await self._exchange(node, channel, m.GetTimestamp())
            if isinstance(reply, m.Timestamp):
                clocks[node.ref.name] = reply.timestamp

        await self._each_node(self._usable(), one)
        # Our clock is read after theirs: the client's window can only shrink.
        return [self._timestamps.answer(clocks, int(time.monotonic()))]

    # --- GET ---------------------------------------------------------------------------

    async def _get_start(self, request: m.Get) -> list[LineEvent]:
        candidates = await self._holders(request.key)
        why: list[str] = []
        for node in candidates:
            channel = await self._channel(node)
            if channel is None:
                why.append(f"{node.ref.name}: unreachable")
                continue
            reply = await self._exchange(node, channel, request)
            if isinstance(reply, m.Data):
                self._get = (node, channel)
                self._get_verdict_owed = True
                self._body_left = reply.length
                if reply.length == 0 and self.version >= 1:
                    self._pending = _GET_VALIDITY
                return [reply]
            if isinstance(reply, m.Message):
                return [reply]  # the node's ERROR, relayed; the session goes on
            why.append(f"{node.ref.name}: {reply}")
        if why:
            return [m.Error(f"{self.t.name}: no node that has it answered ({'; '.join(why)})")]
        # No node has it: nothing to send, and nothing the client may keep.
        return [m.Data(0), m.Invalid()] if self.version >= 1 else [m.Data(0)]

    async def _get_validity(self) -> list[LineEvent]:
        if self._get is None:
            return [m.Invalid()]
        node, channel = self._get
        if channel.version < 1:
            return [m.Invalid()]  # the node vouches for nothing: the client verifies
        reply = await self._read(node, channel)
        if isinstance(reply, (m.Valid, m.Invalid)):
            return [reply]
        await self._drop(node, f"no VALID after GET: {reply}")
        self._get = None
        return [m.Invalid()]

    async def _get_verdict(self, verdict: m.Message) -> None:
        get, self._get = self._get, None
        if get is None or not self._get_verdict_owed:
            return
        self._get_verdict_owed = False
        node, channel = get
        await self._guard(node, self.t.stall_timeout, channel.send(verdict))

    # --- PUT ---------------------------------------------------------------------------

    async def _put_start(self, request: m.Put) -> list[LineEvent]:
        usable = self._usable()
        logged = await self._locations(request.key)
        # Each node's preferred content, evaluated by git-annex as that node
        # (annex/preferred.py); another gateway weighs its own nodes' itself.
        asked = [n.ref.name for n in usable if n.gateway is None and n.ref.uuid not in logged]
        wanted = await self._wanted(asked, request.key, request.af)
        refs = c.put_targets([n.ref for n in usable], logged, lambda r: wanted.get(r.name, True))
        targets = [n for n in usable if n.ref in refs]
        put = c.PutFanout(self.version, {n.ref.name: n.ref.uuid for n in targets}, self.t.members)

        async def one(node: ClusterNode) -> None:
            reply = await self._request(node, request)
            if isinstance(reply, m.Message):
                put.answered(node.ref.name, reply)
            else:
                put.fail(node.ref.name, reply)

        await self._each_node(targets, one)
        offer = put.offer()
        for uuid in put.already:
            self._record(request.key, uuid, present=True)
        if isinstance(offer, m.PutFrom):
            self._put, self._put_key = put, request.key
        return [self._told(put, offer)]

    async def _wanted(self, names: list[str], key: str, af: str | None) -> Mapping[str, bool]:
        if not names:
            return {}
        try:
            return await self.t.knowledge.wanted(names, key, af)
        except Exception as e:  # the query layer's own error types
            # Counted as wanted: a copy too many is safe, one too few is not.
            log.warning("%s: preferred content not known (%s): every node asked", self.t.name, e)
            return {}

    async def _put_data(self, length: int) -> None:
        put = self._put
        assert put is not None
        headers = put.data(length)
        self._body_left = length

        async def one(node: ClusterNode, channel: PeerChannel) -> None:
            header = headers[node.ref.name]
            if not await self._guard(node, self.t.stall_timeout, channel.send(header)):
                put.fail(node.ref.name, "lost at DATA")

        # Every node is told its DATA before any of the client's bytes are read.
        await self._each(self._receiving(put), one)
        if length == 0 and self.version == 0:
            self._pending = _PUT_RESULT

    async def _put_tell(self, message: m.Message) -> None:
        put = self._put
        assert put is not None

        async def one(node: ClusterNode, channel: PeerChannel) -> None:
            told = c.for_node(message, channel.version)
            if told is None:
                if isinstance(message, m.DataPresent):
                    put.fail(node.ref.name, "DATA-PRESENT needs protocol version 4")
                    # It answered PUT-FROM and waits for DATA: closed, or it
                    # would take the next request as that DATA.
                    await self._drop(node, "DATA-PRESENT needs protocol version 4")
                return  # below v1 a node has no VALID to be told
            if not await self._guard(node, self.t.stall_timeout, channel.send(told)):
                put.fail(node.ref.name, f"lost at {type(message).__name__}")

        await self._each(self._receiving(put), one)

    async def _put_result(self) -> list[LineEvent]:
        put, self._put = self._put, None
        if put is None:
            return [m.Error("unexpected command")]

        async def one(node: ClusterNode, channel: PeerChannel) -> None:
            reply = await self._read(node, channel)
            if isinstance(reply, m.Message):
                put.result(node.ref.name, reply)
            else:
                put.fail(node.ref.name, reply)

        await self._each(self._receiving(put), one)
        for uuid in put.stored:
            self._record(self._put_key, uuid, present=True)
        return [self._told(put, put.outcome())]

    def _receiving(self, put: c.PutFanout) -> list[tuple[ClusterNode, PeerChannel]]:
        out = []
        for node in self.t.nodes:
            channel = self._open.get(node.ref.name)
            if node.ref.name in put.offsets and channel is not None:
                out.append((node, channel))
            elif node.ref.name in put.offsets:
                put.fail(node.ref.name, "connection closed")
        return out

    def _told(self, put: c.PutFanout, answer: m.Message) -> m.Message:
        """Log the nodes left out; a FAILURE becomes an ERROR that says why."""
        order = {n.ref.name: i for i, n in enumerate(self.t.nodes)}  # not finishing order
        failed = sorted(put.failed.items(), key=lambda item: order.get(item[0], len(order)))
        reasons = [f"{name}: {why}" for name, why in failed]
        put.failed.clear()
        for reason in reasons:
            log.warning("%s: node left out of a PUT: %s", self.t.name, reason)
        if isinstance(answer, m.Failure):
            told = "; ".join(reasons) or "the cluster has no node to take it"
            return m.Error(f"{self.t.name}: no node stored it ({told})")
        return answer

    # --- nodes ---------------------------------------------------------------------------

    def _usable(self) -> list[ClusterNode]:
        """The nodes this session may use: none the client's BYPASS names."""
        bypass = self._bypass
        return [
            n
            for n in self.t.nodes
            if n.ref.uuid not in bypass and (n.gateway is None or n.gateway not in bypass)
        ]

    async def _channel(self, node: ClusterNode) -> PeerChannel | None:
        channel = self._open.get(node.ref.name)
        if channel is not None:
            return channel
        bypass = self._bypass
        if node.gateway is not None:
            # Every gateway this one fans out to is served here: naming them
            # all keeps each from passing the request on to another, so a
            # node behind one is reached once, not once per path to it.
            bypass = bypass | {n.gateway for n in self._usable() if n.gateway is not None}
        try:
            with trio.fail_at(self._node_wait_deadline()):
                channel = await node.transport.open(
                    self._nursery, self._session, self.version, tuple(sorted(bypass))
                )
        except (PeerUnavailable, trio.TooSlowError) as e:
            # One node down is not the cluster down: the others go on.
            log.warning("%s: node %s unreachable: %s", self.t.name, node.ref.name, e or "timeout")
            return None
        self._open[node.ref.name] = channel
        return channel

    def _node_wait_deadline(self) -> float:
        return min(trio.current_time() + self.t.node_timeout, self._node_deadline)

    async def _request(self, node: ClusterNode, message: m.Message) -> m.Message | str:
        channel = await self._channel(node)
        if channel is None:
            return "unreachable"
        return await self._exchange(node, channel, message)

    async def _exchange(
        self, node: ClusterNode, channel: PeerChannel, message: m.Message
    ) -> m.Message | str:
        if not await self._guard(node, self.t.stall_timeout, channel.send(message)):
            return "connection lost"
        return await self._read(node, channel)

    async def _read(self, node: ClusterNode, channel: PeerChannel) -> m.Message | str:
        try:
            with trio.fail_at(self._node_wait_deadline()):
                event = await channel.receive_event()
        except trio.TooSlowError:
            await self._drop(node, "no answer before the deadline")
            return "no answer before the deadline"
        except StreamLost as e:
            # The cause (it may name an onion or a path) is for the log only.
            await self._drop(node, str(e))
            return clienttext.CONNECTION_LOST
        if isinstance(event, m.Error):
            told = clienttext.relayed_error(node.ref.name, event)
            if told is not event:
                log.warning("%s: node %s said ERROR %s", self.t.name, node.ref.name, event.text)
            return told
        if isinstance(event, m.Message):
            return event
        if isinstance(event, EndOfStream):
            await self._drop(node, "connection closed")
            return "connection closed"
        await self._drop(node, f"bad line: {event}")
        return clienttext.PROTOCOL_ERROR

    async def _guard(self, node: ClusterNode, within: float, op: Awaitable[None]) -> bool:
        """Run one send to ``node``; on failure drop the node and say False."""
        try:
            with trio.fail_after(within):
                await op
        except (StreamLost, trio.TooSlowError) as e:
            await self._drop(node, str(e) or "not reading")
            return False
        return True

    async def _drop(self, node: ClusterNode, why: str) -> None:
        log.warning("%s: node %s dropped: %s", self.t.name, node.ref.name, why)
        channel = self._open.pop(node.ref.name, None)
        if channel is not None:
            await channel.aclose()

    async def _each_node(
        self, nodes: Sequence[ClusterNode], work: Callable[[ClusterNode], Awaitable[None]]
    ) -> None:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(work, node)

    async def _each(
        self,
        pairs: Sequence[tuple[ClusterNode, PeerChannel]],
        work: Callable[[ClusterNode, PeerChannel], Awaitable[None]],
    ) -> None:
        if len(pairs) == 1:  # the common case needs no tasks
            await work(*pairs[0])
            return
        async with trio.open_nursery() as nursery:
            for node, channel in pairs:
                nursery.start_soon(work, node, channel)

    def _reset(self) -> None:
        """A new request: whatever the last one left is over."""
        self._put = None
        self._get = None
        self._get_verdict_owed = False
        self._pending = None

    def _record(self, key: str, uuid: str, present: bool) -> None:
        if self.t.recorder is not None and not c.is_cluster_uuid(uuid):
            self.t.recorder.record(key, uuid, present)
