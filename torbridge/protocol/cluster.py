"""What a cluster gateway decides, with no I/O.

A cluster endpoint answers the client as one repository (the cluster's
UUID) and spreads each request over the cluster's nodes: the I/O layer
(transport/cluster.py) asks these functions and classes which nodes to
use, what to tell each node at its own protocol version, and what to
answer the client at the client's version. The rules are those of
git-annex's own gateway (Annex/Cluster.hs, P2P/Proxy.hs), without the
gateway bugs listed in docs/clusters.md.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from torbridge.protocol import messages as m
from torbridge.protocol.versions import Feature, supports


def is_cluster_uuid(uuid: str) -> bool:
    """git-annex's cluster UUIDs: an ``ac`` prefix and version nibble ``8``."""
    return len(uuid) == 36 and uuid.startswith("ac") and uuid[14] == "8"


def repository_uuids(uuids: Iterable[str]) -> tuple[str, ...]:
    """``uuids`` without cluster UUIDs, which never go into location logs."""
    return tuple(dict.fromkeys(u for u in uuids if not is_cluster_uuid(u)))


@dataclass(frozen=True)
class NodeRef:
    """One node as the decisions see it; its remote name is what tells nodes apart."""

    uuid: str  # the UUID it announces: the cluster's, for another gateway
    name: str  # the proxy's remote name: unique, and what logs and texts say
    cost: float = 200.0  # remote.NAME.annex-cost; the cheapest is asked first
    # For another gateway: the nodes behind it, where known (proxy.log).
    behind: frozenset[str] = frozenset()

    @property
    def is_gateway(self) -> bool:
        return is_cluster_uuid(self.uuid)


# Another gateway's presence in the location log is not its UUID's: that
# is the cluster's, which the log shows once ANY node has the key, ours
# included. The nodes behind it are what count; where they are not known,
# the cluster's UUID with none of our own nodes logged means one of theirs.


def _has(node: NodeRef, logged: AbstractSet[str], ours_have: bool) -> bool:
    if not node.is_gateway:
        return node.uuid in logged
    if node.behind:
        return bool(node.behind & logged)
    return node.uuid in logged and not ours_have


def _lacks(node: NodeRef, logged: AbstractSet[str]) -> bool:
    if not node.is_gateway:
        return node.uuid not in logged
    # Not known to have it everywhere behind it: asked (it answers
    # ALREADY-HAVE for what its nodes have).
    return not node.behind or not node.behind <= logged


def _ours_have(nodes: Sequence[NodeRef], logged: AbstractSet[str]) -> bool:
    return any(n.uuid in logged for n in nodes if not n.is_gateway)


def holders(
    nodes: Sequence[NodeRef], logged: AbstractSet[str], rng: random.Random | None = None
) -> list[NodeRef]:
    """Nodes the location log says have the key, in the order to ask them.

    The cheapest come first, shuffled among themselves (load spreads over
    equal nodes, as git-annex picks one of them at random); the others follow
    by cost, so a dead node is replaced by the next one rather than failing.
    """
    rng = rng or random.Random()
    ours_have = _ours_have(nodes, logged)
    having = [n for n in nodes if _has(n, logged, ours_have)]
    by_cost: dict[float, list[NodeRef]] = {}
    for node in having:
        by_cost.setdefault(node.cost, []).append(node)
    ordered: list[NodeRef] = []
    for cost in sorted(by_cost):
        group = by_cost[cost]
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


def put_targets(
    nodes: Sequence[NodeRef], logged: AbstractSet[str], wants: Callable[[NodeRef], bool]
) -> list[NodeRef]:
    """Nodes a PUT goes to: never none while the cluster has nodes.

    Those not logged as having the key whose preferred content wants it;
    else those not logged; else every node (a stale log must not make an
    upload go nowhere).
    """
    missing = [n for n in nodes if _lacks(n, logged)]
    wanted = [n for n in missing if wants(n)]
    return wanted or missing or list(nodes)


# --- what each node is told ----------------------------------------------------------


def for_node(message: m.Message, node_version: int) -> m.Message | None:
    """``message`` as a node at ``node_version`` understands it; None: not sent.

    REMOVE-BEFORE is handled by ``TimestampMap`` (its timestamp differs per node).
    """
    if isinstance(message, (m.Valid, m.Invalid)):
        return message if supports(node_version, Feature.VALIDITY) else None
    if isinstance(message, m.Bypass):
        return message if supports(node_version, Feature.BYPASS) else None
    if isinstance(message, m.GetTimestamp):
        return message if supports(node_version, Feature.CLOCK) else None
    if isinstance(message, m.DataPresent):
        return message if supports(node_version, Feature.DATA_PRESENT) else None
    return message


def deadline_kept_here(request: m.RemoveBefore, now: int) -> m.Remove | None:
    """REMOVE-BEFORE for a repository with no clock of its own (a special
    remote, a node below protocol version 3), kept on our clock ``now``:
    REMOVE while it is before the deadline, else nothing (the answer is
    FAILURE, as git-annex's own server decides a deadline that has passed).

    The one place this rule is written: transport/process.py's
    SpecialRemoteChannel and ``TimestampMap`` both ask it.
    """
    return m.Remove(request.key) if now < request.timestamp else None


@dataclass
class TimestampMap:
    """GETTIMESTAMP over many clocks: each node's, and ours.

    The client gets our own clock ``local``; a later REMOVE-BEFORE at ``ts``
    means "within ``ts - local`` seconds", which node i reads on its clock
    as ``t_i + (ts - local)``.
    """

    local: int = 0
    nodes: dict[str, int] = field(default_factory=dict)

    def answer(self, node_clocks: Mapping[str, int], local: int) -> m.Timestamp:
        self.nodes = dict(node_clocks)
        self.local = local
        return m.Timestamp(local)

    def remove_for(
        self, node: str, node_version: int, request: m.RemoveBefore, now: int
    ) -> m.Message | str:
        """What ``node`` gets for the client's REMOVE-BEFORE, or why it gets nothing.

        ``now`` is our clock, the one the client's deadline is on.
        """
        if not supports(node_version, Feature.CLOCK):
            # No clock to tell below v3 (git-annex's gateway sends REMOVE
            # regardless): ours keeps the deadline for it.
            return deadline_kept_here(request, now) or "the deadline has passed"
        clock = self.nodes.get(node)
        if clock is None:
            # Its clock was never read (it was down at GETTIMESTAMP): removing
            # without the deadline could outlive the client's lock.
            return "its clock was not read (GETTIMESTAMP)"
        # A deadline already past on the node's clock would be negative, which
        # no git-annex parses: 0 is past on every clock, so the node refuses.
        return m.RemoveBefore(max(0, clock + (request.timestamp - self.local)), request.key)


# --- what the client is told -----------------------------------------------------------


def _succeeded_uuids(
    uuid: str, reply: m.Message, members: AbstractSet[str] | None
) -> tuple[str, ...]:
    """The repositories that a node announcing ``uuid`` vouches for with
    SUCCESS[-PLUS] / ALREADY-HAVE[-PLUS]: itself, and those it names that
    are nodes of the cluster."""
    plus = reply.uuids if isinstance(reply, (m.SuccessPlus, m.AlreadyHavePlus)) else ()
    return repository_uuids((uuid, *cluster_members(uuid, plus, members)))


def cluster_members(
    node_uuid: str, uuids: Iterable[str], members: AbstractSet[str] | None
) -> tuple[str, ...]:
    """The ``uuids`` that the node announcing ``node_uuid`` named which count:
    those that are nodes of the cluster (``members``, from cluster.log).

    Any other UUID a node names (a repository behind it that is not a node,
    or one it made up) reaches neither the location log nor the client.
    Another gateway of the cluster (it announces the cluster's UUID) names
    its own nodes, which this gateway's cluster.log may not list yet: it is
    the authority on them. None: every UUID counts.
    """
    if members is None or is_cluster_uuid(node_uuid):
        return tuple(uuids)
    return tuple(u for u in uuids if u in members)


@dataclass
class PutFanout:
    """One PUT (or DATA-PRESENT) spread over the target nodes.

    Feed it each node's answer to PUT, then the client's DATA, then each
    node's result; it says what each node is sent and what the client hears.
    A node that fails is dropped and the others go on. Nodes are named by
    their remote names (two other gateways announce the same cluster UUID).
    """

    client_version: int
    targets: dict[str, str]  # node name -> the UUID it announces
    # The cluster's nodes (cluster.log): the only UUIDs a PLUS list may pass on.
    members: AbstractSet[str] | None = None
    offsets: dict[str, int] = field(default_factory=dict)  # PUT-FROM per node
    already: list[str] = field(default_factory=list)  # repositories that had it
    stored: list[str] = field(default_factory=list)  # repositories that stored it
    # Some node had / stored it (a gateway node may name no repository).
    had: bool = False
    succeeded: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # node -> why
    start: int = 0  # the offset the client was told
    position: int = 0  # where in the object the client's bytes have reached
    lengths: dict[str, int] = field(default_factory=dict)  # DATA per node

    # --- PUT: the offers --------------------------------------------------------

    def answered(self, node: str, reply: m.Message) -> None:
        if isinstance(reply, m.PutFrom):
            self.offsets[node] = reply.offset
        elif isinstance(reply, (m.AlreadyHave, m.AlreadyHavePlus)):
            # A gateway node answers ALREADY-HAVE-PLUS: that is an answer too.
            self.had = True
            self.already.extend(_succeeded_uuids(self.targets[node], reply, self.members))
        else:
            self.fail(node, _describe(reply))

    def fail(self, node: str, why: str) -> None:
        self.offsets.pop(node, None)
        self.lengths.pop(node, None)
        self.failed.setdefault(node, why)

    @property
    def receiving(self) -> list[str]:
        """Nodes still taking part in the transfer."""
        return list(self.offsets)

    def offer(self) -> m.Message:
        """The client's answer to PUT."""
        if self.offsets:
            self.start = self.position = min(self.offsets.values())
            return m.PutFrom(self.start)
        if self.had:
            # Also when the others failed: the content is in the cluster.
            if supports(self.client_version, Feature.PLUS):
                return m.AlreadyHavePlus(tuple(dict.fromkeys(self.already)))
            return m.AlreadyHave()
        return self._failure()

    # --- DATA: what each node gets ------------------------------------------------

    def data(self, length: int) -> dict[str, m.Data]:
        """The DATA header for each node, from its own offset on."""
        total = self.start + length
        self.lengths = {n: max(0, total - o) for n, o in self.offsets.items()}
        return {n: m.Data(size) for n, size in self.lengths.items()}

    def slices(self, chunk: bytes) -> dict[str, bytes]:
        """The part of the client's next ``chunk`` each node needs; advances."""
        begin, self.position = self.position, self.position + len(chunk)
        out: dict[str, bytes] = {}
        for node, offset in self.offsets.items():
            skip = offset - begin
            if skip <= 0:
                out[node] = chunk
            elif skip < len(chunk):
                out[node] = chunk[skip:]
        return out

    # --- the results ---------------------------------------------------------------

    def result(self, node: str, reply: m.Message) -> None:
        if node not in self.offsets:
            return
        if isinstance(reply, (m.Success, m.SuccessPlus)):
            self.succeeded = True
            self.stored.extend(_succeeded_uuids(self.targets[node], reply, self.members))
        elif isinstance(reply, m.FailurePlus):
            # A gateway node: some of its nodes stored it, some did not.
            named = repository_uuids(cluster_members(self.targets[node], reply.uuids, self.members))
            self.succeeded = self.succeeded or bool(named)
            self.stored.extend(named)
            self.failed.setdefault(node, "FAILURE-PLUS")
        else:
            self.failed.setdefault(node, _describe(reply))

    def outcome(self) -> m.Message:
        """The client's answer after the body: every repository that has it now."""
        have = tuple(dict.fromkeys((*self.stored, *self.already)))
        if have or self.succeeded or self.had:
            plus = supports(self.client_version, Feature.PLUS)
            return m.SuccessPlus(have) if plus else m.Success()
        return self._failure()

    def _failure(self) -> m.Message:
        return m.Failure()


def remove_outcome(
    client_version: int,
    replies: Mapping[str, m.Message | str],
    uuids: Mapping[str, str],
    members: AbstractSet[str] | None = None,
) -> tuple[m.Message, tuple[str, ...]]:
    """The client's answer to REMOVE[-BEFORE] sent to every node, and who removed it.

    ``replies``: each node's reply, or a text saying why it could not answer,
    by node name; ``uuids``: the UUID each node announces.
    """
    removed: list[str] = []
    first_bad: m.Message | None = None
    for node, reply in replies.items():
        if isinstance(reply, (m.Success, m.SuccessPlus)):
            removed.extend(_succeeded_uuids(uuids[node], reply, members))
            continue
        if isinstance(reply, m.FailurePlus):
            removed.extend(repository_uuids(cluster_members(uuids[node], reply.uuids, members)))
        if first_bad is None:
            if isinstance(reply, (m.Failure, m.Error)):
                first_bad = reply
            else:
                why = reply if isinstance(reply, str) else _describe(reply)
                first_bad = m.Error(f"{node}: {why}")
    done = tuple(dict.fromkeys(removed))
    plus = supports(client_version, Feature.PLUS)
    if first_bad is None:
        return (m.SuccessPlus(done) if plus else m.Success()), done
    if plus:
        return m.FailurePlus(done), done
    return first_bad, done


def _describe(reply: m.Message) -> str:
    if isinstance(reply, m.Error):
        return f"ERROR {reply.text}"
    return type(reply).__name__
