"""The caps of [limits] under a few connections: per-token sessions, the AUTH deadline.

Test 3: ``max_sessions_per_token = 3``: a 4th concurrent session of one token
waits ``session_wait`` for a slot, then gets ERROR (never AUTH-FAILURE: its
token is fine); another token still gets in, and a 4th that waits gets the
slot of a session that ends meanwhile.

Test 4: ``auth_timeout = 1``: a connection that never authenticates is
closed after about a second, and is no longer counted against
``max_unauthenticated`` afterwards; when the cap is full, a new connection
gets in and the oldest unauthenticated one is closed at once.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest

from tests.harness.annex import AnnexRepo
from tests.harness.bridge import Address, Bridge
from tests.harness.process import wait_for as harness_wait_for
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex


# The harness's poll, with this module's deadline.
wait_for = partial(harness_wait_for, timeout=10.0)


def token_sessions(bridge: Bridge, name: str) -> int:
    return sum(1 for s in bridge.sessions() if s["token"] == name)


def open_session(token: Address, proxy: AnnexRepo) -> RawSession:
    """AUTH and VERSION 4 (so a peer is open too): a real session."""
    s = RawSession(token.socket)
    try:
        s.auth(token.token, proxy.uuid)
        assert s.version(4) == "VERSION 4"
    except BaseException:
        s.close()
        raise
    return s


def test_per_token_cap(make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo) -> None:
    bridge = make_load_bridge({"max_sessions_per_token": 3, "session_wait": 5})
    bridge.start()
    alice = bridge.add_token("alice", "rw")
    bob = bridge.add_token("bob", "rw")
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(open_session(alice, proxy_repo)) for _ in range(3)]
        assert token_sessions(bridge, "alice") == 3

        # The 4th of the same token waits session_wait for a slot, then is
        # told ERROR (its token is fine: no AUTH-FAILURE) and closed.
        with RawSession(alice.socket) as fourth:
            answer = fourth.auth(alice.token)
            assert answer.startswith("ERROR ") and "3 sessions open" in answer, answer
            fourth.assert_closed(timeout=10)
        totals = bridge.totals()
        assert totals.get("auth_failures_total", 0) == 0, totals

        # Another token is not affected.
        with open_session(bob, proxy_repo) as other:
            other.send_line("CHECKPRESENT SHA256E-s1--" + "0" * 64)
            other.expect("FAILURE")
        # Its end is seen (its slot is bob's, not alice's).
        wait_for("bob's session ended", lambda: token_sessions(bridge, "bob") == 0)

        # A 4th that waits gets the slot of one that ends meanwhile.
        with RawSession(alice.socket) as waiting:
            waiting.send_line(f"AUTH {waiting.client_uuid} {alice.token}")
            assert waiting.pending(wait=0.5) == b""  # no answer yet: it waits
            held.pop().close()
            assert waiting.read_line(timeout=10) == f"AUTH-SUCCESS {proxy_repo.uuid}"
            assert waiting.version(4) == "VERSION 4"
            waiting.send_line("CHECKPRESENT SHA256E-s1--" + "0" * 64)
            waiting.expect("FAILURE")
            assert token_sessions(bridge, "alice") == 3
    wait_for("all sessions released", lambda: token_sessions(bridge, "alice") == 0)
    with open_session(alice, proxy_repo):
        pass
    totals = bridge.totals()
    assert totals.get("auth_failures_total", 0) == 0, totals
    assert totals.get("sessions_total") == 6, totals
    bridge.assert_alive()


AUTH_TIMEOUT = 1.0
PRE_AUTH_CAP = 2
SLACK = 1.0  # seconds of scheduling noise allowed on top of a deadline


@contextlib.contextmanager
def idle_connections(path: str, n: int) -> Iterator[list[tuple[socket.socket, float]]]:
    """``n`` connections that send nothing, with the time each was made."""
    conns: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            conns.append((s, time.monotonic()))
        yield conns
    finally:
        for s, _ in conns:
            s.close()


def closed_after(conn: tuple[socket.socket, float], timeout: float) -> float:
    """Seconds from connect until the daemon closed it (reading nothing else)."""
    s, opened = conn
    s.settimeout(max(0.01, opened + timeout - time.monotonic()))
    try:
        data = s.recv(1024)
    except TimeoutError:
        raise AssertionError(f"the daemon kept an idle connection open {timeout}s") from None
    except ConnectionResetError:
        data = b""
    assert data == b"", f"the daemon sent {data!r} to a connection that sent nothing"
    return time.monotonic() - opened


def test_auth_deadline_frees_the_slot(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    bridge = make_load_bridge({"auth_timeout": AUTH_TIMEOUT, "max_unauthenticated": PRE_AUTH_CAP})
    bridge.start()
    token = bridge.add_token("t", "rw")
    path = str(token.socket)
    figures: list[float] = []
    evicted_after: list[float] = []
    for round_ in range(3):
        with idle_connections(path, PRE_AUTH_CAP) as conns:
            time.sleep(0.2)  # accepted by now
            # Both slots are taken: one more gets in, and the oldest idle one
            # is closed before its deadline to make room.
            with RawSession(token.socket) as newcomer:
                took = closed_after(conns[0], AUTH_TIMEOUT + SLACK + 2.0)
                evicted_after.append(took)
                assert took < AUTH_TIMEOUT - 0.05, (
                    f"round {round_}: the oldest idle connection was closed after "
                    f"{took:.2f}s, by its deadline ({AUTH_TIMEOUT}s), not evicted"
                )
                newcomer.auth(token.token, proxy_repo.uuid)
            for conn in conns[1:]:
                took = closed_after(conn, AUTH_TIMEOUT + SLACK + 2.0)
                figures.append(took)
                assert AUTH_TIMEOUT - 0.05 <= took <= AUTH_TIMEOUT + SLACK, (
                    f"round {round_}: idle connection closed after {took:.2f}s, "
                    f"auth_timeout is {AUTH_TIMEOUT}s"
                )
        # The closed ones no longer count: the cap's worth of connections,
        # unauthenticated at the same moment, all get in.
        sessions = [RawSession(token.socket) for _ in range(PRE_AUTH_CAP)]
        try:
            time.sleep(0.2)
            for s in sessions:
                s.auth(token.token, proxy_repo.uuid)
        finally:
            for s in sessions:
                s.close()
    print(
        f"\nidle connections closed after {min(figures):.2f}..{max(figures):.2f}s "
        f"(auth_timeout {AUTH_TIMEOUT}s); the oldest, evicted by a newcomer, after "
        f"{min(evicted_after):.2f}..{max(evicted_after):.2f}s"
    )
    totals = bridge.totals()
    assert totals.get("connections_refused_total") == 3, totals
    assert totals.get("sessions_total") == 3 * PRE_AUTH_CAP + 3, totals
    bridge.assert_alive()


def test_auth_deadline_counts_from_accept(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    """A client that sends the start of an AUTH late does not get a second auth_timeout.

    ``auth_timeout`` is "seconds from accepting a connection to its AUTH"
    (config.py): a byte sent just before the deadline must not restart it.
    """
    bridge = make_load_bridge({"auth_timeout": AUTH_TIMEOUT, "max_unauthenticated": 4})
    bridge.start()
    token = bridge.add_token("t", "rw")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(token.socket))
        opened = time.monotonic()
        time.sleep(AUTH_TIMEOUT * 0.8)
        s.sendall(b"AUTH ")  # a partial line, then nothing
        took = closed_after((s, opened), 3 * AUTH_TIMEOUT + SLACK)
    print(
        f"\npartial AUTH at {AUTH_TIMEOUT * 0.8:.1f}s: closed after {took:.2f}s "
        f"(auth_timeout {AUTH_TIMEOUT}s)"
    )
    assert took <= AUTH_TIMEOUT + 0.5, (
        f"closed {took:.2f}s after accept; auth_timeout is {AUTH_TIMEOUT}s"
    )
    bridge.assert_alive()
