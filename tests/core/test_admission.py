"""Admission: tokens per endpoint, and the caps that bound memory."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from torbridge.config import Limits, Tor
from torbridge.protocol.permissions import Grant, Mode
from torbridge.server.admission import Admission, Busy
from torbridge.tokens import TokenStore


def test_caps_on_sessions_in_all_and_per_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice, bob = store.add("alice", "rw"), store.add("bob", "ro")
    admission = Admission(store, Limits(max_sessions=3, max_sessions_per_token=2))
    first = admission.authorize("hub", alice)
    assert isinstance(first, Grant) and first.mode is Mode.READ_WRITE
    assert isinstance(admission.authorize("hub", alice), Grant)
    # alice's two are in use: busy, which is not a wrong token.
    busy = admission.authorize("hub", alice)
    assert isinstance(busy, Busy) and "2 sessions open" in busy.text
    bobs = admission.authorize("hub", bob)
    assert isinstance(bobs, Grant) and bobs.mode is Mode.READ_ONLY
    assert isinstance(admission.authorize("hub", bob), Busy)  # three in all
    assert admission.authorize("hub", "not a token") is None  # a wrong token stays wrong
    admission.release(first)
    assert isinstance(admission.authorize("hub", bob), Grant)


def test_defaults_fit_one_client_running_64_jobs(tmp_path: Path) -> None:
    """git-annex's own P2P server serves 100 connections at once."""
    store = TokenStore(tmp_path / "state")
    token = store.add("alice", "rw")
    admission = Admission(store, Limits())
    grants = [admission.authorize("hub", token) for _ in range(64)]
    assert all(isinstance(g, Grant) for g in grants)
    limits, tor = Limits(), Tor()
    assert limits.max_per_circuit >= 2 * limits.max_sessions_per_token
    assert tor.max_streams == 0 or tor.max_streams >= limits.max_per_circuit
    assert limits.idle_timeout == 0  # pooled connections are never cut


def test_over_a_cap_a_valid_token_waits_for_a_slot(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice = store.add("alice", "rw")
    admission = Admission(store, Limits(max_sessions_per_token=1, session_wait=30))
    got: list[object] = []

    async def main() -> None:
        first = admission.authorize("hub", alice)
        assert isinstance(first, Grant)
        async with trio.open_nursery() as nursery:

            async def second() -> None:
                got.append(await admission.admit("hub", alice))

            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and admission.waiting["alice"] == 1
            admission.release(first)  # the slot goes to the waiting one
        assert admission.waiting.total() == 0

    trio.run(main)
    assert len(got) == 1 and isinstance(got[0], Grant)
    assert admission.sessions["alice"] == 1


def test_no_slot_in_time_is_busy_not_a_wrong_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice = store.add("alice", "rw")
    admission = Admission(store, Limits(max_sessions_per_token=1, session_wait=5))

    async def main() -> object:
        assert isinstance(admission.authorize("hub", alice), Grant)
        return await admission.admit("hub", alice)

    clock = trio.testing.MockClock(autojump_threshold=0)
    answer = trio.run(main, clock=clock)
    assert isinstance(answer, Busy)
    assert admission.waiting.total() == 0
    # ... and a wrong token is refused at once, never queued.
    assert trio.run(admission.admit, "hub", "wrong", clock=clock) is None


def test_the_queue_is_bounded(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice = store.add("alice", "rw")
    admission = Admission(store, Limits(max_sessions_per_token=1, session_wait=1000))
    answers: list[object] = []

    async def main() -> None:
        assert isinstance(admission.authorize("hub", alice), Grant)
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                answers.append(await admission.admit("hub", alice))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            # One waits (the token's cap): the next is told at once.
            assert isinstance(await admission.admit("hub", alice), Busy)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert answers == [] and admission.waiting.total() == 0


def test_a_token_limited_to_an_endpoint(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    token = store.add("carol", "rw", ["node1"])
    admission = Admission(store, Limits())
    assert admission.authorize("hub", token) is None
    assert isinstance(admission.authorize("node1", token), Grant)


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
