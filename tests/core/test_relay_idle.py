"""Transcript tests: an idle session holds no peer (torbridge/protocol/relay.py).

The relay answers VERSION itself where the peer's answer is known (a
git-annex-shell serving the proxy's own repository), stops the peer when
the I/O layer reports the client quiet (``peer_idle``) unless a lock or an
exchange is in progress, and reopens it at the session's version for the
next request. Helpers are those of test_relay.py.
"""

from __future__ import annotations

import pytest

from tests.core.test_relay import (
    CLIENT_UUID,
    KEY,
    NODE_A,
    NODE_B,
    PEER,
    SERVER_UUID,
    TOKEN,
    C,
    P,
    client,
    error,
    idle,
    peer,
    request,
    session,
    to_client,
    to_peer,
)
from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream
from torbridge.protocol.permissions import Mode
from torbridge.protocol.relay import (
    Phase,
    Relay,
)
from torbridge.protocol.relayactions import (
    CheckAuth,
    ClosePeer,
    CopyBody,
    OpenPeer,
    Removed,
    Send,
    Stored,
    WatchRefs,
)

IDLE = ClosePeer("idle")
NODE_C = "99999999-aaaa-4bbb-8ccc-dddddddddddd"


def known(peer_max: int, notifies: bool = False) -> Relay:
    """Past AUTH, with a peer whose highest version is known without opening it."""
    relay = Relay(SERVER_UUID, PEER, notifies, peer_max_version=peer_max)
    assert relay.receive(C, m.Auth(CLIENT_UUID, TOKEN)) == [CheckAuth(CLIENT_UUID, TOKEN)]
    assert relay.auth_accepted(Mode.READ_WRITE) == [to_client(m.AuthSuccess(SERVER_UUID))]
    return relay


# --- VERSION without a peer ---------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "peer_max", "agreed"),
    [(4, 4, 4), (9, 4, 4), (2, 4, 2), (0, 4, 0), (4, 3, 3), (4, 2, 2), (1, 0, 0)],
)
def test_version_answered_without_opening_the_peer(asked: int, peer_max: int, agreed: int) -> None:
    relay = known(peer_max)
    assert client(relay, m.Version(asked)) == [to_client(m.Version(agreed))]
    assert relay.version == agreed and not relay.peer_open and idle(relay)
    # The first request opens the peer at the agreed version.
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(agreed, ())]
    assert relay.peer_opened(agreed) == [to_peer(m.CheckPresent(KEY))]
    assert peer(relay, m.Success()) == [to_client(m.Success())]


def test_version_answered_then_only_once() -> None:
    relay = known(4)
    assert client(relay, m.Version(4)) == [to_client(m.Version(4))]
    assert client(relay, m.Version(4)) == [error("unexpected command")]


def test_peer_that_agrees_to_another_version_fails_the_request() -> None:
    # The answer was wrong (the peer's git-annex changed under us): the
    # request fails, as a reopen at another version does; nothing is guessed.
    relay = known(4)
    assert client(relay, m.Version(4)) == [to_client(m.Version(4))]
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(4, ())]
    assert relay.peer_opened(3) == [
        ClosePeer("version changed"),
        error(f"{PEER}: protocol version changed"),
    ]
    assert idle(relay) and not relay.peer_open


def test_watcher_never_opens_the_peer() -> None:
    # A remotedaemon: AUTH, VERSION, NOTIFYCHANGE, CHANGED, NOTIFYCHANGE...
    relay = known(4, notifies=True)
    assert client(relay, m.Version(4)) == [to_client(m.Version(4))]
    for _ in range(3):
        assert client(relay, m.NotifyChange()) == [WatchRefs()]
        assert relay.peer_idle() == []  # nothing to stop
        assert relay.refs_changed(("a" * 40,)) == [to_client(m.Changed("a" * 40))]
    assert not relay.peer_open


def test_unknown_peer_version_still_opens_on_version() -> None:
    relay = Relay(SERVER_UUID, PEER)
    assert relay.receive(C, m.Auth(CLIENT_UUID, TOKEN)) == [CheckAuth(CLIENT_UUID, TOKEN)]
    relay.auth_accepted(Mode.READ_WRITE)
    assert client(relay, m.Version(4)) == [OpenPeer(4, ())]


# --- stopping the peer while the client is quiet --------------------------------------


def test_idle_peer_is_stopped_and_reopened_at_the_session_version() -> None:
    relay = session(2)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    assert relay.peer_stoppable
    assert relay.peer_idle() == [IDLE]
    assert not relay.peer_open and idle(relay) and not relay.peer_stoppable
    assert relay.peer_idle() == []  # once
    # The next request: a new peer at the version the client agreed to.
    assert client(relay, m.Get(0, None, KEY)) == [OpenPeer(2, ())]
    assert relay.next_reader is None
    assert relay.peer_opened(2) == [to_peer(m.Get(0, None, KEY))]
    assert peer(relay, m.Data(3)) == [to_client(m.Data(3)), CopyBody(P, 3)]


def test_get_after_idle_stop_transcript() -> None:
    """copy (PUT), idle, get (GET) on one client connection, two peers."""
    relay = session(4)
    request(relay, m.Put(None, KEY))
    assert peer(relay, m.PutFrom(0)) == [to_client(m.PutFrom(0))]
    assert client(relay, m.Data(11)) == [to_peer(m.Data(11)), CopyBody(C, 11)]
    assert relay.peer_idle() == []  # a body in flight: a transfer is never cut
    assert relay.body_done() == []
    assert relay.peer_idle() == []  # the client still owes VALID
    assert client(relay, m.Valid()) == [to_peer(m.Valid())]
    assert relay.peer_idle() == []  # the peer owes the result
    assert peer(relay, m.Success()) == [Stored(KEY, (SERVER_UUID,)), to_client(m.Success())]
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.Get(0, None, KEY)) == [OpenPeer(4, ())]
    assert relay.peer_opened(4) == [to_peer(m.Get(0, None, KEY))]
    assert peer(relay, m.Data(11)) == [to_client(m.Data(11)), CopyBody(P, 11)]
    assert relay.body_done() == []
    assert peer(relay, m.Valid()) == [to_client(m.Valid())]
    assert relay.peer_idle() == []  # the client's verdict is still due
    assert client(relay, m.Success()) == [to_peer(m.Success())]
    assert idle(relay) and relay.peer_idle() == [IDLE]


def test_lock_is_never_stopped() -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    assert relay.peer_idle() == []  # waiting for the lock's answer
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    assert relay.phase is Phase.CLIENT_UNLOCK
    for _ in range(3):  # however long the client holds it
        assert not relay.peer_stoppable
        assert relay.peer_idle() == []
    assert relay.peer_open
    assert client(relay, m.UnlockContent()) == [to_peer(m.UnlockContent())]
    assert relay.peer_idle() == [IDLE]


def test_failed_lock_leaves_the_peer_stoppable() -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert relay.peer_idle() == [IDLE]


def test_bypass_survives_the_idle_stop() -> None:
    relay = session(2)
    assert client(relay, m.Bypass((NODE_B, NODE_A))) == [to_peer(m.Bypass((NODE_B, NODE_A)))]
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(2, (NODE_A, NODE_B))]
    # BYPASS while stopped is kept for the next open, not sent anywhere.
    assert relay.peer_opened(2) == [to_peer(m.CheckPresent(KEY))]
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.Bypass((NODE_C,))) == []
    more = tuple(sorted((NODE_A, NODE_B, NODE_C)))
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(2, more)]


def test_timestamp_then_remove_before_across_an_idle_stop() -> None:
    # The clock is the host's: a REMOVE-BEFORE goes to the new peer as it is.
    relay = session(4)
    request(relay, m.GetTimestamp())
    assert peer(relay, m.Timestamp(1000)) == [to_client(m.Timestamp(1000))]
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.RemoveBefore(1060, KEY)) == [OpenPeer(4, ())]
    assert relay.peer_opened(4) == [to_peer(m.RemoveBefore(1060, KEY))]
    assert peer(relay, m.Success()) == [
        Removed(KEY, (SERVER_UUID,)),
        to_client(m.Success()),
    ]


def test_a_reopened_peer_is_not_retried() -> None:
    # The idle stop is not a stale connection: a request on the fresh one
    # that fails is answered with the error, not sent a third time.
    relay = session(4)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(4, ())]
    assert relay.peer_opened(4) == [to_peer(m.CheckPresent(KEY))]
    assert peer(relay, EndOfStream(clean=False)) == [
        ClosePeer("connection closed"),
        error(f"{PEER}: connection closed"),
    ]


def test_reopen_after_idle_that_fails_tells_the_client() -> None:
    relay = session(4)
    request(relay, m.CheckPresent(KEY))
    peer(relay, m.Success())
    assert relay.peer_idle() == [IDLE]
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(4, ())]
    assert relay.side_lost(P, "cannot run git-annex-shell") == [error(f"{PEER}: unreachable")]
    assert idle(relay) and relay.version == 4


def test_watching_session_stops_its_peer() -> None:
    # An assistant that transferred, then waits for changes on the same connection.
    relay = session(4, notifies=True)
    request(relay, m.CheckPresent(KEY))
    peer(relay, m.Success())
    assert client(relay, m.NotifyChange()) == [WatchRefs()]
    assert relay.peer_stoppable
    assert relay.peer_idle() == [IDLE]
    assert relay.refs_changed(("b" * 40,)) == [to_client(m.Changed("b" * 40))]
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(4, ())]


def test_idle_stop_during_a_request_is_refused_everywhere_but_idle() -> None:
    relay = session(4)
    assert client(relay, m.CheckPresent(KEY)) == [to_peer(m.CheckPresent(KEY))]
    assert relay.phase is Phase.PEER_REPLY and relay.peer_idle() == []
    assert peer(relay, m.Success()) == [Send(C, m.Success())]
    assert relay.peer_idle() == [IDLE]
