"""Admission: tokens per endpoint, and the caps that bound memory."""

from __future__ import annotations

from pathlib import Path

from torbridge.config import Limits
from torbridge.protocol.relay import Mode
from torbridge.server.admission import Admission
from torbridge.tokens import TokenStore


def test_caps_on_sessions_in_all_and_per_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice, bob = store.add("alice", "rw"), store.add("bob", "ro")
    admission = Admission(store, Limits(max_sessions=3, max_sessions_per_token=2))
    first = admission.authorize("hub", alice)
    assert first is not None and first.mode is Mode.READ_WRITE
    assert admission.authorize("hub", alice) is not None
    assert admission.authorize("hub", alice) is None  # alice's two are in use
    bobs = admission.authorize("hub", bob)
    assert bobs is not None and bobs.mode is Mode.READ_ONLY
    assert admission.authorize("hub", bob) is None  # three in all
    admission.release(first)
    assert admission.authorize("hub", bob) is not None


def test_a_token_limited_to_an_endpoint(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    token = store.add("carol", "rw", ["node1"])
    admission = Admission(store, Limits())
    assert admission.authorize("hub", token) is None
    assert admission.authorize("node1", token) is not None


class Conn:
    """Stands in for session.PendingAuth: records its eviction."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted = 0

    def evict(self) -> None:
        self.evicted += 1


def test_unauthenticated_cap_evicts_the_oldest(tmp_path: Path) -> None:
    admission = Admission(TokenStore(tmp_path / "state"), Limits(max_unauthenticated=2))
    a, b, c, d = (Conn(n) for n in "abcd")
    assert not admission.enter_pre_auth(a)
    assert not admission.enter_pre_auth(b)
    assert admission.unauthenticated == 2
    # Full: the newest gets in, the oldest is evicted.
    assert admission.enter_pre_auth(c)
    assert (a.evicted, b.evicted, c.evicted) == (1, 0, 0)
    assert admission.unauthenticated == 2
    # The evicted one's own leaving later changes nothing.
    admission.leave_pre_auth(a)
    assert admission.unauthenticated == 2
    # b authenticates: its slot is free, so d evicts no one.
    admission.leave_pre_auth(b)
    assert not admission.enter_pre_auth(d)
    assert (b.evicted, c.evicted, d.evicted) == (0, 0, 0)
    # Order is by arrival: c is now the oldest.
    assert admission.enter_pre_auth(Conn("e"))
    assert (c.evicted, d.evicted) == (1, 0)


def test_a_flood_never_evicts_twice_nor_grows(tmp_path: Path) -> None:
    admission = Admission(TokenStore(tmp_path / "state"), Limits(max_unauthenticated=32))
    conns = [Conn(str(i)) for i in range(1000)]
    evictions = sum(admission.enter_pre_auth(conn) for conn in conns)
    assert evictions == 1000 - 32
    assert admission.unauthenticated == 32
    assert all(c.evicted == 1 for c in conns[:-32])
    assert not any(c.evicted for c in conns[-32:])
    for conn in conns:
        admission.leave_pre_auth(conn)
    assert admission.unauthenticated == 0
