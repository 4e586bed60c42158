"""Transcript tests of the relay state machine (torbridge/protocol/relay.py).

Each test feeds the events the I/O layer would read, in order, and checks the
exact list of actions the Relay answers with. Behaviour follows the "single
remote" proxy of docs/proxy-and-clusters.md and the server of
docs/p2p-protocol.md. A hypothesis test then drives the Relay the way
server/session.py does, with random input and random failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol import messages as m
from torbridge.protocol.framing import BadLine, EndOfStream, LineTooLong
from torbridge.protocol.permissions import Mode
from torbridge.protocol.relay import (
    Phase,
    Relay,
    RelayError,
)
from torbridge.protocol.relayactions import (
    Action,
    CheckAuth,
    ClosePeer,
    CopyBody,
    DiscardBody,
    EndSession,
    InEvent,
    OpenPeer,
    RefuseService,
    Removed,
    RunService,
    Send,
    Side,
    Stored,
    WatchRefs,
)

C, P = Side.CLIENT, Side.PEER
SERVER_UUID = "a0a0a0a0-0000-4000-8000-000000000001"
CLIENT_UUID = "c11e4700-1111-4111-8111-111111111111"
TOKEN = "0123456789abcdef" * 8
PEER = "node1"
KEY = "SHA256E-s11--2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90.txt"
KEY2 = "SHA256E-s5--f2ca1bb6c7e907d06dafe4687e579fce76b37e4e93b7605022da52e6ccc26fd2.bin"
NODE_A = "11111111-2222-4333-8444-555555555555"
NODE_B = "66666666-7777-4888-9999-000000000000"

READ_ONLY = "this repository is read-only; write access denied"
APPEND_ONLY = "this repository is append-only; removal denied"

VERSIONS = [0, 1, 2, 4]
T = TypeVar("T")
Lose = Callable[[Relay], list[Action]]


def to_client(message: m.Message) -> Send:
    return Send(C, message)


def to_peer(message: m.Message) -> Send:
    return Send(P, message)


def error(text: str) -> Send:
    return Send(C, m.Error(text))


def connect(mode: Mode = Mode.READ_WRITE, notifies: bool = False) -> Relay:
    """A relay past AUTH, no VERSION yet, peer not open."""
    relay = Relay(SERVER_UUID, PEER, notifies)
    assert relay.next_reader is C
    assert relay.receive(C, m.Auth(CLIENT_UUID, TOKEN)) == [CheckAuth(CLIENT_UUID, TOKEN)]
    assert relay.next_reader is None
    assert relay.auth_accepted(mode) == [to_client(m.AuthSuccess(SERVER_UUID))]
    assert relay.next_reader is C
    return relay


def session(version: int, mode: Mode = Mode.READ_WRITE, notifies: bool = False) -> Relay:
    """A relay at ``version``: VERSION n opened the peer (v1+); v0 sends none."""
    relay = connect(mode, notifies)
    if version:
        assert relay.receive(C, m.Version(version)) == [OpenPeer(version, ())]
        assert relay.next_reader is None
        assert relay.peer_opened(version) == [to_client(m.Version(version))]
        assert relay.peer_open
    assert relay.version == version
    assert relay.phase is Phase.IDLE
    return relay


def request(relay: Relay, message: m.Message) -> None:
    """Send a request; opens the peer if needed. The relay then waits for the peer."""
    if relay.peer_open:
        assert relay.receive(C, message) == [to_peer(message)]
    else:
        assert relay.receive(C, message) == [OpenPeer(relay.version, relay.bypass)]
        assert relay.peer_opened(relay.version) == [to_peer(message)]
    assert relay.next_reader is P


def client(relay: Relay, event: InEvent) -> list[Action]:
    assert relay.next_reader is C
    return relay.receive(C, event)


def peer(relay: Relay, event: InEvent) -> list[Action]:
    assert relay.next_reader is P
    return relay.receive(P, event)


def idle(relay: Relay) -> bool:
    return relay.phase is Phase.IDLE and relay.next_reader is C


# --- AUTH --------------------------------------------------------------------------


def test_auth_accepted_sets_mode() -> None:
    relay = connect(Mode.APPEND_ONLY)
    assert relay.mode is Mode.APPEND_ONLY
    assert relay.client_uuid == CLIENT_UUID
    assert relay.version == 0
    assert not relay.peer_open  # the peer is opened lazily


def test_auth_rejected_fails_and_lingers() -> None:
    relay = Relay(SERVER_UUID, PEER)
    assert client(relay, m.Auth(CLIENT_UUID, "bad")) == [CheckAuth(CLIENT_UUID, "bad")]
    assert relay.auth_rejected() == [
        to_client(m.AuthFailure()),
        EndSession("authentication failed", clean=True, linger=1.0),
    ]
    assert relay.done and relay.next_reader is None


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (m.CheckPresent(KEY), "unexpected command"),
        (m.Version(4), "unexpected command"),
        (m.AuthSuccess(SERVER_UUID), "unexpected command"),
        (m.Error("hello?"), "unexpected command"),
        (BadLine("unknown command"), "unknown command"),
    ],
)
def test_first_message_must_be_auth(event: InEvent, text: str) -> None:
    relay = Relay(SERVER_UUID, PEER)
    assert client(relay, event) == [error(text), EndSession("no AUTH", linger=1.0)]
    assert relay.done


def test_eof_and_long_line_before_auth() -> None:
    relay = Relay(SERVER_UUID, PEER)
    assert client(relay, EndOfStream(clean=True)) == [EndSession("client closed")]
    relay = Relay(SERVER_UUID, PEER)
    assert client(relay, LineTooLong()) == [
        EndSession("client sent a line over the limit", clean=False)
    ]


def test_out_of_turn_calls_are_relay_errors() -> None:
    relay = Relay(SERVER_UUID, PEER)
    with pytest.raises(RelayError):
        relay.receive(P, m.Success())
    with pytest.raises(RelayError):
        relay.auth_accepted(Mode.READ_WRITE)
    relay = session(4)
    with pytest.raises(RelayError):
        relay.receive(P, m.Success())
    with pytest.raises(RelayError):
        relay.body_done()
    with pytest.raises(RelayError):
        relay.peer_opened(4)


# --- VERSION ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "offered", "agreed"),
    [(4, 4, 4), (4, 2, 2), (4, 0, 0), (2, 2, 2), (1, 1, 1), (9, 4, 4), (3, 3, 3)],
)
def test_version_is_what_the_peer_agrees(asked: int, offered: int, agreed: int) -> None:
    relay = connect()
    assert client(relay, m.Version(asked)) == [OpenPeer(min(asked, 4), ())]
    assert relay.peer_opened(offered) == [to_client(m.Version(agreed))]
    assert relay.version == agreed
    assert idle(relay)
    # Requests go out on the connection VERSION opened, at the agreed version.
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]


def test_version_zero_opens_the_peer_at_zero() -> None:
    relay = connect()
    assert client(relay, m.Version(0)) == [OpenPeer(0, ())]
    assert relay.peer_opened(0) == [to_client(m.Version(0))]
    assert relay.version == 0


def test_v0_client_first_request_opens_the_peer_at_v0() -> None:
    relay = connect()
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(0, ())]
    assert relay.next_reader is None
    assert relay.peer_opened(0) == [to_peer(m.CheckPresent(KEY))]
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    # VERSION is only valid as the first request.
    assert client(relay, m.Version(4)) == [error("unexpected command")]
    assert relay.version == 0


def test_version_twice_is_refused() -> None:
    relay = session(4)
    assert client(relay, m.Version(4)) == [error("unexpected command")]
    assert relay.version == 4 and idle(relay)


def test_version_with_unreachable_peer_closes_the_connection() -> None:
    """An ERROR alone would leave the client's pooled connection at version 0.
    It says why, then closes, as git-annex's proxy closes; the client then
    opens a new connection for its next transfer."""
    relay = connect()
    assert client(relay, m.Version(4)) == [OpenPeer(4, ())]
    assert relay.side_lost(P, "no route") == [
        error(f"{PEER}: unreachable"),
        EndSession(f"{PEER} unreachable at VERSION: no route", clean=False),
    ]
    assert relay.done


def test_client_error_after_a_refused_put_keeps_the_session() -> None:
    """The stock client answers an ERROR to its PUT with ERROR "expected
    PUT_FROM or ALREADY_HAVE" and goes on with its next request on the same
    connection: that ERROR must not end the session."""
    relay = session(4)
    request(relay, m.Put(None, KEY))
    assert peer(relay, m.Error("no node stored it")) == [error("no node stored it")]
    assert idle(relay)
    assert client(relay, m.Error("expected PUT_FROM or ALREADY_HAVE")) == []
    assert idle(relay)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    # Only right after the refused PUT: any other ERROR still ends it.
    assert client(relay, m.Error("confused"))[-1] == EndSession("client error: confused")


def test_client_error_after_a_read_only_refusal_of_put() -> None:
    relay = session(4, Mode.READ_ONLY)
    assert client(relay, m.Put(None, KEY)) == [error(READ_ONLY)]
    assert client(relay, m.Error("expected PUT_FROM or ALREADY_HAVE")) == []
    assert idle(relay)


def test_client_error_after_put_from_is_not_tolerated() -> None:
    relay = session(4)
    request(relay, m.Put(None, KEY))
    assert peer(relay, m.PutFrom(0)) == [to_client(m.PutFrom(0))]
    assert client(relay, m.Error("gave up"))[-1] == EndSession("client error: gave up")


def test_idle_peer_is_closed_and_reopened_on_demand() -> None:
    relay = session(4)
    assert relay.peer_idle() == [ClosePeer("idle")]
    assert idle(relay) and not relay.peer_open
    assert relay.peer_idle() == []  # closed already
    request(relay, m.CheckPresent(KEY))  # opens it again, at the same version
    assert peer(relay, m.Success()) == [to_client(m.Success())]


def test_busy_is_an_error_not_auth_failure() -> None:
    relay = Relay(SERVER_UUID, PEER)
    assert relay.receive(C, m.Auth(CLIENT_UUID, TOKEN)) == [CheckAuth(CLIENT_UUID, TOKEN)]
    assert relay.auth_busy("too many") == [error("too many"), EndSession("busy: too many")]


def test_reopen_at_another_version_is_refused() -> None:
    relay = session(4)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, EndOfStream(clean=True)) == [
        ClosePeer("connection closed"),
        OpenPeer(4, ()),
    ]
    assert relay.peer_opened(3) == [
        ClosePeer("version changed"),
        error(f"{PEER}: protocol version changed"),
    ]
    assert idle(relay) and not relay.peer_open


def test_bypass_is_kept_and_forwarded_at_v2() -> None:
    relay = session(2)
    assert client(relay, m.Bypass((NODE_B, NODE_A))) == [to_peer(m.Bypass((NODE_B, NODE_A)))]
    assert relay.bypass == (NODE_A, NODE_B)
    request(relay, m.CheckPresent(KEY))
    # A new connection gets the bypass set at open time.
    assert peer(relay, EndOfStream(clean=False)) == [
        ClosePeer("connection closed"),
        OpenPeer(2, (NODE_A, NODE_B)),
    ]


def test_bypass_below_v2_is_refused() -> None:
    relay = session(1)
    assert client(relay, m.Bypass((NODE_A,))) == [error("unexpected command")]
    assert relay.bypass == ()


# --- CHECKPRESENT, LOCKCONTENT --------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("reply", [m.Success(), m.Failure(), m.Error("disk on fire")])
def test_checkpresent_reply_is_relayed(version: int, reply: m.Message) -> None:
    relay = session(version)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, reply) == [to_client(reply)]
    assert idle(relay)


@pytest.mark.parametrize("version", VERSIONS)
def test_lockcontent_then_unlockcontent(version: int) -> None:
    relay = session(version)
    request(relay, m.LockContent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    assert relay.phase is Phase.CLIENT_UNLOCK
    # UNLOCKCONTENT is relayed and has no reply.
    assert client(relay, m.UnlockContent()) == [to_peer(m.UnlockContent())]
    assert idle(relay)
    request(relay, m.CheckPresent(KEY))


@pytest.mark.parametrize("version", VERSIONS)
def test_lockcontent_failure_holds_nothing(version: int) -> None:
    relay = session(version)
    request(relay, m.LockContent(KEY))
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert idle(relay)
    assert client(relay, m.UnlockContent()) == [error("unexpected command")]


@pytest.mark.parametrize(
    "event", [m.CheckPresent(KEY), m.LockContent(KEY), m.Success(), BadLine("unknown command")]
)
def test_anything_but_unlockcontent_after_a_lock(event: InEvent) -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    # The peer releases the lock, the client is told, the message is dropped.
    assert client(relay, event) == [to_peer(m.UnlockContent()), error("expected UNLOCKCONTENT")]
    assert idle(relay) and relay.peer_open


def test_data_after_a_lock_has_its_body_skipped() -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]
    assert client(relay, m.Data(12)) == [
        to_peer(m.UnlockContent()),
        error("expected UNLOCKCONTENT"),
        DiscardBody(12),
    ]
    assert idle(relay)


def test_client_error_while_holding_a_lock_ends_the_session() -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    peer(relay, m.Success())
    assert client(relay, m.Error("bye")) == [EndSession("client error: bye")]
    assert relay.done


def test_unlock_after_the_peer_went_away_is_not_sent() -> None:
    relay = session(4)
    request(relay, m.LockContent(KEY))
    peer(relay, m.Success())
    # Sending something earlier failed (reported while idle in CLIENT_UNLOCK).
    assert relay.side_lost(P, "reset") == [ClosePeer("reset")]
    assert client(relay, m.UnlockContent()) == []
    assert idle(relay)


# --- REMOVE, REMOVE-BEFORE, GETTIMESTAMP ------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_remove_success_and_failure(version: int) -> None:
    relay = session(version)
    request(relay, m.Remove(KEY))
    assert peer(relay, m.Success()) == [Removed(KEY, (SERVER_UUID,)), to_client(m.Success())]
    request(relay, m.Remove(KEY2))
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    request(relay, m.Remove(KEY2))
    assert peer(relay, m.Error("locked")) == [to_client(m.Error("locked"))]
    assert idle(relay)


def test_remove_plus_replies_at_v2() -> None:
    relay = session(2)
    request(relay, m.Remove(KEY))
    reply: m.Message = m.SuccessPlus((NODE_A, NODE_B))
    assert peer(relay, reply) == [Removed(KEY, (SERVER_UUID, NODE_A, NODE_B)), to_client(reply)]
    request(relay, m.Remove(KEY))
    reply = m.FailurePlus((NODE_A,))
    assert peer(relay, reply) == [Removed(KEY, (NODE_A,)), to_client(reply)]
    request(relay, m.Remove(KEY))
    assert peer(relay, m.FailurePlus(())) == [to_client(m.FailurePlus(()))]


@pytest.mark.parametrize("version", VERSIONS)
def test_gettimestamp_and_remove_before_pass_through(version: int) -> None:
    # git-annex's server accepts both at any version: the relay does not filter.
    relay = session(version)
    request(relay, m.GetTimestamp())
    assert peer(relay, m.Timestamp(12345)) == [to_client(m.Timestamp(12345))]
    request(relay, m.RemoveBefore(12945, KEY))
    assert peer(relay, m.Success()) == [Removed(KEY, (SERVER_UUID,)), to_client(m.Success())]
    request(relay, m.RemoveBefore(12000, KEY))
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert idle(relay)


def test_gettimestamp_answered_with_success_is_a_protocol_error() -> None:
    relay = session(4)
    request(relay, m.GetTimestamp())
    why = "protocol error: unexpected Success to GetTimestamp"
    assert peer(relay, m.Success()) == [ClosePeer(why), error(f"{PEER}: {why}")]


# --- PUT -------------------------------------------------------------------------------


def put_from(relay: Relay, offset: int = 0, key: str = KEY) -> None:
    request(relay, m.Put("file.txt", key))
    assert peer(relay, m.PutFrom(offset)) == [to_client(m.PutFrom(offset))]
    assert relay.phase is Phase.CLIENT_PUT_DATA


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("reply", [m.AlreadyHave(), m.Failure(), m.Error("full")])
def test_put_answered_at_once(version: int, reply: m.Message) -> None:
    relay = session(version)
    request(relay, m.Put(None, KEY))
    assert peer(relay, reply) == [to_client(reply)]  # nothing stored
    assert idle(relay)


def test_put_already_have_plus_at_v2() -> None:
    relay = session(2)
    request(relay, m.Put(None, KEY))
    assert peer(relay, m.AlreadyHavePlus((NODE_A,))) == [to_client(m.AlreadyHavePlus((NODE_A,)))]
    assert idle(relay)


@pytest.mark.parametrize("version", [1, 2, 4])
def test_put_with_data_and_valid(version: int) -> None:
    relay = session(version)
    put_from(relay, 3)
    assert client(relay, m.Data(8)) == [to_peer(m.Data(8)), CopyBody(C, 8)]
    assert relay.next_reader is None
    assert relay.body_done() == []
    assert relay.phase is Phase.CLIENT_VALIDITY
    assert client(relay, m.Valid()) == [to_peer(m.Valid())]
    assert peer(relay, m.Success()) == [Stored(KEY, (SERVER_UUID,)), to_client(m.Success())]
    assert idle(relay)


def test_put_v0_has_no_valid() -> None:
    relay = session(0)
    put_from(relay)
    assert client(relay, m.Data(11)) == [to_peer(m.Data(11)), CopyBody(C, 11)]
    assert relay.body_done() == []
    assert relay.next_reader is P  # straight to the peer's verdict
    assert peer(relay, m.Success()) == [Stored(KEY, (SERVER_UUID,)), to_client(m.Success())]
    assert idle(relay)


@pytest.mark.parametrize("version", [1, 4])
def test_put_invalid_and_failure(version: int) -> None:
    relay = session(version)
    put_from(relay)
    client(relay, m.Data(11))
    relay.body_done()
    assert client(relay, m.Invalid()) == [to_peer(m.Invalid())]
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert idle(relay)


def test_put_success_plus_records_the_nodes() -> None:
    relay = session(2)
    put_from(relay)
    client(relay, m.Data(11))
    relay.body_done()
    client(relay, m.Valid())
    reply = m.SuccessPlus((NODE_A, NODE_B))
    assert peer(relay, reply) == [Stored(KEY, (SERVER_UUID, NODE_A, NODE_B)), to_client(reply)]


def test_put_data_present_at_v4() -> None:
    relay = session(4)
    put_from(relay)
    assert client(relay, m.DataPresent()) == [to_peer(m.DataPresent())]
    assert peer(relay, m.Success()) == [Stored(KEY, (SERVER_UUID,)), to_client(m.Success())]
    put_from(relay, key=KEY2)
    assert client(relay, m.DataPresent()) == [to_peer(m.DataPresent())]
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    assert idle(relay)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_put_data_present_below_v4_breaks_the_exchange(version: int) -> None:
    relay = session(version)
    put_from(relay)
    assert client(relay, m.DataPresent()) == [
        ClosePeer("client broke the exchange"),
        error("unexpected command"),
    ]
    assert idle(relay) and not relay.peer_open
    # The next request gets a new connection.
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(version, ())]


def test_put_zero_byte_body() -> None:
    relay = session(4)
    put_from(relay)
    assert client(relay, m.Data(0)) == [to_peer(m.Data(0)), CopyBody(C, 0)]
    assert relay.body_done() == []
    assert client(relay, m.Valid()) == [to_peer(m.Valid())]
    assert peer(relay, m.Success()) == [Stored(KEY, (SERVER_UUID,)), to_client(m.Success())]


@pytest.mark.parametrize(
    ("phase_setup", "event", "expected_tail"),
    [
        ("put-data", m.CheckPresent(KEY), [error("unexpected command")]),
        ("put-data", BadLine("invalid key"), [error("unknown command")]),
        ("validity", m.Success(), [error("unexpected command")]),
        ("validity", m.Data(4), [error("unexpected command"), DiscardBody(4)]),
        ("get-result", m.Valid(), [error("unexpected command")]),
        ("get-result", m.Data(9), [error("unexpected command"), DiscardBody(9)]),
    ],
)
def test_client_out_of_step_drops_the_peer(
    phase_setup: str, event: InEvent, expected_tail: list[Action]
) -> None:
    relay = session(4)
    if phase_setup == "put-data":
        put_from(relay)
    elif phase_setup == "validity":
        put_from(relay)
        client(relay, m.Data(11))
        relay.body_done()
    else:
        request(relay, m.Get(0, None, KEY))
        peer(relay, m.Data(11))
        relay.body_done()
        peer(relay, m.Valid())
    assert client(relay, event) == [ClosePeer("client broke the exchange"), *expected_tail]
    assert idle(relay) and not relay.peer_open


# --- GET -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 4])
@pytest.mark.parametrize("verdict", [m.Success(), m.Failure()])
def test_get_with_data_valid_and_verdict(version: int, verdict: m.Message) -> None:
    relay = session(version)
    request(relay, m.Get(0, "dir/file.txt", KEY))
    assert peer(relay, m.Data(11)) == [to_client(m.Data(11)), CopyBody(P, 11)]
    assert relay.next_reader is None
    assert relay.body_done() == []
    assert peer(relay, m.Valid()) == [to_client(m.Valid())]
    assert relay.phase is Phase.CLIENT_GET_RESULT
    assert client(relay, verdict) == [to_peer(verdict)]  # GET records nothing
    assert idle(relay)


def test_get_v0_has_no_valid() -> None:
    relay = session(0)
    request(relay, m.Get(5, None, KEY))
    assert peer(relay, m.Data(6)) == [to_client(m.Data(6)), CopyBody(P, 6)]
    assert relay.body_done() == []
    assert relay.next_reader is C  # the client's verdict, no VALID
    assert client(relay, m.Success()) == [to_peer(m.Success())]
    assert idle(relay)


def test_get_missing_content_is_data_0_invalid() -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    assert peer(relay, m.Data(0)) == [to_client(m.Data(0)), CopyBody(P, 0)]
    assert relay.body_done() == []
    assert peer(relay, m.Invalid()) == [to_client(m.Invalid())]
    assert client(relay, m.Failure()) == [to_peer(m.Failure())]
    assert idle(relay)


@pytest.mark.parametrize("version", VERSIONS)
def test_get_error_is_relayed_and_the_session_goes_on(version: int) -> None:
    relay = session(version)
    request(relay, m.Get(0, None, KEY))
    assert peer(relay, m.Error("content not present")) == [
        to_client(m.Error("content not present"))
    ]
    assert idle(relay) and relay.peer_open
    request(relay, m.CheckPresent(KEY))


def test_get_reply_other_than_data_is_a_protocol_error() -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    why = "protocol error: unexpected Success to Get"
    assert peer(relay, m.Success()) == [ClosePeer(why), error(f"{PEER}: {why}")]


def test_peer_sends_something_else_than_valid_after_a_get_body() -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    peer(relay, m.Data(3))
    relay.body_done()
    why = "protocol error: unexpected Success after DATA"
    assert peer(relay, m.Success()) == [ClosePeer(why), to_client(m.Invalid())]
    assert client(relay, m.Success()) == []  # nobody to tell
    assert idle(relay)


# --- server modes --------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("mode", "message", "text"),
    [
        (Mode.READ_ONLY, m.Put(None, KEY), READ_ONLY),
        (Mode.READ_ONLY, m.Remove(KEY), READ_ONLY),
        (Mode.READ_ONLY, m.RemoveBefore(10, KEY), READ_ONLY),
        (Mode.APPEND_ONLY, m.Remove(KEY), APPEND_ONLY),
        (Mode.APPEND_ONLY, m.RemoveBefore(10, KEY), APPEND_ONLY),
    ],
)
def test_modes_refuse_writes(version: int, mode: Mode, message: m.Message, text: str) -> None:
    relay = session(version, mode)
    opens = relay.peer_open
    assert client(relay, message) == [error(text)]
    assert idle(relay) and relay.peer_open == opens  # the peer never heard of it


@pytest.mark.parametrize(
    "message",
    [m.CheckPresent(KEY), m.Get(0, None, KEY), m.LockContent(KEY), m.GetTimestamp()],
)
def test_read_only_allows_reads(message: m.Message) -> None:
    relay = session(4, Mode.READ_ONLY)
    request(relay, message)


def test_append_only_allows_put() -> None:
    relay = session(4, Mode.APPEND_ONLY)
    put_from(relay)


@pytest.mark.parametrize("mode", [Mode.READ_ONLY, Mode.APPEND_ONLY])
def test_receive_pack_is_refused_when_not_read_write(mode: Mode) -> None:
    relay = connect(mode)
    assert client(relay, m.Connect("git-receive-pack")) == [
        RefuseService("git-receive-pack", READ_ONLY),
        EndSession("CONNECT git-receive-pack done"),
    ]
    assert relay.done


@pytest.mark.parametrize("mode", list(Mode))
def test_upload_pack_is_run_in_every_mode(mode: Mode) -> None:
    relay = session(4, mode)
    assert client(relay, m.Connect("git-upload-pack")) == [
        RunService("git-upload-pack"),
        EndSession("CONNECT git-upload-pack done"),
    ]
    assert relay.done


def test_receive_pack_runs_in_read_write_mode() -> None:
    relay = connect(Mode.READ_WRITE)
    assert client(relay, m.Connect("git-receive-pack")) == [
        RunService("git-receive-pack"),
        EndSession("CONNECT git-receive-pack done"),
    ]


# --- odd client input ------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 4])
def test_notifychange_is_a_protocol_error_for_proxied_remotes(version: int) -> None:
    """Nodes and clusters: as git-annex's proxy, the session ends."""
    relay = session(version)
    actions = client(relay, m.parse(b"NOTIFYCHANGE"))
    assert actions == [error("protocol error"), EndSession("NOTIFYCHANGE is not served")]
    assert wire(actions) == b"ERROR protocol error\n"
    assert relay.done


SHA1 = "1" * 40
SHA2 = "2" * 40


def wire(actions: list[Action]) -> bytes:
    """The bytes the client is sent."""
    return b"".join(m.serialise(a.message) for a in actions if isinstance(a, Send) and a.to is C)


@pytest.mark.parametrize("version", [0, 4, None])
def test_notifychange_on_the_own_repository_is_answered_with_changed(
    version: int | None,
) -> None:
    """As git-annex's own server: wait, CHANGED with the new commits, go on."""
    relay = connect(notifies=True) if version is None else session(version, notifies=True)
    peer_was_open = relay.peer_open
    # The remotedaemon sends no VERSION: NOTIFYCHANGE is its first request.
    assert client(relay, m.parse(b"NOTIFYCHANGE")) == [WatchRefs()]
    assert relay.phase is Phase.WATCHING and relay.next_reader is None
    assert relay.request == m.NotifyChange()  # what `torbridge status` shows
    actions = relay.refs_changed((SHA1, SHA2))
    assert wire(actions) == f"CHANGED {SHA1} {SHA2}\n".encode()
    assert idle(relay) and relay.peer_open == peer_was_open  # no peer needed, none closed
    # Again on the same session, as the remotedaemon does after fetching.
    assert client(relay, m.NotifyChange()) == [WatchRefs()]
    assert wire(relay.refs_changed((SHA2,))) == f"CHANGED {SHA2}\n".encode()
    # And the session still serves requests.
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]


def test_a_watching_client_that_leaves_ends_its_session_cleanly() -> None:
    relay = connect(notifies=True)
    assert client(relay, m.NotifyChange()) == [WatchRefs()]
    assert relay.side_lost(C, "closed the connection") == [
        EndSession("client left: closed the connection")
    ]
    assert relay.done


def test_refs_changed_only_when_watching_and_never_empty() -> None:
    relay = connect(notifies=True)
    with pytest.raises(RelayError):
        relay.refs_changed((SHA1,))
    assert client(relay, m.NotifyChange()) == [WatchRefs()]
    with pytest.raises(RelayError):
        relay.refs_changed(())


def test_unknown_line_is_answered_and_the_session_goes_on() -> None:
    relay = session(4)
    assert client(relay, BadLine("unknown command")) == [error("unknown command")]
    assert client(relay, BadLine("invalid key")) == [error("unknown command")]
    assert idle(relay)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, m.Success()) == [to_client(m.Success())]


@pytest.mark.parametrize("version", [0, 4])
def test_stray_data_has_its_body_discarded(version: int) -> None:
    relay = session(version)
    assert client(relay, m.Data(100)) == [error("unexpected command"), DiscardBody(100)]
    assert idle(relay)


@pytest.mark.parametrize(
    "message",
    [
        m.Success(),
        m.Failure(),
        m.Valid(),
        m.Invalid(),
        m.UnlockContent(),
        m.DataPresent(),
        m.AlreadyHave(),
        m.PutFrom(0),
        m.Timestamp(1),
        m.AuthSuccess(SERVER_UUID),
        m.Auth(CLIENT_UUID, TOKEN),
        m.ConnectDone(0),
        m.Changed("abc"),
    ],
)
def test_messages_out_of_place_are_unexpected(message: m.Message) -> None:
    relay = session(4)
    assert client(relay, message) == [error("unexpected command")]
    assert idle(relay) and relay.peer_open


def test_client_error_ends_the_session() -> None:
    relay = session(4)
    assert client(relay, m.Error("something broke")) == [
        EndSession("client error: something broke")
    ]
    assert relay.done and relay.next_reader is None


def test_client_error_mid_put_ends_the_session() -> None:
    relay = session(4)
    put_from(relay)
    assert client(relay, m.Error("gave up")) == [EndSession("client error: gave up")]
    assert relay.done


def test_client_eof() -> None:
    relay = session(4)
    assert client(relay, EndOfStream(clean=True)) == [EndSession("client closed")]
    relay = session(4)
    assert client(relay, EndOfStream(clean=False)) == [
        EndSession("client closed mid-exchange", clean=False)
    ]
    relay = session(4)
    put_from(relay)
    assert client(relay, EndOfStream(clean=True)) == [
        EndSession("client closed mid-exchange", clean=False)
    ]


def test_client_lost_ends_the_session() -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    peer(relay, m.Data(10))
    assert relay.side_lost(C, "reset") == [EndSession("client lost: reset", clean=False)]
    assert relay.done
    assert relay.side_lost(P, "late") == []  # nothing more after the end


def test_client_line_too_long() -> None:
    relay = session(4)
    assert client(relay, LineTooLong()) == [
        EndSession("client sent a line over the limit", clean=False)
    ]


# --- peer failures ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 4])
def test_open_fails(version: int) -> None:
    relay = connect()
    if version:
        client(relay, m.Version(version))
        relay.peer_opened(version)
        # The first connection breaks; the retry cannot reach the peer.
        request(relay, m.CheckPresent(KEY))
        assert peer(relay, EndOfStream(clean=True)) == [
            ClosePeer("connection closed"),
            OpenPeer(version, ()),
        ]
    else:
        assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(0, ())]
    assert relay.side_lost(P, "node1: connection refused") == [error(f"{PEER}: unreachable")]
    assert idle(relay) and not relay.peer_open
    # The next request tries again.
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(version, ())]


@pytest.mark.parametrize(
    ("lose", "reason"),
    [
        (lambda r: r.receive(P, EndOfStream(clean=True)), "connection closed"),
        (lambda r: r.receive(P, EndOfStream(clean=False)), "connection closed"),
        (
            lambda r: r.side_lost(P, "no message before the deadline"),
            "no message before the deadline",
        ),
    ],
)
def test_reused_connection_lost_is_retried_once(lose: Lose, reason: str) -> None:
    relay = session(4)
    request(relay, m.CheckPresent(KEY))
    peer(relay, m.Success())
    # The connection went stale between requests.
    request(relay, m.LockContent(KEY))
    assert lose(relay) == [ClosePeer(reason), OpenPeer(4, ())]
    assert relay.peer_opened(4) == [to_peer(m.LockContent(KEY))]
    # Lost again on the new connection: no second retry.
    assert lose(relay) == [ClosePeer(reason), error(f"{PEER}: {reason}")]
    assert idle(relay) and not relay.peer_open


def test_retry_answer_is_relayed() -> None:
    relay = session(2)
    request(relay, m.Get(0, None, KEY))
    assert relay.side_lost(P, "broken pipe") == [ClosePeer("broken pipe"), OpenPeer(2, ())]
    assert relay.peer_opened(2) == [to_peer(m.Get(0, None, KEY))]
    assert peer(relay, m.Data(4)) == [to_client(m.Data(4)), CopyBody(P, 4)]


def test_lost_on_a_fresh_connection_is_an_error() -> None:
    relay = session(0)
    request(relay, m.CheckPresent(KEY))  # opens a new connection
    assert peer(relay, EndOfStream(clean=True)) == [
        ClosePeer("connection closed"),
        error(f"{PEER}: connection closed"),
    ]
    assert idle(relay)


def test_no_retry_on_a_fresh_connection_after_a_protocol_error() -> None:
    relay = session(4)
    request(relay, m.CheckPresent(KEY))  # on the connection VERSION opened
    why = "protocol error: unparsable line (unknown command)"
    # The client hears that the peer broke the protocol, not what it said.
    assert peer(relay, BadLine("unknown command")) == [
        ClosePeer(why),
        error(f"{PEER}: protocol error"),
    ]
    # The next request opens a fresh connection, where a loss is not retried.
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, EndOfStream(clean=True)) == [
        ClosePeer("connection closed"),
        error(f"{PEER}: connection closed"),
    ]


def test_retry_send_fails_on_the_new_connection() -> None:
    relay = session(4)
    request(relay, m.CheckPresent(KEY))
    assert relay.side_lost(P, "reset") == [ClosePeer("reset"), OpenPeer(4, ())]
    assert relay.peer_opened(4) == [to_peer(m.CheckPresent(KEY))]
    # Sending the request on the new connection failed.
    assert relay.side_lost(P, "broken pipe") == [
        ClosePeer("broken pipe"),
        error(f"{PEER}: connection lost"),
    ]


@pytest.mark.parametrize("req", [m.Remove(KEY), m.RemoveBefore(12945, KEY)])
def test_remove_left_unanswered_is_logged_missing(req: m.Message) -> None:
    """The peer may have removed it: the node is logged as missing, the safe side."""
    relay = session(4)
    request(relay, req)
    # The reused connection broke: retried once; the retry cannot open.
    assert peer(relay, EndOfStream(clean=True)) == [
        ClosePeer("connection closed"),
        OpenPeer(4, ()),
    ]
    assert relay.side_lost(P, "refused") == [
        Removed(KEY, (SERVER_UUID,)),
        error(f"{PEER}: unreachable"),
    ]
    # On a fresh connection: no retry, the same doubt.
    request(relay, req)
    assert relay.side_lost(P, "no message", retry=False) == [
        ClosePeer("no message"),
        Removed(KEY, (SERVER_UUID,)),
        error(f"{PEER}: connection lost"),
    ]
    # The client left while the answer was awaited.
    request(relay, req)
    assert relay.side_lost(C, "hung up") == [
        Removed(KEY, (SERVER_UUID,)),
        EndSession("client lost: hung up", clean=False),
    ]


def test_remove_never_sent_is_not_logged() -> None:
    relay = session(0)
    assert client(relay, m.Remove(KEY)) == [OpenPeer(0, ())]
    assert relay.side_lost(P, "refused") == [error(f"{PEER}: unreachable")]
    # An answered REMOVE leaves no doubt behind for a later loss.
    request(relay, m.Remove(KEY))
    assert peer(relay, m.Failure()) == [to_client(m.Failure())]
    request(relay, m.CheckPresent(KEY))
    assert relay.side_lost(P, "late", retry=False) == [
        ClosePeer("late"),
        error(f"{PEER}: connection lost"),
    ]


def test_peer_line_too_long_closes_it() -> None:
    relay = session(0)
    request(relay, m.CheckPresent(KEY))
    assert peer(relay, LineTooLong()) == [
        ClosePeer("line over the limit"),
        error(f"{PEER}: line over the limit"),
    ]


@pytest.mark.parametrize("version", [1, 2, 4])
def test_peer_lost_during_put_body(version: int) -> None:
    relay = session(version)
    put_from(relay)
    client(relay, m.Data(1000))
    # The body is being copied when the peer fails: it is drained, then told.
    assert relay.side_lost(P, "broken pipe") == [ClosePeer("broken pipe")]
    assert relay.next_reader is None
    assert relay.body_done() == []
    assert client(relay, m.Valid()) == [error(f"{PEER}: connection lost during transfer")]
    assert idle(relay) and not relay.peer_open
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(version, ())]


def test_peer_lost_during_put_body_v0() -> None:
    relay = session(0)
    put_from(relay)
    client(relay, m.Data(1000))
    assert relay.side_lost(P, "broken pipe") == [ClosePeer("broken pipe")]
    assert relay.body_done() == [error(f"{PEER}: connection lost during transfer")]
    assert idle(relay)


def test_peer_lost_awaiting_the_put_result() -> None:
    relay = session(4)
    put_from(relay)
    client(relay, m.Data(3))
    relay.body_done()
    client(relay, m.Valid())
    assert peer(relay, EndOfStream(clean=True)) == [
        ClosePeer("connection closed"),
        error(f"{PEER}: connection closed"),
    ]  # never retried: the body is gone
    assert idle(relay)


def test_peer_sends_something_else_than_a_put_result() -> None:
    relay = session(4)
    put_from(relay)
    client(relay, m.Data(3))
    relay.body_done()
    client(relay, m.Valid())
    why = "protocol error: unexpected Valid after DATA"
    assert peer(relay, m.Valid()) == [ClosePeer(why), error(f"{PEER}: {why}")]


@pytest.mark.parametrize("version", [0, 4])
def test_peer_lost_during_get_body_ends_the_session(version: int) -> None:
    relay = session(version)
    request(relay, m.Get(0, None, KEY))
    peer(relay, m.Data(1 << 20))
    assert relay.side_lost(P, "closed inside a DATA body") == [
        ClosePeer("closed inside a DATA body"),
        EndSession(f"{PEER} lost during GET: closed inside a DATA body", clean=False),
    ]
    assert relay.done


def test_peer_lost_before_the_client_saw_the_get_header() -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    peer(relay, m.Data(1 << 20))
    assert relay.side_lost(P, "closed inside a DATA body", header_unsent=True) == [
        ClosePeer("closed inside a DATA body"),
        error(f"{PEER}: closed inside a DATA body"),
    ]
    assert relay.next_reader is C


@pytest.mark.parametrize(
    "lose",
    [
        lambda r: r.receive(P, EndOfStream(clean=True)),
        lambda r: r.side_lost(P, "connection closed"),
    ],
)
def test_peer_lost_awaiting_valid_after_get_body(lose: Lose) -> None:
    relay = session(4)
    request(relay, m.Get(0, None, KEY))
    peer(relay, m.Data(5))
    relay.body_done()
    # The client verifies the content itself and its verdict goes nowhere.
    assert lose(relay) == [ClosePeer("connection closed"), to_client(m.Invalid())]
    assert client(relay, m.Success()) == []
    assert idle(relay) and not relay.peer_open


@pytest.mark.parametrize(
    ("req", "reply"),
    [
        (m.CheckPresent(KEY), m.PutFrom(0)),
        (m.CheckPresent(KEY), m.Data(5)),
        (m.LockContent(KEY), m.Timestamp(3)),
        (m.Remove(KEY), m.AlreadyHave()),
        (m.Put(None, KEY), m.Success()),
        (m.Put(None, KEY), m.Data(5)),
        (m.Get(0, None, KEY), m.Valid()),
        (m.GetTimestamp(), m.Failure()),
        (m.CheckPresent(KEY), m.Version(4)),
        (m.CheckPresent(KEY), m.AuthSuccess(SERVER_UUID)),
    ],
)
def test_peer_protocol_violation(req: m.Message, reply: m.Message) -> None:
    relay = session(4)
    request(relay, req)
    why = f"protocol error: unexpected {type(reply).__name__} to {type(req).__name__}"
    assert peer(relay, reply) == [ClosePeer(why), error(f"{PEER}: {why}")]
    assert idle(relay) and not relay.peer_open
    assert client(relay, m.CheckPresent(KEY)) == [OpenPeer(4, ())]


# --- the rules, at random ------------------------------------------------------------------

PROPS = settings(
    max_examples=examples(200),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_U = (NODE_A, NODE_B)
_ANY_CLIENT: list[InEvent] = [
    m.Auth(CLIENT_UUID, TOKEN),
    *(m.Version(v) for v in (0, 1, 2, 3, 4, 6)),
    m.CheckPresent(KEY),
    m.LockContent(KEY),
    m.UnlockContent(),
    m.Remove(KEY),
    m.RemoveBefore(2000, KEY2),
    m.GetTimestamp(),
    m.Put(None, KEY),
    m.Put("a.txt", KEY2),
    m.Get(0, None, KEY),
    m.Get(3, "a.txt", KEY2),
    *(m.Data(n) for n in (0, 11, 1 << 20)),
    m.DataPresent(),
    m.Valid(),
    m.Invalid(),
    m.Success(),
    m.Failure(),
    m.SuccessPlus(_U),
    m.Bypass(_U),
    BadLine("unknown command"),
]
_ENDING_CLIENT: list[InEvent] = [
    m.NotifyChange(),
    m.Connect("git-upload-pack"),
    m.Connect("git-receive-pack"),
    m.Error("client gives up"),
    LineTooLong(),
    EndOfStream(clean=True),
    EndOfStream(clean=False),
]
_ANY_PEER: list[InEvent] = [
    m.Success(),
    m.Failure(),
    m.SuccessPlus(_U),
    m.FailurePlus(_U[:1]),
    m.FailurePlus(()),
    m.Error("peer says no"),
    m.Timestamp(1000),
    m.PutFrom(0),
    m.PutFrom(3),
    m.AlreadyHave(),
    m.AlreadyHavePlus(_U),
    *(m.Data(n) for n in (0, 11, 1 << 20)),
    m.Valid(),
    m.Invalid(),
    m.DataPresent(),
    m.Version(4),
    m.AuthSuccess(SERVER_UUID),
    BadLine("unknown command"),
    LineTooLong(),
    EndOfStream(clean=True),
    EndOfStream(clean=False),
]
# Requests, weighted towards the ones with the longest exchanges.
_REQUESTS: list[InEvent] = [
    *(m.Version(v) for v in (0, 1, 2, 4, 4)),
    m.CheckPresent(KEY),
    m.LockContent(KEY),
    m.LockContent(KEY2),
    m.Remove(KEY),
    m.RemoveBefore(2000, KEY2),
    m.GetTimestamp(),
    *[m.Put(None, KEY)] * 3,
    *[m.Get(0, None, KEY)] * 3,
    m.Bypass(_U),
    m.NotifyChange(),
]


def _likely_events(relay: Relay, side: Side) -> list[InEvent]:
    """What keeps the exchange of the relay's phase going, and a few ways to break it."""
    phase = relay.phase
    if side is C:
        if phase is Phase.AUTH:
            return [m.Auth(CLIENT_UUID, TOKEN)]
        if phase is Phase.CLIENT_UNLOCK:
            return [*[m.UnlockContent()] * 3, m.CheckPresent(KEY), m.Data(11)]
        if phase is Phase.CLIENT_PUT_DATA:
            return [m.Data(11), m.Data(0), m.Data(1 << 20), m.DataPresent(), m.CheckPresent(KEY)]
        if phase is Phase.CLIENT_VALIDITY:
            return [m.Valid(), m.Valid(), m.Invalid(), m.Data(5)]
        if phase is Phase.CLIENT_GET_RESULT:
            return [m.Success(), m.Success(), m.Failure(), m.Data(3)]
        return _REQUESTS
    request = relay.request
    broken: list[InEvent] = [BadLine("unknown command"), EndOfStream(clean=True)]
    if phase is Phase.PEER_VALIDITY:
        return [m.Valid(), m.Valid(), m.Invalid(), m.Success()]
    if phase is Phase.PEER_PUT_RESULT:
        return [m.Success(), m.Failure(), m.SuccessPlus(_U), m.FailurePlus(_U), m.Valid()]
    if isinstance(request, m.Put):
        return [m.PutFrom(0), m.PutFrom(0), m.PutFrom(3), m.AlreadyHave(), m.AlreadyHavePlus(_U)]
    if isinstance(request, m.Get):
        return [m.Data(11), m.Data(11), m.Data(0), m.Data(1 << 20), m.Error("no")]
    if isinstance(request, m.GetTimestamp):
        return [m.Timestamp(1000), m.Error("no")]
    if isinstance(request, (m.Remove, m.RemoveBefore)):
        return [m.Success(), m.Failure(), m.SuccessPlus(_U), m.FailurePlus(_U)]
    return [*[m.Success()] * 4, *[m.Failure()] * 2, m.Error("no"), *broken]


STEPS = 50


class Driver:
    """Carries out a Relay's actions as server/session.py does, failures drawn at random.

    ``peer_open`` is the driver's own view of the connection: open from a
    successful ``peer_opened`` until a ClosePeer or a reported loss.
    """

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.relay = Relay(SERVER_UUID, PEER, notifies=data.draw(st.booleans()))
        self.peer_open = False
        self.opens = 0  # OpenPeer actions since the client's last message

    def draw(self, strategy: st.SearchStrategy[T]) -> T:
        return self.data.draw(strategy)

    def fails(self, percent: int) -> bool:
        # sampled_from shrinks towards the first element: no failure.
        return bool(self.draw(st.sampled_from([False] * (100 - percent) + [True] * percent)))

    def lost(self, side: Side, reason: str) -> list[Action]:
        if side is P:
            self.peer_open = False  # the session closes the peer before telling the relay
        return self.relay.side_lost(side, reason)

    def step(self) -> None:
        relay = self.relay
        side = relay.next_reader
        assert side is not None
        if side is P:
            assert self.peer_open, f"reading a closed peer in {relay.phase}"
        else:
            self.opens = 0
        # One draw: mostly what keeps the exchange going, sometimes anything, rarely a loss.
        likely = _likely_events(relay, side)
        pool: list[InEvent | str] = [*likely * (100 // len(likely))]
        pool += [*(_ANY_CLIENT if side is C else _ANY_PEER), "lost", "lost"]
        if side is C:
            pool.append("end")
        event = self.draw(st.sampled_from(pool))
        if event == "lost":
            self.run(self.lost(side, "no message before the deadline"))
            return
        if event == "end":
            event = self.draw(st.sampled_from(_ENDING_CLIENT))
        assert not isinstance(event, str)
        actions = relay.receive(side, event)
        if isinstance(event, m.Data) and not relay.done:
            # The waitv rule: a DATA body is always consumed (or its side dropped).
            consumed = (
                CopyBody(side, event.length) in actions
                or (side is C and DiscardBody(event.length) in actions)
                or (side is P and any(isinstance(a, ClosePeer) for a in actions))
            )
            assert consumed, (relay.phase, event, actions)
        self.run(actions)

    def run(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, EndSession):
                assert self.relay.done
                return
            queue[:0] = self.perform(action)

    def perform(self, action: Action) -> list[Action]:
        relay = self.relay
        match action:
            case Send(to=side, message=message):
                if side is P:
                    assert self.peer_open, f"{message} sent to a closed peer"
                if self.fails(3 if side is P else 1):
                    return self.lost(side, "broken pipe")
                return []
            case CopyBody(source=source):
                dest = P if source is C else C
                if source is P:
                    assert self.peer_open, "copying from a closed peer"
                outcome = self.draw(st.sampled_from(["ok"] * 18 + ["source", "dest"]))
                if outcome == "source":
                    return self.lost(source, "closed inside a DATA body")
                follow: list[Action] = []
                if outcome == "dest" and (dest is C or self.peer_open):
                    follow = self.lost(dest, "not reading")
                    if any(isinstance(a, EndSession) for a in follow):
                        return follow
                    for a in follow:  # ClosePeer: carried out at once, draining goes on
                        assert isinstance(a, ClosePeer), follow
                        self.perform(a)
                return relay.body_done()
            case DiscardBody():
                return self.lost(C, "closed inside a DATA body") if self.fails(3) else []
            case CheckAuth():
                if self.fails(5):
                    return relay.auth_rejected()
                return relay.auth_accepted(self.draw(st.sampled_from(list(Mode))))
            case OpenPeer(version=version):
                assert not self.peer_open, "opening a second connection"
                # A request opens a connection, or is retried once on a new one
                # after its reused connection failed: never more.
                self.opens += 1
                assert self.opens == 1, "a second OpenPeer for one request"
                if self.fails(10):
                    return self.lost(P, "unreachable")
                agreed = self.draw(st.integers(0, version))
                self.peer_open = True
                follow = relay.peer_opened(agreed)
                if any(isinstance(a, ClosePeer) for a in follow):
                    self.peer_open = False
                return follow
            case ClosePeer():
                self.peer_open = False
                return []
            case WatchRefs():
                if self.fails(10):
                    return self.lost(C, "closed the connection")
                return relay.refs_changed((SHA1,))
            case RunService() | RefuseService() | Stored() | Removed():
                return []
            case _:
                raise AssertionError(f"unknown action {action!r}")


@PROPS
@given(st.data())
def test_relay_driven_by_the_rules_never_breaks(data: st.DataObject) -> None:
    driver = Driver(data)
    for _ in range(STEPS):
        driver.step()
        relay = driver.relay
        assert relay.done or relay.next_reader is not None, relay.phase
        if relay.done:
            break
        assert relay.peer_open == driver.peer_open, relay.phase
