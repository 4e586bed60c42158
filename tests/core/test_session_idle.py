"""The trio Session stops a quiet client's peer and reopens it (relay.peer_idle).

In-memory client, scripted peer (tests/harness/fakes.py), trio's autojump
clock: the idle periods cost no real time and nothing depends on load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from tests.core.test_session import KEY, LIMITS, bridge
from tests.harness.fakes import FakeRepo, FakeTransport
from torbridge.protocol import messages as m
from torbridge.transport.process import AnnexShellTransport

PEER_IDLE = 5.0
QUICK = dataclasses.replace(LIMITS, peer_idle=PEER_IDLE)


async def test_quiet_session_stops_its_peer_and_goes_on(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"}), limits=QUICK) as b:
        await b.client.login(4)
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await trio.sleep(PEER_IDLE + 1)
        [first] = b.connections
        assert first.eof, "the quiet session's peer was not stopped"
        assert b.transport.channels[0].closed
        assert b.session.endpoint.registry.counters["peers_stopped_idle_total"] == 1
        # The client never knows: the next request gets a new peer, at v4.
        await b.client.send(f"GET 0 f {KEY}\n".encode())
        await b.client.expect(b"DATA 1\n", b"x", b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        second = b.connections[1]
        assert second.received == [
            m.Version(4),
            m.Get(0, "f", KEY),
            m.Success(),
            m.CheckPresent(KEY),
        ]
        assert [o[0] for o in b.transport.opens] == [4, 4]
    assert b.session.outcome == "client closed"


async def test_busy_client_keeps_one_peer(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"}), limits=QUICK) as b:
        await b.client.login(4)
        for _ in range(10):  # a request every 0.8 x peer_idle: never quiet long enough
            await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
            await b.client.expect(b"SUCCESS\n")
            await trio.sleep(PEER_IDLE * 0.8)
        assert len(b.connections) == 1 and not b.connections[0].eof
    assert b.session.endpoint.registry.counters["peers_stopped_idle_total"] == 0


async def test_lock_outlives_the_idle_period(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: b"x"})
    async with bridge(repo, limits=QUICK) as b:
        await b.client.login(4)
        await b.client.send(f"LOCKCONTENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await trio.sleep(PEER_IDLE * 20)  # a drop that takes its time elsewhere
        [conn] = b.connections
        assert repo.locked and conn.lock_held and not conn.eof
        await b.client.send(b"UNLOCKCONTENT\n")
        await trio.sleep(PEER_IDLE + 1)
        assert not repo.locked and conn.eof  # released, then stopped as idle
        assert conn.received == [m.Version(4), m.LockContent(KEY), m.UnlockContent()]


async def test_version_answered_without_a_peer(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for git-annex-shell on the proxy's own repository, once its
    # maximum is known (transport/process.py learns it).
    monkeypatch.setattr(FakeTransport, "known_max_version", 4, raising=False)
    async with bridge(FakeRepo(contents={KEY: b"x"}), limits=QUICK) as b:
        await b.client.login(9, agreed=4)
        await trio.sleep(PEER_IDLE * 10)
        assert b.transport.opens == [] and b.connections == []
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        assert [o[0] for o in b.transport.opens] == [4]
        assert b.connections[0].received == [m.Version(4), m.CheckPresent(KEY)]


@pytest.mark.parametrize(
    ("asked", "agreed", "learnt"),
    [(4, 4, 4), (4, 3, 3), (2, 2, None), (2, 1, 1), (0, 0, None)],
)
def test_git_annex_shell_maximum_is_learnt_once_seen(
    asked: int, agreed: int, learnt: int | None
) -> None:
    own = AnnexShellTransport("hub", Path("/nonexistent"), "u")
    assert own.known_max_version is None
    own._learn_max_version(asked, agreed)
    assert own.known_max_version == learnt
