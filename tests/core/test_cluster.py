"""Cluster gateways without git-annex: the decisions, then the fanout channel.

The first half tests protocol/cluster.py (tables and hypothesis properties);
the second drives transport/cluster.py's ClusterChannel through a real
Session over trio in-memory streams, the nodes being the scripted P2P
servers of tests/harness/fakes.py, and checks byte transcripts on the client's
side and what each node received on theirs.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.test_session import Client, script
from tests.fuzz import examples
from tests.harness.fakes import (
    CLIENT_UUID,
    TOKEN,
    FakeRepo,
    FakeTransport,
    OneToken,
    PeerConnection,
)
from torbridge.annex.query import QueryError
from torbridge.annex.remotes import parse_cluster_log, parse_proxy_log
from torbridge.config import Limits
from torbridge.protocol import cluster as c
from torbridge.protocol import messages as m
from torbridge.server.endpoints import Endpoint
from torbridge.server.session import Session
from torbridge.transport.cluster import ClusterNode, ClusterTransport
from torbridge.transport.framed import StreamLost

# TORBRIDGE_FUZZ_SCALE multiplies the examples (tests/fuzz.py).
PROPS = settings(
    max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

KEY = "SHA256E-s11--2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90.txt"
KEY2 = "SHA256E-s5--f2ca1bb6c7e907d06dafe4687e579fce76b37e4e93b7605022da52e6ccc26fd2.bin"
CLUSTER = "ac000000-0000-8000-8000-00000000c1c1"  # 'ac' prefix, '8' at index 14
OTHER_CLUSTER = "ac000000-0000-8000-8000-00000000c2c2"
GATEWAY = "9a7e0000-0000-4000-8000-00000000ea7e"  # the proxy's own repository
A = "aaaaaaaa-0000-4000-8000-00000000000a"
B = "bbbbbbbb-0000-4000-8000-00000000000b"
C = "cccccccc-0000-4000-8000-00000000000c"


def test_cluster_uuids() -> None:
    assert c.is_cluster_uuid(CLUSTER) and c.is_cluster_uuid(OTHER_CLUSTER)
    for uuid in (A, B, GATEWAY, "ac" + A[2:], CLUSTER[:-1], ""):
        assert not c.is_cluster_uuid(uuid), uuid
    assert c.repository_uuids([A, CLUSTER, B, A, OTHER_CLUSTER]) == (A, B)


# --- which nodes -----------------------------------------------------------------------


def refs(*costs: float) -> list[c.NodeRef]:
    return [
        c.NodeRef(f"{i:08x}-0000-4000-8000-000000000000", f"n{i}", cost)
        for i, cost in enumerate(costs)
    ]


def test_holders_cheapest_first_then_by_cost() -> None:
    nodes = refs(300, 100, 200, 100, 100)
    logged = {n.uuid for n in nodes} - {nodes[4].uuid}
    order = c.holders(nodes, logged, random.Random(1))
    assert [n.cost for n in order] == [100, 100, 200, 300]
    assert {n.name for n in order[:2]} == {"n1", "n3"}
    assert c.holders(nodes, set(), random.Random(1)) == []
    assert c.holders(nodes, {CLUSTER}, random.Random(1)) == []


def test_holders_spread_over_equal_nodes() -> None:
    nodes = refs(100, 100, 100)
    logged = {n.uuid for n in nodes}
    firsts = {c.holders(nodes, logged, random.Random(seed))[0].name for seed in range(50)}
    assert firsts == {"n0", "n1", "n2"}
    # A seeded rng decides the order and nothing else does.
    assert c.holders(nodes, logged, random.Random(7)) == c.holders(nodes, logged, random.Random(7))


@PROPS
@given(
    st.lists(st.sampled_from([100.0, 150.0, 200.0]), min_size=0, max_size=8),
    st.sets(st.integers(0, 7)),
    st.integers(0, 2**32),
)
def test_holders_property(costs: list[float], logged_idx: set[int], seed: int) -> None:
    nodes = refs(*costs)
    logged = {nodes[i].uuid for i in logged_idx if i < len(nodes)}
    order = c.holders(nodes, logged, random.Random(seed))
    assert sorted(n.uuid for n in order) == sorted(logged)
    assert [n.cost for n in order] == sorted(n.cost for n in order)


def test_put_targets_table() -> None:
    a, b, cc = (c.NodeRef(u, u[:1]) for u in (A, B, C))
    nodes = [a, b, cc]
    wants_b = lambda n: n is b  # noqa: E731
    assert c.put_targets(nodes, set(), lambda n: True) == nodes
    assert c.put_targets(nodes, {A}, lambda n: True) == [b, cc]
    assert c.put_targets(nodes, set(), wants_b) == [b]
    # Nobody not logged wants it: those not logged, all the same.
    assert c.put_targets(nodes, {B}, wants_b) == [a, cc]
    # A stale log says every node has it: all of them, never none.
    assert c.put_targets(nodes, {A, B, C}, lambda n: False) == nodes
    assert c.put_targets([], set(), lambda n: True) == []


@PROPS
@given(st.integers(1, 6), st.sets(st.integers(0, 5)), st.sets(st.integers(0, 5)))
def test_put_targets_never_empty(count: int, logged_idx: set[int], wanted_idx: set[int]) -> None:
    nodes = refs(*([200.0] * count))
    logged = {nodes[i].uuid for i in logged_idx if i < count}
    wanted = {nodes[i].uuid for i in wanted_idx if i < count}
    targets = c.put_targets(nodes, logged, lambda n: n.uuid in wanted)
    assert targets
    missing = [n for n in nodes if n.uuid not in logged]
    if any(n.uuid in wanted for n in missing):
        assert targets == [n for n in missing if n.uuid in wanted]
    elif missing:
        assert targets == missing


# --- what each node is told ----------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "lowest"),
    [
        (m.Valid(), 1),
        (m.Invalid(), 1),
        (m.Bypass((A,)), 2),
        (m.GetTimestamp(), 3),
        (m.DataPresent(), 4),
        (m.Put(None, KEY), 0),
        (m.Remove(KEY), 0),
        (m.Data(5), 0),
    ],
)
def test_for_node(message: m.Message, lowest: int) -> None:
    for version in range(5):
        assert c.for_node(message, version) == (message if version >= lowest else None)


def test_timestamp_translation() -> None:
    stamps = c.TimestampMap()
    assert stamps.answer({A: 1000, B: 50_000}, local=7) == m.Timestamp(7)
    request = m.RemoveBefore(7 + 60, KEY)  # "within 60 s"
    assert stamps.remove_for(A, 4, request, now=8) == m.RemoveBefore(1060, KEY)
    assert stamps.remove_for(B, 3, request, now=8) == m.RemoveBefore(50_060, KEY)
    # Below v3 a node has no clock to compare: REMOVE while ours is in time.
    assert stamps.remove_for(C, 2, request, now=8) == m.Remove(KEY)
    assert stamps.remove_for(A, 0, request, now=66) == m.Remove(KEY)
    assert stamps.remove_for(A, 0, request, now=67) == "the deadline has passed"
    # A v3+ node whose clock was never read cannot be told a deadline.
    assert "not read" in str(stamps.remove_for(C, 3, request, now=8))
    # A new GETTIMESTAMP replaces the old clocks.
    stamps.answer({C: 5}, local=100)
    assert "not read" in str(stamps.remove_for(A, 4, m.RemoveBefore(110, KEY), now=100))
    # A deadline already past on the node's clock: 0, which it refuses.
    assert stamps.remove_for(C, 4, m.RemoveBefore(90, KEY), now=100) == m.RemoveBefore(0, KEY)


# --- PUT fanout ----------------------------------------------------------------------------


def fanout(version: int, offers: dict[str, m.Message]) -> c.PutFanout:
    put = c.PutFanout(version, {node: node for node in offers})  # named by their UUIDs
    for node, reply in offers.items():
        put.answered(node, reply)
    return put


def test_put_offsets_lengths_and_slices() -> None:
    content = bytes(range(100))
    put = fanout(4, {A: m.PutFrom(30), B: m.PutFrom(10), C: m.PutFrom(70)})
    assert put.offer() == m.PutFrom(10)
    assert put.data(90) == {A: m.Data(70), B: m.Data(90), C: m.Data(30)}
    got: dict[str, bytes] = {A: b"", B: b"", C: b""}
    for start in range(10, 100, 25):  # chunks [10,35) [35,60) [60,85) [85,100)
        for node, piece in put.slices(content[start : start + 25]).items():
            got[node] += piece
    assert got == {A: content[30:], B: content[10:], C: content[70:]}


@PROPS
@given(
    st.binary(min_size=0, max_size=300),
    st.lists(st.integers(0, 320), min_size=1, max_size=5),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_put_slices_property(content: bytes, offsets: list[int], cuts: list[int]) -> None:
    """Whatever the offsets and the client's chunking, node i gets content[o_i:]."""
    nodes = [f"n{i}" for i in range(len(offsets))]
    put = fanout(2, {n: m.PutFrom(o) for n, o in zip(nodes, offsets, strict=True)})
    start = min(offsets)
    assert put.offer() == m.PutFrom(start)
    sent = content[start:]
    headers = put.data(len(sent))
    got = {n: b"" for n in nodes}
    position, i = 0, 0
    while position < len(sent):
        size = cuts[i % len(cuts)]
        i += 1
        for node, piece in put.slices(sent[position : position + size]).items():
            got[node] += piece
        position += size
    for node, offset in zip(nodes, offsets, strict=True):
        assert got[node] == content[offset:]
        assert headers[node] == m.Data(len(content[offset:]))


def test_put_node_dropped_mid_body_gets_nothing_more() -> None:
    put = fanout(4, {A: m.PutFrom(0), B: m.PutFrom(0)})
    put.offer()
    put.data(10)
    assert set(put.slices(b"01234")) == {A, B}
    put.fail(B, "lost")
    assert put.slices(b"56789") == {A: b"56789"}
    put.result(A, m.Success())
    put.result(B, m.Success())  # too late: it was dropped
    assert put.outcome() == m.SuccessPlus((A,))


@pytest.mark.parametrize("version", range(5))
def test_put_all_stored(version: int) -> None:
    put = fanout(version, {A: m.PutFrom(0), B: m.PutFrom(0)})
    put.offer()
    put.data(3)
    put.result(A, m.Success())
    put.result(B, m.Success())
    assert put.outcome() == (m.SuccessPlus((A, B)) if version >= 2 else m.Success())
    assert put.stored == [A, B]


@pytest.mark.parametrize("version", range(5))
def test_put_all_already_have(version: int) -> None:
    put = fanout(version, {A: m.AlreadyHave(), B: m.AlreadyHave()})
    assert put.offer() == (m.AlreadyHavePlus((A, B)) if version >= 2 else m.AlreadyHave())
    assert put.receiving == []


@pytest.mark.parametrize("version", range(5))
def test_put_nothing_stored_is_failure(version: int) -> None:
    put = fanout(version, {A: m.PutFrom(0), B: m.Error("disk full")})
    assert put.offer() == m.PutFrom(0)
    assert "ERROR disk full" in put.failed[B]
    put.data(3)
    put.result(A, m.Failure())
    assert put.outcome() == m.Failure()
    assert put.stored == []
    # No node at all answered.
    nobody = fanout(version, {A: m.Error("x"), B: m.Failure()})
    assert nobody.offer() == m.Failure()


def test_bug1_gateway_node_answering_already_have_plus() -> None:
    """git-annex's gateway ends the session with "protocol error" here."""
    put = fanout(4, {A: m.PutFrom(0), CLUSTER: m.AlreadyHavePlus((B, C, OTHER_CLUSTER))})
    assert put.offer() == m.PutFrom(0)
    assert CLUSTER not in put.failed
    put.data(1)
    put.result(A, m.Success())
    assert put.outcome() == m.SuccessPlus((A, B, C))
    # Every node is a gateway that has it.
    only = fanout(2, {CLUSTER: m.AlreadyHavePlus((B,)), OTHER_CLUSTER: m.AlreadyHavePlus(())})
    assert only.offer() == m.AlreadyHavePlus((B,))
    assert fanout(1, {CLUSTER: m.AlreadyHavePlus((B,))}).offer() == m.AlreadyHave()


@pytest.mark.parametrize("version", range(5))
def test_bug3_already_have_counts_in_a_mixed_upload(version: int) -> None:
    """A node that had it stays in the result, also when every transfer failed."""
    put = fanout(version, {A: m.AlreadyHave(), B: m.PutFrom(0), C: m.PutFrom(0)})
    assert put.offer() == m.PutFrom(0)
    put.data(4)
    put.result(B, m.Success())
    put.fail(C, "lost")
    assert put.outcome() == (m.SuccessPlus((B, A)) if version >= 2 else m.Success())

    put = fanout(version, {A: m.AlreadyHave(), B: m.PutFrom(0)})
    put.offer()
    put.data(4)
    put.result(B, m.Failure())
    assert put.outcome() == (m.SuccessPlus((A,)) if version >= 2 else m.Success())


@pytest.mark.parametrize("version", range(5))
def test_bug6_already_have_and_the_rest_failing(version: int) -> None:
    """git-annex's gateway crashes on `minimum []` here."""
    put = fanout(version, {A: m.AlreadyHave(), B: m.Error("broken"), C: m.Failure()})
    assert put.offer() == (m.AlreadyHavePlus((A,)) if version >= 2 else m.AlreadyHave())
    assert set(put.failed) == {B, C}


def test_put_results_from_gateway_nodes() -> None:
    put = fanout(4, {A: m.PutFrom(0), CLUSTER: m.PutFrom(0), OTHER_CLUSTER: m.PutFrom(0)})
    put.offer()
    put.data(2)
    put.result(A, m.Success())
    put.result(CLUSTER, m.SuccessPlus((B, OTHER_CLUSTER)))
    put.result(OTHER_CLUSTER, m.FailurePlus((C,)))
    outcome = put.outcome()
    assert outcome == m.SuccessPlus((A, B, C))
    assert not any(c.is_cluster_uuid(u) for u in put.stored)
    assert OTHER_CLUSTER in put.failed
    # A gateway that stored it on nodes it names nobody for still counts.
    anon = fanout(4, {CLUSTER: m.PutFrom(0)})
    anon.offer()
    anon.data(1)
    anon.result(CLUSTER, m.SuccessPlus(()))
    assert anon.outcome() == m.SuccessPlus(())


@PROPS
@given(
    st.integers(0, 4),
    st.lists(
        st.tuples(
            st.sampled_from([A, B, C, CLUSTER, OTHER_CLUSTER]),
            st.sampled_from(["from", "have", "haveplus", "error"]),
            st.sampled_from(["success", "successplus", "failure", "failureplus", "lost"]),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    ),
)
def test_cluster_uuids_never_reported(version: int, script_: list[tuple[str, str, str]]) -> None:
    """Whatever nodes say, no cluster UUID is ever told as a copy, nor recorded."""
    plus = (A, CLUSTER, C, OTHER_CLUSTER)
    offers = {
        "from": m.PutFrom(0),
        "have": m.AlreadyHave(),
        "haveplus": m.AlreadyHavePlus(plus),
        "error": m.Error("no"),
    }
    results = {
        "success": m.Success(),
        "successplus": m.SuccessPlus(plus),
        "failure": m.Failure(),
        "failureplus": m.FailurePlus(plus),
    }
    put = fanout(version, {node: offers[o] for node, o, _ in script_})
    replies: list[m.Message] = [put.offer()]
    if put.receiving:
        put.data(1)
        for node, _, r in script_:
            if r == "lost":
                put.fail(node, "lost")
            else:
                put.result(node, results[r])
        replies.append(put.outcome())
    for reply in replies:
        if isinstance(reply, (m.SuccessPlus, m.AlreadyHavePlus)):
            assert not any(c.is_cluster_uuid(u) for u in reply.uuids)
            assert version >= 2
    assert not any(c.is_cluster_uuid(u) for u in (*put.stored, *put.already))
    removes = {node: results[r] if r != "lost" else "lost" for node, _, r in script_}
    answer, removed = remove_outcome(version, removes)
    assert not any(c.is_cluster_uuid(u) for u in removed)
    if isinstance(answer, (m.SuccessPlus, m.FailurePlus)):
        assert answer.uuids == removed and version >= 2


# --- REMOVE ---------------------------------------------------------------------------------


def remove_outcome(
    version: int, replies: dict[str, m.Message | str]
) -> tuple[m.Message, tuple[str, ...]]:
    """``c.remove_outcome`` with the nodes named by their UUIDs."""
    return c.remove_outcome(version, replies, {node: node for node in replies})


@pytest.mark.parametrize("version", range(5))
def test_remove_outcome_all_removed(version: int) -> None:
    answer, removed = remove_outcome(version, {A: m.Success(), B: m.Success()})
    assert removed == (A, B)
    assert answer == (m.SuccessPlus((A, B)) if version >= 2 else m.Success())


@pytest.mark.parametrize("version", range(5))
def test_remove_outcome_some_failed(version: int) -> None:
    answer, removed = remove_outcome(
        version, {A: m.Success(), B: m.Failure(), C: m.Error("locked")}
    )
    assert removed == (A,)
    assert answer == (m.FailurePlus((A,)) if version >= 2 else m.Failure())


@pytest.mark.parametrize("version", range(5))
def test_remove_outcome_unreachable_node(version: int) -> None:
    answer, removed = remove_outcome(version, {A: m.Success(), B: "unreachable"})
    assert removed == (A,)
    if version >= 2:
        assert answer == m.FailurePlus((A,))
    else:
        assert answer == m.Error(f"{B}: unreachable")


def test_remove_outcome_from_gateway_nodes() -> None:
    answer, removed = remove_outcome(
        4,
        {
            A: m.Success(),
            CLUSTER: m.SuccessPlus((B, OTHER_CLUSTER)),
            OTHER_CLUSTER: m.FailurePlus((C,)),
        },
    )
    # FAILURE-PLUS: what it did remove counts, and the whole is a failure.
    assert removed == (A, B, C)
    assert answer == m.FailurePlus((A, B, C))
    answer, removed = remove_outcome(1, {CLUSTER: m.FailurePlus((C,))})
    assert removed == (C,)
    assert isinstance(answer, m.Error) and CLUSTER in answer.text
    assert remove_outcome(4, {}) == (m.SuccessPlus(()), ())


# === the channel ===========================================================================

LIMITS = Limits(auth_timeout=10.0, idle_timeout=300.0, peer_timeout=30.0, stall_timeout=20.0)
GUARD = 10_000.0  # virtual seconds: a test that waits this long hangs
AUTH = f"AUTH {CLIENT_UUID} {TOKEN}\n".encode()
AUTH_OK = f"AUTH-SUCCESS {CLUSTER}\n".encode()


@dataclass
class Knowledge:
    """Stands in for AnnexQuery: a location log and preferred content, in memory."""

    logged: dict[str, set[str]] = field(default_factory=dict)
    unwanted: set[str] = field(default_factory=set)  # remote names that want nothing
    asked: list[str] = field(default_factory=list)

    async def locations(self, key: str) -> frozenset[str]:
        self.asked.append(key)
        return frozenset(self.logged.get(key, ()))

    broken: bool = False  # preferred content cannot be read
    wanted_asked: list[tuple[tuple[str, ...], str, str | None]] = field(default_factory=list)

    async def wanted(self, remotes: Sequence[str], key: str, af: str | None) -> dict[str, bool]:
        self.wanted_asked.append((tuple(remotes), key, af))
        if self.broken:
            raise QueryError("git annex find failed")
        return {remote: remote not in self.unwanted for remote in remotes}


@dataclass
class Recorder:
    records: list[tuple[str, str, bool]] = field(default_factory=list)

    def record(self, key: str, uuid: str, present: bool) -> None:
        self.records.append((key, uuid, present))


@dataclass
class Cluster:
    client: Client
    repos: dict[str, FakeRepo]  # by node name
    transports: dict[str, FakeTransport]
    knowledge: Knowledge
    recorder: Recorder
    session: Session

    def conns(self, name: str) -> list[PeerConnection]:
        return self.repos[name].connections

    def received(self, name: str) -> list[Any]:
        """Every message node ``name`` received, past the handshake."""
        return [
            msg
            for conn in self.conns(name)
            for msg in conn.received
            if not isinstance(msg, (m.Version, m.Bypass))
        ]


NODE_UUIDS = {"n1": A, "n2": B, "n3": C}


@asynccontextmanager
async def cluster(
    repos: dict[str, FakeRepo] | None = None,
    knowledge: Knowledge | None = None,
    gateways: dict[str, str] | None = None,
    costs: dict[str, float] | None = None,
    seed: int = 0,
    behind: dict[str, frozenset[str]] | None = None,
    lockstep: bool = False,
    members: frozenset[str] | None = None,
) -> AsyncIterator[Cluster]:
    """A Session whose endpoint is a cluster of fake nodes n1, n2, n3 (A, B, C)."""
    repos = repos or {name: FakeRepo(uuid=uuid) for name, uuid in NODE_UUIDS.items()}
    knowledge = knowledge or Knowledge()
    recorder = Recorder()
    gateways = gateways or {}
    costs = costs or {}
    behind = behind or {}
    with trio.fail_after(GUARD * 2):
        async with trio.open_nursery() as nursery:
            transports = {
                name: FakeTransport(repo, name=name, server_nursery=nursery, lockstep=lockstep)
                for name, repo in repos.items()
            }
            nodes = [
                ClusterNode(
                    c.NodeRef(
                        repo.uuid, name, costs.get(name, 200.0), behind.get(name, frozenset())
                    ),
                    transports[name],
                    gateways.get(name),
                )
                for name, repo in repos.items()
            ]
            transport = ClusterTransport(
                "cl",
                CLUSTER,
                GATEWAY,
                nodes,
                knowledge,
                recorder,
                node_timeout=LIMITS.peer_timeout * 0.8,
                stall_timeout=LIMITS.stall_timeout * 0.8,
                rng=random.Random(seed),
                # What cluster.log lists: n1, n2, n3 unless told.
                members=frozenset(NODE_UUIDS.values()) if members is None else members,
            )
            endpoint = Endpoint("cl", CLUSTER, transport, Path("/nonexistent"), OneToken(), LIMITS)
            pair = (
                trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
            )
            ours, theirs = pair()
            session = Session(theirs, endpoint)
            finished = trio.Event()

            async def run() -> None:
                try:
                    await session.run()
                finally:
                    finished.set()

            nursery.start_soon(run)
            yield Cluster(Client(ours), repos, transports, knowledge, recorder, session)
            with trio.fail_after(GUARD):
                await ours.aclose()
                await finished.wait()
    # The session closed every node connection it opened.
    for repo in repos.values():
        assert all(conn.finished.is_set() for conn in repo.connections)
    for t in transports.values():
        assert all(ch.closed for ch in t.channels)


async def login(cl: Cluster, version: int = 4) -> None:
    await cl.client.send(AUTH)
    await cl.client.expect(AUTH_OK)
    if version:
        await cl.client.send(b"VERSION %d\n" % version)
        await cl.client.expect(b"VERSION %d\n" % version)


def plus(line: bytes) -> tuple[str, set[str]]:
    """A PLUS reply as its word and its UUIDs (in the order the nodes finished)."""
    assert line.endswith(b"\n")
    word, *uuids = line.decode().split()
    assert len(uuids) == len(set(uuids)), line
    return word, set(uuids)


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_version_answered_without_touching_nodes(autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as cl:
        await login(cl, 4)
        assert all(not t.opens for t in cl.transports.values())


async def test_put_three_nodes_from_different_offsets(autojump_clock: trio.abc.Clock) -> None:
    content = blob(300_000)
    repos = {
        "n1": FakeRepo(uuid=A),
        "n2": FakeRepo(uuid=B, partial={KEY: content[:100_000]}),
        "n3": FakeRepo(uuid=C, partial={KEY: content[:250_000]}),
    }
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT f.bin {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        await cl.client.send(b"DATA 300000\n")
        await cl.client.send_in_pieces(content, 7_001)
        await cl.client.send(b"VALID\n")
        reply = await cl.client.line()
    assert plus(reply) == ("SUCCESS-PLUS", {A, B, C})
    for name, offset in (("n1", 0), ("n2", 100_000), ("n3", 250_000)):
        assert cl.received(name) == [m.Put("f.bin", KEY), m.Data(300_000 - offset), m.Valid()]
        [conn] = cl.conns(name)
        assert conn.bodies == [content[offset:]], name
        assert cl.repos[name].contents == {KEY: content}
    assert sorted(cl.recorder.records) == sorted((KEY, u, True) for u in (A, B, C))


async def test_put_v0_and_v1_clients(autojump_clock: trio.abc.Clock) -> None:
    content = b"hello world"
    for version in (0, 1):
        async with cluster() as cl:
            await login(cl, version)
            tail = b"VALID\n" if version else b""
            await cl.client.send(script(f"PUT  {KEY}\n".encode(), b"DATA 11\n", content, tail))
            assert await cl.client.line() == b"PUT-FROM 0\n"
            assert await cl.client.line() == b"SUCCESS\n"
        for name in NODE_UUIDS:
            assert cl.repos[name].contents == {KEY: content}
            assert cl.conns(name)[0].version == version


async def test_put_node_unreachable_at_open(autojump_clock: trio.abc.Clock) -> None:
    """Bug 2: git-annex's gateway ends the whole session; the others go on here."""
    content = blob(50_000)
    async with cluster() as cl:
        cl.transports["n2"].unreachable = "connection refused"
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        await cl.client.send(b"DATA 50000\n", content, b"VALID\n")
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, C})
        # The session goes on: the next request is served by the same cluster.
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE\n"  # our fake log has no record
    assert cl.repos["n1"].contents == cl.repos["n3"].contents == {KEY: content}
    assert cl.repos["n2"].connections == []
    assert sorted(cl.recorder.records) == [(KEY, A, True), (KEY, C, True)]


async def test_put_node_dies_mid_body(autojump_clock: trio.abc.Clock) -> None:
    content = blob(400_000)

    async def die_half_way(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        header = await conn.receive()
        assert isinstance(header, m.Data)
        await conn.receive_body(header.length, stop_after=100_000)
        await conn.hang_up()
        raise StreamLost("hung up mid-body")  # ends the fake server

    repos = {name: FakeRepo(uuid=uuid) for name, uuid in NODE_UUIDS.items()}
    repos["n2"].hooks[m.Put] = die_half_way
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        await cl.client.send(b"DATA 400000\n")
        await cl.client.send_in_pieces(content, 32_768)
        await cl.client.send(b"VALID\n")
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, C})
    assert cl.repos["n1"].contents == cl.repos["n3"].contents == {KEY: content}
    assert cl.repos["n2"].contents == {}
    assert sorted(cl.recorder.records) == [(KEY, A, True), (KEY, C, True)]


async def test_put_every_node_fails(autojump_clock: trio.abc.Clock) -> None:
    async def refuse(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Error("no space"))

    repos = {name: FakeRepo(uuid=uuid, hooks={m.Put: refuse}) for name, uuid in NODE_UUIDS.items()}
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        line = await cl.client.line()
        assert line.startswith(b"ERROR cl: no node stored it") and b"no space" in line
        assert cl.recorder.records == []


async def test_put_mixed_already_have_gateway_plus(autojump_clock: trio.abc.Clock) -> None:
    """Bugs 1 and 3 end to end: ALREADY-HAVE-PLUS accepted, ALREADY-HAVE counted."""

    async def have_plus(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.AlreadyHavePlus((C, OTHER_CLUSTER)))

    repos = {
        "n1": FakeRepo(uuid=A),
        "n2": FakeRepo(uuid=B, contents={KEY: b"hello world"}),
        "gw": FakeRepo(uuid=OTHER_CLUSTER, hooks={m.Put: have_plus}),
    }
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B, C})
    assert cl.repos["n1"].contents == {KEY: b"hello world"}
    assert sorted(cl.recorder.records) == sorted((KEY, u, True) for u in (A, B, C))


@pytest.mark.parametrize("version", [2, 4])
async def test_plus_lists_pass_on_only_the_clusters_nodes(
    version: int, autojump_clock: trio.abc.Clock
) -> None:
    """A node naming repositories that are not nodes of the cluster: they reach
    neither the location log nor the client; its own UUID and members do."""
    stranger = "5a5a5a5a-0000-4000-8000-000000000001"

    async def stored_plus(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        data = await conn.receive()
        assert isinstance(data, m.Data)
        await conn.receive_body(data.length)
        assert isinstance(await conn.receive(), m.Valid)
        await conn.send(m.SuccessPlus((stranger, C)))

    async def removed_plus(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.SuccessPlus((stranger,)))

    repos = {
        "n1": FakeRepo(uuid=A, hooks={m.Put: stored_plus, m.Remove: removed_plus}),
        "n2": FakeRepo(uuid=B),
    }
    async with cluster(repos, members=frozenset({A, B, C})) as cl:
        await login(cl, version)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B, C})
        await cl.client.send(f"REMOVE {KEY}\n".encode())
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B})
    assert stranger not in {uuid for _, uuid, _ in cl.recorder.records}
    assert sorted(cl.recorder.records) == sorted(
        [(KEY, u, True) for u in (A, B, C)] + [(KEY, u, False) for u in (A, B)]
    )


async def test_another_gateway_names_its_own_nodes(autojump_clock: trio.abc.Clock) -> None:
    """Another gateway of the cluster is the authority on its nodes: ones this
    gateway's cluster.log does not list yet count (test_two_gateways)."""
    newcomer = "5a5a5a5a-0000-4000-8000-000000000002"

    async def have_plus(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.AlreadyHavePlus((newcomer, OTHER_CLUSTER)))

    repos = {
        "n1": FakeRepo(uuid=A, contents={KEY: b"hello world"}),
        "gw": FakeRepo(uuid=OTHER_CLUSTER, hooks={m.Put: have_plus}),
    }
    async with cluster(repos, gateways={"gw": OTHER_GATEWAY}, members=frozenset({A})) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert plus(await cl.client.line()) == ("ALREADY-HAVE-PLUS", {A, newcomer})
    assert sorted(cl.recorder.records) == sorted((KEY, u, True) for u in (A, newcomer))


async def test_put_targets_follow_log_and_preferred_content(
    autojump_clock: trio.abc.Clock,
) -> None:
    knowledge = Knowledge(logged={KEY: {A}}, unwanted={"n3"})
    async with cluster(knowledge=knowledge) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {B})
    assert cl.repos["n2"].contents == {KEY: b"hello world"}
    assert cl.repos["n1"].connections == cl.repos["n3"].connections == []


async def test_put_asks_preferred_content_once_for_the_unlogged_nodes(
    autojump_clock: trio.abc.Clock,
) -> None:
    knowledge = Knowledge(logged={KEY: {A}}, unwanted={"n2"})
    async with cluster(knowledge=knowledge) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT dir/f.txt {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {C})
    # One question for every node not logged, with the PUT's file name.
    assert knowledge.wanted_asked == [(("n2", "n3"), KEY, "dir/f.txt")]


async def test_put_when_preferred_content_cannot_be_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Counted as wanted: every node not logged gets it (a copy too many is safe)."""
    knowledge = Knowledge(logged={KEY: {A}}, unwanted={"n2"}, broken=True)
    async with cluster(knowledge=knowledge) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT f {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {B, C})


async def test_get_no_logged_holder(autojump_clock: trio.abc.Clock) -> None:
    for version in (0, 1, 4):
        async with cluster() as cl:
            await login(cl, version)
            await cl.client.send(f"GET 0 f {KEY}\n".encode())
            expected = b"DATA 0\nINVALID\n" if version else b"DATA 0\n"
            assert await cl.client.read(len(expected)) == expected
            # The client's verdict is read and dropped; the session goes on.
            await cl.client.send(b"FAILURE\n", b"LOCKCONTENT " + KEY.encode() + b"\n")
            assert await cl.client.line() == b"FAILURE\n"
        assert all(t.opens == [] for t in cl.transports.values())


async def test_get_falls_back_to_the_next_holder(autojump_clock: trio.abc.Clock) -> None:
    content = blob(200_000)
    repos = {
        name: FakeRepo(uuid=uuid, contents={KEY: content}) for name, uuid in NODE_UUIDS.items()
    }
    knowledge = Knowledge(logged={KEY: {A, B}})
    # n1 is the cheapest holder, so it is asked first; it is down.
    async with cluster(repos, knowledge, costs={"n1": 100.0}) as cl:
        cl.transports["n1"].unreachable = "no route"
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        assert await cl.client.line() == b"DATA 200000\n"
        assert await cl.client.read(200_000) == content
        assert await cl.client.line() == b"VALID\n"
        await cl.client.send(b"SUCCESS\n")
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"SUCCESS\n"
    # Tried for GET; then down, so CHECKPRESENT went to n2 at once, without
    # paying n1's connect deadline again.
    assert len(cl.transports["n1"].opens) == 1
    assert cl.transports["n3"].opens == []  # not logged: never asked
    assert cl.received("n2") == [m.Get(0, "f", KEY), m.Success(), m.CheckPresent(KEY)]
    assert cl.recorder.records == []  # GET teaches the log nothing


async def test_get_every_holder_unreachable(autojump_clock: trio.abc.Clock) -> None:
    knowledge = Knowledge(logged={KEY: {A, B}})
    async with cluster(knowledge=knowledge) as cl:
        cl.transports["n1"].unreachable = "down"
        cl.transports["n2"].unreachable = "down"
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        line = await cl.client.line()
        assert line.startswith(b"ERROR cl: no node that has it answered"), line


async def test_remove_reaches_every_node(autojump_clock: trio.abc.Clock) -> None:
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    knowledge = Knowledge(logged={KEY: {A}})  # the log knows only n1 has it
    for version, answer in ((4, ("SUCCESS-PLUS", {A, B, C})), (1, ("SUCCESS", set()))):
        for repo in repos.values():
            repo.contents = {KEY: b"x"}
            repo.connections.clear()
        async with cluster(repos, knowledge) as cl:
            await login(cl, version)
            await cl.client.send(f"REMOVE {KEY}\n".encode())
            assert plus(await cl.client.line()) == answer
        assert all(repo.contents == {} for repo in repos.values())
        assert sorted(cl.recorder.records) == sorted((KEY, u, False) for u in (A, B, C))


async def test_remove_with_a_node_down(autojump_clock: trio.abc.Clock) -> None:
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    async with cluster(repos) as cl:
        cl.transports["n3"].unreachable = "down"
        await login(cl, 4)
        await cl.client.send(f"REMOVE {KEY}\n".encode())
        assert plus(await cl.client.line()) == ("FAILURE-PLUS", {A, B})
    assert sorted(cl.recorder.records) == [(KEY, A, False), (KEY, B, False)]
    assert repos["n3"].contents == {KEY: b"x"}


async def test_gettimestamp_and_remove_before_per_node(autojump_clock: trio.abc.Clock) -> None:
    repos = {
        "n1": FakeRepo(uuid=A, contents={KEY: b"x"}, timestamp=1_000),
        "n2": FakeRepo(uuid=B, contents={KEY: b"x"}, timestamp=900_000),
        "n3": FakeRepo(uuid=C, contents={KEY: b"x"}, max_version=2),  # no clock below v3
    }
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(b"GETTIMESTAMP\n")
        line = await cl.client.line()
        assert line.startswith(b"TIMESTAMP ")
        local = int(line.split()[1])
        await cl.client.send(f"REMOVE-BEFORE {local + 60} {KEY}\n".encode())
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B, C})
    assert cl.received("n1") == [m.GetTimestamp(), m.RemoveBefore(1_060, KEY)]
    assert cl.received("n2") == [m.GetTimestamp(), m.RemoveBefore(900_060, KEY)]
    assert cl.received("n3") == [m.Remove(KEY)]
    assert all(repo.contents == {} for repo in repos.values())


async def test_remove_before_without_gettimestamp(autojump_clock: trio.abc.Clock) -> None:
    """No clock was read: no v3+ node may be told a deadline it cannot know."""
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"REMOVE-BEFORE 99 {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE-PLUS\n"
    assert all(repo.contents == {KEY: b"x"} for repo in repos.values())
    assert cl.recorder.records == []


async def test_bypass_excludes_a_gateway_node(autojump_clock: trio.abc.Clock) -> None:
    other_gateway = "0e0e0e0e-0000-4000-8000-0000000000ee"
    repos = {
        "n1": FakeRepo(uuid=A),
        "n2": FakeRepo(uuid=B),
        "gw2": FakeRepo(uuid=CLUSTER),  # the same cluster through another gateway
    }
    async with cluster(repos, gateways={"gw2": other_gateway}) as cl:
        await login(cl, 4)
        await cl.client.send(f"BYPASS {other_gateway}\n".encode())
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B})
    assert cl.transports["gw2"].opens == []
    # The nodes are told the bypass set: the client's, and this gateway.
    for name in ("n1", "n2"):
        [(version, bypass, _)] = cl.transports[name].opens
        assert version == 4 and set(bypass) == {other_gateway, GATEWAY}
        assert cl.conns(name)[0].bypass == bypass


async def test_gateway_node_used_without_bypass(autojump_clock: trio.abc.Clock) -> None:
    """Without BYPASS the other gateway is a fanout node, told our own UUID."""
    repos = {"n1": FakeRepo(uuid=A), "gw2": FakeRepo(uuid=CLUSTER)}
    async with cluster(repos, gateways={"gw2": OTHER_GATEWAY}) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        # The other gateway's plain SUCCESS names its cluster only: not a copy.
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A})
    # Told our UUID and its own (which it adds itself anyway).
    assert set(cl.transports["gw2"].opens[0][1]) == {GATEWAY, OTHER_GATEWAY}
    assert cl.recorder.records == [(KEY, A, True)]


OTHER_GATEWAY = "0e0e0e0e-0000-4000-8000-0000000000ee"
THIRD_GATEWAY = "0f0f0f0f-0000-4000-8000-0000000000ff"
D = "dddddddd-0000-4000-8000-00000000000d"  # a node behind gw2
E = "eeeeeeee-0000-4000-8000-00000000000e"  # a node behind gw3


async def test_two_other_gateways_are_two_nodes(autojump_clock: trio.abc.Clock) -> None:
    """Both announce the cluster's UUID: each is still a node of its own, and
    each is told the other is served, so neither passes the PUT on to it."""
    repos = {"n1": FakeRepo(uuid=A), "gw2": FakeRepo(uuid=CLUSTER), "gw3": FakeRepo(uuid=CLUSTER)}
    gateways = {"gw2": OTHER_GATEWAY, "gw3": THIRD_GATEWAY}
    behind = {"gw2": frozenset({D}), "gw3": frozenset({E})}
    async with cluster(repos, gateways=gateways, behind=behind) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A})
    for name in ("gw2", "gw3"):
        assert repos[name].contents == {KEY: b"hello world"}, name
        [conn] = cl.conns(name)
        assert set(conn.bypass) == {GATEWAY, OTHER_GATEWAY, THIRD_GATEWAY}
    assert repos["n1"].contents == {KEY: b"hello world"}


@pytest.mark.parametrize(
    ("logged", "known", "asked"),
    [
        # The cluster's UUID is logged whenever any node has the key: the
        # other gateway is a holder only if a node behind it is logged...
        ({A, CLUSTER}, True, "n1"),
        ({D, CLUSTER}, True, "gw2"),
        # ...or, not knowing its nodes, if none of ours is.
        ({A, CLUSTER}, False, "n1"),
        ({D, CLUSTER}, False, "gw2"),
        ({CLUSTER}, False, "gw2"),
    ],
)
async def test_get_from_the_gateway_whose_nodes_have_it(
    autojump_clock: trio.abc.Clock, logged: set[str], known: bool, asked: str
) -> None:
    content = {KEY: b"hello world"}
    repos = {
        "n1": FakeRepo(uuid=A, contents=content if asked == "n1" else {}),
        "gw2": FakeRepo(uuid=CLUSTER, contents=content if asked == "gw2" else {}),
    }
    knowledge = Knowledge(logged={KEY: logged})
    behind = {"gw2": frozenset({D})} if known else {}
    async with cluster(repos, knowledge, gateways={"gw2": OTHER_GATEWAY}, behind=behind) as cl:
        for seed in range(4):  # whatever the random choice among holders
            cl.session.endpoint.transport.rng.seed(seed)  # type: ignore[attr-defined]
            if seed == 0:
                await login(cl, 4)
            await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
            assert await cl.client.line() == b"SUCCESS\n"
    other = "gw2" if asked == "n1" else "n1"
    assert cl.received(other) == []


@pytest.mark.parametrize("known", [True, False])
async def test_put_reaches_the_gateway_whose_nodes_lack_it(
    autojump_clock: trio.abc.Clock, known: bool
) -> None:
    # n1 has it; D behind gw2 does not (or gw2's nodes are not known): only
    # gw2 is a target, though the log shows the cluster's UUID (n1 has it).
    repos = {"n1": FakeRepo(uuid=A, contents={KEY: b"hello world"}), "gw2": FakeRepo(uuid=CLUSTER)}
    knowledge = Knowledge(logged={KEY: {A, CLUSTER}})
    behind = {"gw2": frozenset({D})} if known else {}
    async with cluster(repos, knowledge, gateways={"gw2": OTHER_GATEWAY}, behind=behind) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", set())
    assert repos["gw2"].contents == {KEY: b"hello world"}
    assert cl.received("n1") == []


async def test_lockcontent_is_refused(autojump_clock: trio.abc.Clock) -> None:
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    knowledge = Knowledge(logged={KEY: {A, B, C}})
    async with cluster(repos, knowledge) as cl:
        await login(cl, 4)
        await cl.client.send(f"LOCKCONTENT {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE\n"
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"SUCCESS\n"
    assert not any(repo.locked for repo in repos.values())
    assert not any(isinstance(msg, m.LockContent) for n in repos for msg in cl.received(n))


async def test_silent_node_is_dropped_before_the_session_gives_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def silent(conn: PeerConnection, message: m.Message) -> None:
        await conn.silent()

    repos = {name: FakeRepo(uuid=uuid) for name, uuid in NODE_UUIDS.items()}
    repos["n3"].hooks[m.Put] = silent
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B})
    assert repos["n3"].contents == {}


async def test_node_silent_at_open_is_skipped(autojump_clock: trio.abc.Clock) -> None:
    """Bug 2 with a node that accepts but never greets (a hung tor circuit)."""
    repos = {name: FakeRepo(uuid=uuid) for name, uuid in NODE_UUIDS.items()}
    repos["n2"].greeting = "silent"
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, C})
    assert repos["n1"].contents == repos["n3"].contents == {KEY: b"hello world"}


async def test_put_nodes_at_their_own_versions(autojump_clock: trio.abc.Clock) -> None:
    """A v4 client; nodes at v0, v1 and v4: VALID only to those at v1+."""
    repos = {
        "n1": FakeRepo(uuid=A, max_version=0),
        "n2": FakeRepo(uuid=B, max_version=1),
        "n3": FakeRepo(uuid=C),
    }
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B, C})
    assert cl.received("n1") == [m.Put(None, KEY), m.Data(11)]
    assert cl.received("n2") == [m.Put(None, KEY), m.Data(11), m.Valid()]
    assert cl.received("n3") == [m.Put(None, KEY), m.Data(11), m.Valid()]
    # No BYPASS below v2, and nothing the v0 node could not parse.
    assert [conn.bypass for n in ("n1", "n2", "n3") for conn in cl.conns(n)] == [(), (), (GATEWAY,)]


async def test_put_client_stops_short(autojump_clock: trio.abc.Clock) -> None:
    """The client hangs up inside the body: every node connection is closed, none stores."""
    async with cluster() as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        await cl.client.send(b"DATA 100000\n", blob(40_000))
        await cl.client.stream.send_eof()
        assert await cl.client.rest() == b""
    for name in NODE_UUIDS:
        assert cl.repos[name].contents == {}
        [conn] = cl.conns(name)
        assert conn.lost_in_body
    assert cl.recorder.records == []


async def test_data_present(autojump_clock: trio.abc.Clock) -> None:
    """v4 DATA-PRESENT goes to each node at v4; one at v3 cannot be told and is left out."""
    repos = {
        "n1": FakeRepo(uuid=A),
        "n2": FakeRepo(uuid=B),
        "n3": FakeRepo(uuid=C, max_version=3),
    }

    async def present_after_put_from(conn: PeerConnection, message: m.Message) -> None:
        # As if the client had uploaded it to this node by some other path meanwhile.
        await conn.send(m.PutFrom(0))
        event = await conn.receive()
        assert isinstance(event, m.DataPresent)
        conn.repo.contents[KEY] = b"x"
        await conn.send(m.Success())

    repos["n1"].hooks[m.Put] = present_after_put_from
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        await cl.client.send(b"DATA-PRESENT\n")
        # n2 (the fake checks its own contents) did not have it: only n1 counts.
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A})
    assert cl.received("n3") == [m.Put(None, KEY)]
    assert cl.recorder.records == [(KEY, A, True)]


async def test_get_node_error_is_relayed(autojump_clock: trio.abc.Clock) -> None:
    async def broken(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Error("content is locked"))

    repos = {"n1": FakeRepo(uuid=A, hooks={m.Get: broken})}
    async with cluster(repos, Knowledge(logged={KEY: {A}})) as cl:
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        assert await cl.client.line() == b"ERROR content is locked\n"
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE\n"  # the session goes on


async def test_get_node_dies_mid_body(autojump_clock: trio.abc.Clock) -> None:
    """The client sees the connection end inside the body, as from a single node."""
    content = blob(300_000)

    async def die(conn: PeerConnection, message: m.Message) -> None:
        await conn.framed.send(m.Data(len(content)))
        await conn.framed.send_body(content[:100_000])
        await conn.hang_up()
        raise StreamLost("hung up mid-body")

    repos = {"n1": FakeRepo(uuid=A, hooks={m.Get: die})}
    async with cluster(repos, Knowledge(logged={KEY: {A}})) as cl:
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        assert await cl.client.line() == b"DATA 300000\n"
        rest = await cl.client.rest()
        assert rest == content[: len(rest)] and len(rest) < len(content)


async def test_checkpresent_asks_one_logged_node(autojump_clock: trio.abc.Clock) -> None:
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    async with cluster(repos, Knowledge(logged={KEY: {B}})) as cl:
        await login(cl, 4)
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"SUCCESS\n"
        # The node says it is gone now: its answer is relayed.
        repos["n2"].contents.clear()
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE\n"
    assert cl.transports["n1"].opens == cl.transports["n3"].opens == []
    assert cl.knowledge.asked == [KEY, KEY]  # the log is read afresh per request


async def test_data_present_node_below_v4_is_not_left_mid_put(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A v3 node answered PUT-FROM and waits for DATA that will never come: it must
    not take the next request for that DATA."""
    repos = {"n1": FakeRepo(uuid=A), "n3": FakeRepo(uuid=C, max_version=3)}
    async with cluster(repos) as cl:  # nothing logged: both are PUT targets
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA-PRESENT\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        line = await cl.client.line()
        assert line.startswith(b"ERROR cl: no node stored it"), line
        cl.knowledge.logged = {KEY: {C}}
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await cl.client.line() == b"FAILURE\n"
    assert cl.received("n3") == [m.Put(None, KEY), m.CheckPresent(KEY)]
    assert len(cl.conns("n3")) == 2  # the first connection was closed, a new one asked


@pytest.mark.parametrize("version", [0, 1, 4])
async def test_put_empty_file(version: int, autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as cl:
        await login(cl, version)
        tail = b"VALID\n" if version else b""
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 0\n", tail)
        assert await cl.client.line() == b"PUT-FROM 0\n"
        expected = ("SUCCESS-PLUS", {A, B, C}) if version >= 2 else ("SUCCESS", set())
        assert plus(await cl.client.line()) == expected
    for name in NODE_UUIDS:
        assert cl.repos[name].contents == {KEY: b""}


async def test_put_node_with_the_whole_object_partial(autojump_clock: trio.abc.Clock) -> None:
    """A node whose partial upload is already complete gets DATA 0 and no bytes."""
    content = blob(1000)
    repos = {
        "n1": FakeRepo(uuid=A, partial={KEY: content}),
        "n2": FakeRepo(uuid=B, partial={KEY: content[:600]}),
    }
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 600\n"
        await cl.client.send(b"DATA 400\n", content[600:], b"VALID\n")
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B})
    assert cl.received("n1") == [m.Put(None, KEY), m.Data(0), m.Valid()]
    assert cl.conns("n1")[0].bodies == [b""]
    assert repos["n1"].contents == repos["n2"].contents == {KEY: content}


# --- the git-annex branch's logs (torbridge/annex/remotes.py) ----------------------------


def test_proxy_and_cluster_logs_newest_line_wins() -> None:
    proxy_log = (
        f"1700000000.5s {GATEWAY} {A}:n1 {B}:n2\n"
        f"1700000100s {OTHER_GATEWAY} {D}:d1\n"
        f"1700000200s {GATEWAY} {A}:n1\n"  # n2 no longer proxied
        "garbage\n"
    )
    assert parse_proxy_log(proxy_log) == {GATEWAY: frozenset({A}), OTHER_GATEWAY: frozenset({D})}
    cluster_log = f"5s {CLUSTER} {A} {B}\n4s {CLUSTER} {A}\n"
    assert parse_cluster_log(cluster_log) == {CLUSTER: frozenset({A, B})}


# --- pace, INVALID, and old clients' clocks ------------------------------------------------


async def test_put_slowest_node_sets_the_pace(autojump_clock: trio.abc.Clock) -> None:
    """One read of the client's stream goes to every node: nothing runs ahead
    of the slowest, so memory stays bounded however slow a node is."""
    piece = 64 * 1024  # the slow node takes one piece a (virtual) second
    body = blob(12 * piece)
    done_at: dict[str, float] = {}

    async def slow_put(conn: PeerConnection, message: m.Message) -> None:
        assert isinstance(message, m.Put)
        await conn.send(m.PutFrom(0))
        header = await conn.receive()
        assert isinstance(header, m.Data)
        got = bytearray()
        while len(got) < header.length:
            await trio.sleep(1)
            got += await conn.framed.receive_body(min(piece, header.length - len(got)))
        done_at["slow"] = trio.current_time()
        assert await conn.receive() == m.Valid()
        conn.repo.contents[message.key] = bytes(got)
        await conn.send(m.Success())

    repos = {"n1": FakeRepo(uuid=A), "n2": FakeRepo(uuid=B, hooks={m.Put: slow_put})}
    async with cluster(repos, lockstep=True) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        start = trio.current_time()
        await cl.client.send(f"DATA {len(body)}\n".encode(), body)
        # The client's last byte was read once the slow node had taken all
        # but the last relay chunk (256 KiB = 4 pieces): 8 s of 12.
        assert trio.current_time() - start >= 8 - 0.01
        await cl.client.send(b"VALID\n")
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, B})
    assert done_at["slow"] - start >= 12 - 0.01
    assert repos["n1"].contents == repos["n2"].contents == {KEY: body}


async def test_put_invalid_reaches_every_node(autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode(), b"DATA 11\nhello worldINVALID\n")
        assert await cl.client.line() == b"PUT-FROM 0\n"
        reply = await cl.client.line()
        assert reply.startswith(b"ERROR cl: no node stored it"), reply
        await cl.client.send(f"CHECKPRESENT {KEY}\n".encode())  # the session goes on
        assert await cl.client.line() == b"FAILURE\n"
    for name in NODE_UUIDS:
        assert m.Invalid() in cl.received(name), name
        assert cl.repos[name].contents == {}
    assert cl.recorder.records == []


@pytest.mark.parametrize("version", [0, 1, 2])
async def test_old_clients_get_timestamps_and_remove_before(
    autojump_clock: trio.abc.Clock, version: int
) -> None:
    """Below v3 a client has no GETTIMESTAMP in the protocol, but git-annex's
    server answers it at any version, and so does the cluster: each node at
    the client's version gets REMOVE instead of REMOVE-BEFORE."""
    repos = {name: FakeRepo(uuid=uuid, contents={KEY: b"x"}) for name, uuid in NODE_UUIDS.items()}
    async with cluster(repos, Knowledge(logged={KEY: {A, B, C}})) as cl:
        await login(cl, version)
        await cl.client.send(b"GETTIMESTAMP\n")
        stamp = await cl.client.line()
        assert stamp.startswith(b"TIMESTAMP "), stamp
        now = int(stamp.split()[1])
        await cl.client.send(f"REMOVE-BEFORE {now + 60} {KEY}\n".encode())
        reply = await cl.client.line()
        if version >= 2:
            assert plus(reply) == ("SUCCESS-PLUS", {A, B, C})
        else:
            assert reply == b"SUCCESS\n"
        # A deadline gone by: no node is told to remove (they have no clock
        # to check it by; the gateway's does).
        await cl.client.send(f"REMOVE-BEFORE {now - 1} {KEY2}\n".encode())
        reply = await cl.client.line()
        gone = b"FAILURE-PLUS\n" if version >= 2 else b"ERROR n1: the deadline has passed\n"
        assert reply == gone
    for name in NODE_UUIDS:
        assert cl.repos[name].contents == {}, name
        assert m.Remove(KEY) in cl.received(name), name
        told = cl.received(name)
        assert not any(isinstance(msg, (m.RemoveBefore, m.GetTimestamp)) for msg in told)
        assert m.Remove(KEY2) not in told


async def test_put_stalled_node_is_dropped_and_the_others_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A node that stops reading mid-body is dropped after the stall limit;
    the others finish, SUCCESS-PLUS names exactly them, and the node is
    marked down for the next sessions."""
    body = blob(2 * 1024 * 1024)

    async def stalling_put(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        assert isinstance(await conn.receive(), m.Data)
        await conn.framed.receive_body(100_000)
        # Reads nothing more for longer than any limit, then notices the hang-up.
        await trio.sleep(LIMITS.stall_timeout * 10)
        while await conn.framed.receive_body(1 << 16):  # raises once it is closed
            pass

    repos = {
        "n1": FakeRepo(uuid=A),
        "n2": FakeRepo(uuid=B, hooks={m.Put: stalling_put}),
        "n3": FakeRepo(uuid=C),
    }
    async with cluster(repos, lockstep=True) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT  {KEY}\n".encode())
        assert await cl.client.line() == b"PUT-FROM 0\n"
        start = trio.current_time()
        await cl.client.send(f"DATA {len(body)}\n".encode(), body, b"VALID\n")
        assert plus(await cl.client.line()) == ("SUCCESS-PLUS", {A, C})
        # Held up by the stalled node for the node stall limit, no longer.
        assert trio.current_time() - start <= LIMITS.stall_timeout
        transport = cl.session.endpoint.transport
        assert isinstance(transport, ClusterTransport)
        assert transport.health.is_down("n2")
        assert transport.status()["n2"]["up"] is False
    assert repos["n1"].contents == repos["n3"].contents == {KEY: body}
    assert KEY not in repos["n2"].contents
