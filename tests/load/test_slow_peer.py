"""A peer that does not answer, as under heavy load: what the client sees, and its leaving.

With many sessions at once, the ``git-annex-shell p2pstdio`` peers queue for
git-annex's keys database lock (``.git/annex/keysdb.lck``): 1000 concurrent
GETs on 2 cores left ~970 of them blocked in ``fcntl(F_SETLKW)`` for many
minutes (see ``bench/bench_load.py --sessions 1000``). Here the test holds
that lock itself, so one GET blocks in its peer for as long as wanted, with
a short ``peer_timeout``:

- the client must hear about the dead peer once, after ``peer_timeout``
  (plus the peer's exit grace), not after a second attempt on a new peer;
- a client that hangs up while its request waits for the peer must end the
  session, and its peer process, without waiting for ``peer_timeout``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests.harness.annex import AnnexRepo
from tests.harness.bridge import Bridge
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex

PEER_TIMEOUT = 2.0
EXIT_GRACE = 5.0  # torbridge.transport.process.EXIT_GRACE: a peer's time to exit on EOF
SLACK = 2.0


@contextlib.contextmanager
def keysdb_locked(repo: AnnexRepo) -> Iterator[None]:
    """Hold git-annex's keys database lock of ``repo`` (a GET waits for it)."""
    path = repo.path / ".git" / "annex" / "keysdb.lck"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def helper_count(bridge: Bridge) -> int:
    return sum("p2pstdio" in cmd for cmd in bridge.session_processes())


def test_peer_timeout_is_reported_once(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_file("f.bin", b"some content\n")
    key = proxy_repo.key("f.bin")
    bridge = make_load_bridge({"peer_timeout": PEER_TIMEOUT})
    bridge.start()
    token = bridge.add_token("t", "rw")
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        assert s.version(4) == "VERSION 4"
        with keysdb_locked(proxy_repo):
            s.send_line(f"GET 0 f.bin {key}")
            start = time.monotonic()
            peers_seen = 0
            reply = None
            deadline = start + 4 * (PEER_TIMEOUT + EXIT_GRACE) + SLACK
            while reply is None and time.monotonic() < deadline:
                peers_seen = max(peers_seen, helper_count(bridge))
                with contextlib.suppress(TimeoutError):
                    reply = s.read_line(timeout=0.2)
            took = time.monotonic() - start
        print(
            f"\nGET with a stuck peer (peer_timeout {PEER_TIMEOUT}s): {reply!r} after "
            f"{took:.1f}s; {peers_seen} peer process(es) seen at once"
        )
        assert reply is not None and reply.startswith("ERROR"), reply
        assert took <= PEER_TIMEOUT + EXIT_GRACE + SLACK, (
            f"the client heard of the stuck peer only after {took:.1f}s "
            f"(peer_timeout {PEER_TIMEOUT}s, exit grace {EXIT_GRACE}s): the request "
            f"was tried again on a new peer"
        )
        # The session goes on with a new peer.
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS", timeout=30)
    bridge.assert_alive()


def test_client_leaving_ends_a_waiting_session(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_file("f.bin", b"some content\n")
    key = proxy_repo.key("f.bin")
    peer_timeout = 60.0
    bridge = make_load_bridge({"peer_timeout": peer_timeout})
    bridge.start()
    token = bridge.add_token("t", "rw")
    with keysdb_locked(proxy_repo):
        with RawSession(token.socket) as s:
            s.auth(token.token, proxy_repo.uuid)
            assert s.version(4) == "VERSION 4"
            s.send_line(f"GET 0 f.bin {key}")
            time.sleep(0.5)
            assert helper_count(bridge) == 1
        # The client is gone. Its session and peer should follow.
        gone = time.monotonic()
        limit = EXIT_GRACE + SLACK + 3.0
        while time.monotonic() - gone < limit:
            sessions = bridge.sessions()
            if not sessions and helper_count(bridge) == 0:
                break
            time.sleep(0.2)
        took = time.monotonic() - gone
        sessions = bridge.sessions()
        helpers = helper_count(bridge)
    print(
        f"\nclient left during a stuck GET: session {'gone' if not sessions else 'alive'}, "
        f"{helpers} peer process(es) after {took:.1f}s (peer_timeout {peer_timeout:.0f}s)"
    )
    assert not sessions and helpers == 0, (
        f"{took:.1f}s after the client hung up, the daemon still has {len(sessions)} "
        f"session(s) and {helpers} git-annex-shell process(es) for it "
        f"(they would stay until peer_timeout, {peer_timeout:.0f}s): {sessions}"
    )
    bridge.assert_alive()
