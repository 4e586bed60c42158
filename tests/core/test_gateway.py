"""protocol/gateway.py with no I/O: byte transcripts and hypothesis properties.

A synchronous simulator carries out the gateway's actions against nodes
held in memory (each a small git-annex P2P server: GET, PUT, CHECKPRESENT,
REMOVE, GETTIMESTAMP at its own protocol version) and can lose any node at
any step. What the client sees is kept as the bytes it would read, and
each node's conversation as the lines it would read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol import cluster as c
from torbridge.protocol import gateway as g
from torbridge.protocol import gatewayactions as ga
from torbridge.protocol import messages as m
from torbridge.protocol.nodehealth import NodeHealth

PROPS = settings(
    max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

KEY = "SHA256E-s100--" + "ab" * 32 + ".bin"
GATEWAY = "9a7e0000-0000-4000-8000-00000000ea7e"
UUIDS = {
    "n1": "aaaaaaaa-0000-4000-8000-00000000000a",
    "n2": "bbbbbbbb-0000-4000-8000-00000000000b",
    "n3": "cccccccc-0000-4000-8000-00000000000c",
}
CONTENT = bytes(range(100))


@dataclass
class SimNode:
    """One node's git-annex P2P server, in memory."""

    name: str
    version: int = 4
    objects: dict[str, bytes] = field(default_factory=dict)
    partial: dict[str, bytes] = field(default_factory=dict)  # an upload broken off
    clock: int = 1000
    heard: list[bytes] = field(default_factory=list)  # the lines it read
    opens: int = 0
    # Exchange state.
    body: bytes = b""  # GET body still to send
    validity_owed: bool = False
    verdict_owed: bool = False
    receiving: tuple[str, int, int] | None = None  # key, offset, length
    received: bytes = b""
    result_owed: bool = False

    def reset(self) -> None:
        self.body, self.validity_owed, self.verdict_owed = b"", False, False
        self.receiving, self.received, self.result_owed = None, b"", False

    def hear(self, message: m.Message) -> m.Message | None:
        self.heard.append(m.serialise(message))
        if self.verdict_owed and not isinstance(message, (m.Success, m.Failure)):
            return m.Error(f"{message.COMMAND} taken as the verdict on a GET")
        match message:
            case m.Get(offset=offset, key=key):
                data = self.objects.get(key)
                if data is None:
                    return m.Error("content not present")
                self.body = data[offset:]
                self.validity_owed = self.version >= 1
                self.verdict_owed = True  # at every version (git-annex's sendContent)
                return m.Data(len(self.body))
            case m.Success() | m.Failure() if self.verdict_owed:
                self.verdict_owed = False
                return None
            case m.CheckPresent(key=key):
                return m.Success() if key in self.objects else m.Failure()
            case m.Put(key=key):
                if key in self.objects:
                    return m.AlreadyHave()
                return m.PutFrom(len(self.partial.get(key, b"")))
            case m.Data(length=length):
                key = KEY
                offset = len(self.partial.get(key, b""))
                self.receiving = (key, offset, length)
                self.received = b""
                self.result_owed = self.version < 1 or length == 0
                if length == 0 and self.version < 1:
                    self.result_owed = True
                return None
            case m.Valid() | m.Invalid():
                return self._result()
            case m.Remove(key=key):
                self.objects.pop(key, None)
                return m.Success()
            case m.RemoveBefore(timestamp=ts, key=key):
                if self.clock < ts:
                    self.objects.pop(key, None)
                    return m.Success()
                return m.Failure()
            case m.GetTimestamp():
                return m.Timestamp(self.clock)
        return m.Error(f"unexpected {message.COMMAND}")

    def _result(self) -> m.Message:
        assert self.receiving is not None
        key, offset, length = self.receiving
        self.receiving = None
        if len(self.received) != length:
            return m.Failure()
        whole = self.partial.pop(key, b"")[:offset] + self.received
        self.objects[key] = whole
        return m.Success()

    def take(self, data: bytes) -> None:
        assert self.receiving is not None
        self.received += data

    def send_body(self, max_bytes: int) -> bytes:
        piece, self.body = self.body[:max_bytes], self.body[max_bytes:]
        return piece

    def after_body(self) -> m.Message:
        """Its line after the GET body (VALID), or after a v0 PUT body (the result)."""
        if self.validity_owed and not self.body:
            self.validity_owed = False
            return m.Valid()
        return self._result()


@dataclass
class Sim:
    """Carries out a gateway's actions against ``SimNode`` s."""

    nodes: dict[str, SimNode]
    logged: set[str] = field(default_factory=set)  # UUIDs the location log has for KEY
    version: int = 4
    # Loss injection: a node is lost at the ``n``-th action the simulator
    # carries out for it (0 = at open), or never.
    lose_at: dict[str, int] = field(default_factory=dict)
    health: NodeHealth | None = None
    costs: dict[str, float] = field(default_factory=dict)
    client: bytearray = field(default_factory=bytearray)  # what the client read
    body_queue: list[bytes] = field(default_factory=list)
    cut: str | None = None
    records: list[tuple[str, bool]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    now: float = 0.0

    def __post_init__(self) -> None:
        refs = [g.Node(c.NodeRef(UUIDS[n], n, self.costs.get(n, 200.0))) for n in self.nodes]
        self.health = self.health or NodeHealth(list(self.nodes))
        self.gw = g.Gateway(
            "cl",
            self.version,
            refs,
            GATEWAY,
            health=self.health,
            rng=random.Random(0),
            members=frozenset(UUIDS.values()),
        )

    def _losing(self, name: str) -> bool:
        if name in self.lost:
            return True
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        if self.lose_at.get(name) == n:
            self.lost.add(name)
            return True
        return False

    def run(self, actions: list[ga.Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            self.gw.at(self.now)
            queue.extend(self.carry_out(action))

    def carry_out(self, action: ga.Action) -> list[ga.Action]:
        gw = self.gw
        match action:
            case ga.ToClient(message=message):
                self.client += m.serialise(message)
                return []
            case ga.ToClientBody(data=data):
                self.client += data
                self.body_queue.append(data)
                return []
            case ga.CutClient(why=why):
                self.cut = why
                return []
            case ga.Record(uuid=uuid, present=present):
                self.records.append((uuid, present))
                return []
            case ga.Log() | ga.ProbeNode():
                return []
            case ga.CloseNode(node=name):
                self.nodes[name].reset()
                return []
            case ga.QueryLocations():
                return gw.locations(frozenset(self.logged))
            case ga.QueryWanted(nodes=names):
                return gw.wanted(dict.fromkeys(names, True))
            case ga.ReadClock():
                return gw.clock(500)
            case ga.OpenNode(node=name, version=version):
                if self._losing(name):
                    return gw.node_lost(name, "refused", "unreachable")
                node = self.nodes[name]
                node.opens += 1
                node.reset()
                return gw.node_opened(name, min(version, node.version))
            case ga.ToNode(node=name, message=message, reply=reply):
                if self._losing(name):
                    return gw.node_lost(name, "gone")
                node = self.nodes[name]
                answer = node.hear(message) if message is not None else node.after_body()
                if not reply:
                    return gw.node_sent(name)
                if answer is None:
                    answer = node.after_body()
                return gw.node_reply(name, answer)
            case ga.ToNodeBody(node=name, data=data):
                if self._losing(name):
                    return gw.node_lost(name, "gone")
                self.nodes[name].take(data)
                return gw.node_sent(name)
            case ga.ReadNodeBody(node=name, max_bytes=max_bytes):
                if self._losing(name):
                    return gw.node_lost(name, "gone")
                return gw.node_body(name, self.nodes[name].send_body(max_bytes))
        raise AssertionError(f"unexpected {action!r}")

    # --- the client's side, as the relay drives it ---------------------------------

    def request(self, message: m.Message) -> m.Message:
        self.run(self.gw.client_message(message))
        assert self.gw.answer_ready, self.gw.phase
        return self.gw.take_answer()

    def send(self, message: m.Message) -> None:
        self.run(self.gw.client_message(message))

    def get(self, offset: int = 0, chunk: int = 7) -> tuple[m.Message, bytes, m.Message | None]:
        """A whole GET as the relay drives it; the validity is None when cut."""
        answer = self.request(m.Get(offset, "f", KEY))
        if not isinstance(answer, m.Data):
            return answer, b"", None
        got = b""
        while len(got) < answer.length:
            self.run(self.gw.client_wants_body(chunk))
            if not self.body_queue:
                assert self.cut is not None
                return answer, got, None
            got += self.body_queue.pop(0)
        validity = None
        if self.version >= 1:
            if not self.gw.answer_ready:
                self.run([])
            assert self.gw.answer_ready, self.gw.phase
            validity = self.gw.take_answer()
        self.send(m.Success())
        return answer, got, validity

    def put(self, content: bytes, cuts: list[int]) -> list[m.Message]:
        answers = [self.request(m.Put("f", KEY))]
        offer = answers[0]
        if not isinstance(offer, m.PutFrom):
            return answers
        rest = content[offer.offset :]
        self.send(m.Data(len(rest)))
        at = 0
        for cut in [*sorted({min(max(0, x), len(rest)) for x in cuts}), len(rest)]:
            if cut > at:
                self.run(self.gw.client_body(rest[at:cut]))
                at = cut
        if self.version >= 1:
            self.run(self.gw.client_message(m.Valid()))
        assert self.gw.answer_ready, self.gw.phase
        answers.append(self.gw.take_answer())
        return answers


def nodes(*holding: str, versions: dict[str, int] | None = None) -> dict[str, SimNode]:
    versions = versions or {}
    return {
        n: SimNode(n, versions.get(n, 4), {KEY: CONTENT} if n in holding else {}) for n in UUIDS
    }


# --- byte transcripts ---------------------------------------------------------------------


def test_get_transcript_failover_mid_body() -> None:
    # n1 is cheapest and dies after 2 body reads (open, GET, 2 reads: its 4th action).
    sim = Sim(nodes("n1", "n2"), {UUIDS["n1"], UUIDS["n2"]}, costs={"n1": 100.0}, lose_at={"n1": 4})
    data, got, validity = sim.get(chunk=30)
    assert bytes(sim.client) == b"DATA 100\n" + CONTENT + b"VALID\n"
    assert (data, got, validity) == (m.Data(100), CONTENT, m.Valid())
    assert sim.nodes["n1"].heard == [b"GET 0 f " + KEY.encode() + b"\n"]
    # n2 is asked for the rest, from the offset already sent, and gets the verdict.
    assert sim.nodes["n2"].heard == [b"GET 60 f " + KEY.encode() + b"\n", b"SUCCESS\n"]
    assert sim.health is not None and sim.health.is_down("n1")


def test_get_transcript_failover_before_data() -> None:
    sim = Sim(nodes("n1", "n2"), {UUIDS["n1"], UUIDS["n2"]}, costs={"n1": 100.0}, lose_at={"n1": 1})
    assert sim.get()[1] == CONTENT
    assert bytes(sim.client) == b"DATA 100\n" + CONTENT + b"VALID\n"
    assert sim.nodes["n2"].heard[0] == b"GET 0 f " + KEY.encode() + b"\n"


def test_get_no_node_can_finish_cuts_the_client() -> None:
    sim = Sim(
        nodes("n1", "n2"),
        {UUIDS["n1"], UUIDS["n2"]},
        costs={"n1": 100.0},
        lose_at={"n1": 3, "n2": 3},
    )
    _, _, validity = sim.get(chunk=25)
    # One DATA, the bytes of the object so far, then the connection is cut:
    # no padding, no VALID or INVALID (docs/clusters.md says why).
    assert validity is None and sim.cut is not None
    assert bytes(sim.client) == b"DATA 100\n" + CONTENT[:50]
    assert sim.nodes["n2"].heard == [b"GET 25 f " + KEY.encode() + b"\n"]


def test_get_failover_node_with_another_size_is_not_used() -> None:
    sim = Sim(
        nodes("n1", "n2", "n3"),
        {UUIDS[n] for n in UUIDS},
        costs={"n1": 100.0, "n2": 150.0},
        lose_at={"n1": 3},
    )
    sim.nodes["n2"].objects[KEY] = CONTENT + b"more"
    _data, got, _ = sim.get(chunk=40)
    assert got == CONTENT
    assert sim.nodes["n3"].heard[0] == b"GET 40 f " + KEY.encode() + b"\n"


def test_put_transcript_one_node_dead_at_open() -> None:
    sim = Sim(nodes(), lose_at={"n2": 0})
    offer, outcome = sim.put(CONTENT, [10, 50])
    assert offer == m.PutFrom(0)
    assert outcome == m.SuccessPlus((UUIDS["n1"], UUIDS["n3"]))
    assert sim.nodes["n1"].objects[KEY] == CONTENT == sim.nodes["n3"].objects[KEY]
    assert bytes(sim.client) == b"PUT-FROM 0\nSUCCESS-PLUS %s %s\n" % (
        UUIDS["n1"].encode(),
        UUIDS["n3"].encode(),
    )
    # The next session skips the node marked down at once: not even opened.
    again = Sim(nodes(), health=sim.health)
    again.put(CONTENT, [])
    assert again.nodes["n2"].opens == 0 and again.nodes["n2"].heard == []


def test_down_node_is_probed_once_its_backoff_passed() -> None:
    health = NodeHealth(list(UUIDS), first=5.0)
    health.failed("n2", "refused", now=0.0)

    def put_offers(now: float) -> list[ga.Action]:
        gw = Sim(nodes(), health=health).gw.at(now)
        assert gw.client_message(m.Put("f", KEY)) == [ga.QueryLocations(KEY)]
        return gw.locations(frozenset()) + gw.wanted(dict.fromkeys(UUIDS, True))

    early = put_offers(1.0)  # within its backoff: skipped, not probed
    assert not any(isinstance(a, ga.ProbeNode) for a in early)
    assert {a.node for a in early if isinstance(a, ga.OpenNode)} == {"n1", "n3"}
    due = put_offers(6.0)  # past it: probed in the background, still skipped
    assert [a for a in due if isinstance(a, ga.ProbeNode)] == [ga.ProbeNode("n2", 4)]
    assert {a.node for a in due if isinstance(a, ga.OpenNode)} == {"n1", "n3"}
    assert not any(isinstance(a, ga.ProbeNode) for a in put_offers(6.0))  # one probe at once
    health.failed("n2", "still refused", now=6.0)  # the probe failed: backoff doubles
    assert health.nodes["n2"].next_probe == 16.0
    assert not any(isinstance(a, ga.ProbeNode) for a in put_offers(15.0))
    health.succeeded("n2")  # a probe answered: used again
    assert "n2" in {a.node for a in put_offers(16.0) if isinstance(a, ga.OpenNode)}


def test_every_target_down_is_asked_all_the_same() -> None:
    health = NodeHealth(list(UUIDS))
    for n in UUIDS:
        health.failed(n, "refused", now=0.0)
    sim = Sim(nodes(), health=health)
    offer, outcome = sim.put(CONTENT, [])
    assert offer == m.PutFrom(0) and isinstance(outcome, m.SuccessPlus)
    assert len(outcome.uuids) == 3
    assert not any(health.is_down(n) for n in UUIDS)


def test_checkpresent_asks_the_next_holder() -> None:
    sim = Sim(nodes("n1", "n2"), {UUIDS["n1"], UUIDS["n2"]}, costs={"n1": 100.0}, lose_at={"n1": 0})
    assert sim.request(m.CheckPresent(KEY)) == m.Success()
    assert sim.nodes["n2"].heard == [b"CHECKPRESENT " + KEY.encode() + b"\n"]


def test_remove_before_at_each_nodes_clock_and_old_nodes() -> None:
    sim = Sim(nodes("n1", "n2", "n3", versions={"n3": 2}))
    assert sim.request(m.GetTimestamp()) == m.Timestamp(500)
    answer = sim.request(m.RemoveBefore(520, KEY))
    assert answer == m.SuccessPlus(tuple(UUIDS.values()))
    # n1, n2 read it on their own clocks (1000 + 20); n3 (v2) has no clock:
    # ours keeps the deadline and it gets REMOVE.
    assert sim.nodes["n1"].heard[-1] == b"REMOVE-BEFORE 1020 " + KEY.encode() + b"\n"
    assert sim.nodes["n3"].heard == [b"REMOVE " + KEY.encode() + b"\n"]


def test_deadline_kept_here_is_the_one_rule() -> None:
    request = m.RemoveBefore(100, KEY)
    assert c.deadline_kept_here(request, 99) == m.Remove(KEY)
    assert c.deadline_kept_here(request, 100) is None


def test_bypass_keeps_a_node_out() -> None:
    sim = Sim(nodes())
    sim.send(m.Bypass((UUIDS["n2"],)))
    _, outcome = sim.put(CONTENT, [])
    assert outcome == m.SuccessPlus((UUIDS["n1"], UUIDS["n3"]))
    assert sim.nodes["n2"].opens == 0


# --- properties -----------------------------------------------------------------------------


@PROPS
@given(
    cuts=st.lists(st.integers(0, 100), max_size=8),
    partial=st.dictionaries(st.sampled_from(list(UUIDS)), st.integers(0, 100)),
    lose=st.dictionaries(st.sampled_from(list(UUIDS)), st.integers(0, 12)),
    version=st.sampled_from([0, 1, 2, 4]),
    node_versions=st.dictionaries(st.sampled_from(list(UUIDS)), st.sampled_from([0, 1, 4])),
)
def test_put_any_chunking_any_loss(
    cuts: list[int],
    partial: dict[str, int],
    lose: dict[str, int],
    version: int,
    node_versions: dict[str, int],
) -> None:
    """Every chunking of the body, any node lost at any point: the client hears
    exactly the nodes that stored the whole object, and each holds it intact."""
    sim = Sim(nodes(versions=node_versions), version=version, lose_at=lose)
    for name, size in partial.items():
        sim.nodes[name].partial[KEY] = CONTENT[:size]
    answers = sim.put(CONTENT, cuts)
    stored = {n for n, node in sim.nodes.items() if KEY in node.objects}
    for n in stored:
        assert sim.nodes[n].objects[KEY] == CONTENT
    final = answers[-1]
    if not stored:
        assert isinstance(final, m.Error)
        return
    if version >= 2:
        assert isinstance(final, m.SuccessPlus)
        assert set(final.uuids) == {UUIDS[n] for n in stored}
    else:
        assert final == m.Success()
    assert {u for u, present in sim.records if present} == {UUIDS[n] for n in stored}
    # A node never lost stored it.
    assert set(UUIDS) - set(lose) <= stored | {n for n in UUIDS if n in sim.lost}


@PROPS
@given(
    holders=st.sets(st.sampled_from(list(UUIDS)), min_size=1),
    lose=st.dictionaries(st.sampled_from(list(UUIDS)), st.integers(0, 20)),
    chunk=st.integers(1, 120),
    offset=st.integers(0, 100),
    version=st.sampled_from([0, 1, 4]),
)
def test_get_any_loss(
    holders: set[str], lose: dict[str, int], chunk: int, offset: int, version: int
) -> None:
    """A node lost at any point of a GET: the client gets the object's bytes
    from its offset, one DATA of the announced length, or (no holder left) a
    prefix of them and a cut connection; never a wrong byte."""
    sim = Sim(nodes(*holders), {UUIDS[n] for n in holders}, version=version, lose_at=lose)
    answer, got, validity = sim.get(offset=offset, chunk=chunk)
    survivors = holders - sim.lost
    if isinstance(answer, m.Error):
        assert holders <= sim.lost  # every holder failed before DATA
        assert got == b""
        return
    assert answer == m.Data(len(CONTENT) - offset)
    assert CONTENT[offset:].startswith(got)
    if got == CONTENT[offset:] and sim.cut is None:
        assert bytes(sim.client).startswith(b"DATA %d\n" % answer.length + got)
        if version >= 1:
            assert validity in (m.Valid(), m.Invalid())
    else:
        assert sim.cut is not None
        assert bytes(sim.client) == b"DATA %d\n" % answer.length + got
    if holders - set(lose):
        assert got == CONTENT[offset:]  # a holder never lost: it finishes
    if sim.cut is None and survivors:
        # Every node is in step for the next request (the verdict reached the
        # node that served, at every version).
        answer = sim.request(m.CheckPresent(KEY))
        assert answer == m.Success() or (holders <= sim.lost and isinstance(answer, m.Error))


@PROPS
@given(
    lose=st.dictionaries(st.sampled_from(list(UUIDS)), st.integers(0, 3)),
    request=st.sampled_from(["checkpresent", "remove", "timestamp"]),
)
def test_small_requests_any_loss(lose: dict[str, int], request: str) -> None:
    sim = Sim(nodes("n1", "n2", "n3"), set(UUIDS.values()), lose_at=lose)
    if request == "checkpresent":
        answer = sim.request(m.CheckPresent(KEY))
        if set(lose) >= set(UUIDS) and all(sim.nodes[n].heard == [] for n in UUIDS):
            assert isinstance(answer, m.Error)
        else:
            assert answer in (m.Success(),) or isinstance(answer, m.Error)
    elif request == "remove":
        answer = sim.request(m.Remove(KEY))
        removed = {UUIDS[n] for n, node in sim.nodes.items() if KEY not in node.objects}
        if removed == set(UUIDS.values()):
            assert answer == m.SuccessPlus(tuple(UUIDS.values()))
        else:
            assert answer == m.FailurePlus(tuple(u for u in UUIDS.values() if u in removed))
    else:
        assert sim.request(m.GetTimestamp()) == m.Timestamp(500)
    # The session goes on: the next request is answered.
    assert sim.request(m.LockContent(KEY)) == m.Failure()


@pytest.mark.parametrize("version", [0, 1, 4])
def test_every_node_lost(version: int) -> None:
    sim = Sim(
        nodes("n1", "n2", "n3"),
        set(UUIDS.values()),
        version=version,
        lose_at=dict.fromkeys(UUIDS, 0),
    )
    answer, _, _ = sim.get()
    assert isinstance(answer, m.Error)
    assert b"no node that has it answered" in bytes(sim.client)
    sim2 = Sim(nodes(), version=version, lose_at=dict.fromkeys(UUIDS, 0))
    assert isinstance(sim2.put(CONTENT, [])[0], m.Error)
    assert sim2.request(m.LockContent(KEY)) == m.Failure()


def test_remove_asks_a_node_marked_down() -> None:
    """A node back from the dead before its probe: a drop still reaches it."""
    health = NodeHealth(list(UUIDS))
    health.failed("n2", "refused", now=0.0)
    sim = Sim(nodes("n1", "n2", "n3"), set(UUIDS.values()), health=health)
    assert sim.request(m.GetTimestamp()) == m.Timestamp(500)
    assert sim.request(m.RemoveBefore(560, KEY)) == m.SuccessPlus(tuple(UUIDS.values()))
    assert KEY not in sim.nodes["n2"].objects and not health.is_down("n2")
