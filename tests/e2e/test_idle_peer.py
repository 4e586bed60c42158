"""A quiet session holds no git-annex-shell, and its client never notices.

With ``[limits] peer_idle = 1`` the daemon stops a session's
``git-annex-shell p2pstdio`` once the client has said nothing for a second
(unless a LOCKCONTENT lock is held), and starts a new one at the next
request. Driven with the stock client's pooled connection (``--batch``: one
git-annex process, one connection, pauses between files; git-annex keeps a
pooled P2P connection for the life of the process, Remote/P2P.hs) and with
the messages it sends, spoken by hand. Every wait has a generous deadline;
nothing here asserts a duration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Address, Bridge
from tests.harness.client import Batch
from tests.harness.process import wait_for as harness_wait_for
from tests.harness.session import RawSession, SessionClosed

pytestmark = pytest.mark.annex

WAIT = 90.0  # generous: the machine is shared


# The harness's poll, with this module's deadline.
wait_for = partial(harness_wait_for, timeout=WAIT)


def shells(bridge: Bridge) -> list[str]:
    return [c for c in bridge.session_processes() if "p2pstdio" in c]


def status(bridge: Bridge) -> dict[str, object]:
    return json.loads(bridge.cli("status", "--json").stdout)  # type: ignore[no-any-return]


def session_ids(bridge: Bridge) -> list[int]:
    sessions = status(bridge)["sessions"]
    assert isinstance(sessions, list)
    return [s["id"] for s in sessions]


def stopped_idle(bridge: Bridge) -> int:
    totals = status(bridge)["totals"]
    assert isinstance(totals, dict)
    return int(totals.get("peers_stopped_idle_total", 0))


@pytest.fixture
def quick_bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    b = make_bridge(limits={"peer_idle": 1})
    b.start()
    return b


@pytest.fixture
def batches() -> Iterator[Callable[..., Batch]]:
    started: list[Batch] = []

    def start(repo: AnnexRepo, *args: str) -> Batch:
        started.append(Batch(repo, *args))
        return started[-1]

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait()


def test_pooled_connection_goes_on_after_its_shell_was_stopped(
    quick_bridge: Bridge,
    client: Client,
    proxy_repo: AnnexRepo,
    batches: Callable[..., Batch],
) -> None:
    bridge = quick_bridge
    client.link(bridge.add_token("client", "rw").line, "hub")
    files = {f"f{i}.bin": os.urandom(50_000 + i) for i in range(3)}
    client.add_files(files)

    # copy: one git-annex process, one pooled connection, quiet in between.
    copy = batches(client, "copy", "--to", "hub")
    copy.do("f0.bin")
    wait_for("one session", lambda: len(session_ids(bridge)) == 1)
    [sid] = session_ids(bridge)
    wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
    assert session_ids(bridge) == [sid], "the client's connection was closed"
    copy.do("f1.bin")
    copy.do("f2.bin")
    copy.close()

    # get, on another pooled connection, with the same gap.
    client.annex("drop", "--force", *files)
    get = batches(client, "get", "--from", "hub")
    get.do("f0.bin")
    wait_for("one session", lambda: len(session_ids(bridge)) == 1)
    [sid] = session_ids(bridge)
    wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
    get.do("f1.bin")
    wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
    get.do("f2.bin")
    assert session_ids(bridge) == [sid]
    get.close()
    for name, content in files.items():
        assert client.read(name) == content
        assert proxy_repo.key_content(client.key(name)) == content

    # drop relies on the hub's lock (numcopies 1): taken on a reopened shell.
    drop = batches(client, "drop")
    drop.do("f0.bin")
    wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
    drop.do("f1.bin")
    drop.close()
    assert not client.has_key(client.key("f0.bin")) and not client.has_key(client.key("f1.bin"))
    assert stopped_idle(bridge) >= 4
    client.fsck("--from", "hub")
    proxy_repo.fsck_content()
    assert "protocol version changed" not in bridge.log()


def raw_session(token: Address, proxy: AnnexRepo) -> RawSession:
    s = RawSession(token.socket)
    s.auth(token.token, proxy.uuid)
    assert s.version(4) == "VERSION 4"
    return s


def test_copy_idle_get_on_one_connection(
    quick_bridge: Bridge, proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """The stock client's messages for ``copy`` then ``get``, a quiet gap between."""
    bridge = quick_bridge
    token = bridge.add_token("raw", "rw")
    data = os.urandom(123_456)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "new.bin").write_bytes(data)
    key = proxy_repo.annex("calckey", str(scratch / "new.bin")).stdout.strip()
    with raw_session(token, proxy_repo) as s:
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("FAILURE")
        s.send_line(f"PUT new.bin {key}")
        s.expect("PUT-FROM 0")
        s.send_data(data)
        s.send_line("VALID")
        s.expect("SUCCESS")
        assert len(shells(bridge)) == 1
        wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
        s.send_line(f"GET 0 new.bin {key}")
        assert s.read_data() == data
        s.expect("VALID")
        s.send_line("SUCCESS")
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")
        assert len(shells(bridge)) == 1
    assert proxy_repo.key_content(key) == data
    assert stopped_idle(bridge) == 1


def test_version_and_notifychange_start_no_shell(
    quick_bridge: Bridge, proxy_repo: AnnexRepo
) -> None:
    bridge = quick_bridge
    token = bridge.add_token("watch", "ro")
    with raw_session(token, proxy_repo):  # git-annex-shell's maximum is learnt here
        assert len(shells(bridge)) == 1
        wait_for("the quiet session's shell to stop", lambda: not shells(bridge))
    sessions = [raw_session(token, proxy_repo) for _ in range(5)]
    try:
        for s in sessions:
            s.send_line("NOTIFYCHANGE")
        wait_for("5 sessions", lambda: len(session_ids(bridge)) == 5)
        assert not shells(bridge), "an idle or watching session started a git-annex-shell"
        commit = proxy_repo.commit_git_file("x.txt", b"x\n", "a change")
        for s in sessions:
            s.expect(f"CHANGED {commit}", timeout=WAIT)
        assert not shells(bridge)
    finally:
        for s in sessions:
            s.close()


def test_lock_survives_the_idle_period(quick_bridge: Bridge, proxy_repo: AnnexRepo) -> None:
    """A LOCKCONTENT held far past peer_idle keeps its shell, and the content."""
    bridge = quick_bridge
    token = bridge.add_token("lock", "rw")
    content = os.urandom(100_000)
    proxy_repo.add_files({"locked.bin": content})
    key = proxy_repo.key("locked.bin")
    with raw_session(token, proxy_repo) as locker:
        locker.send_line(f"LOCKCONTENT {key}")
        locker.expect("SUCCESS")
        [locking_shell] = shells(bridge)
        # Another session does a CHECKPRESENT, and its shell is stopped as idle:
        # peer_idle has passed for the locker too, which keeps its shell.
        with raw_session(token, proxy_repo) as other:
            other.send_line(f"CHECKPRESENT {key}")
            other.expect("SUCCESS")
            wait_for("the other session's shell to stop", lambda: stopped_idle(bridge) == 1)
            assert shells(bridge) == [locking_shell]
            # A REMOVE, on a new shell, cannot take the content from under the lock.
            other.send_line(f"REMOVE {key}")
            try:
                reply = other.read_line(timeout=WAIT)
            except SessionClosed:
                reply = "(closed)"
            assert reply != "SUCCESS", "REMOVE succeeded while the content was locked"
        assert proxy_repo.key_content(key) == content
        assert locking_shell in shells(bridge)
        locker.send_line("UNLOCKCONTENT")
        wait_for("the unlocked session's shell to stop", lambda: not shells(bridge))
        # The lock is gone with it: now a REMOVE works, on the same connection.
        locker.send_line(f"REMOVE {key}")
        locker.expect("SUCCESS")
    assert not proxy_repo.has_key(key)


def test_watching_session_stops_its_shell_and_goes_on(
    quick_bridge: Bridge, proxy_repo: AnnexRepo
) -> None:
    """An assistant-like session: a request, then NOTIFYCHANGE on the same connection."""
    bridge = quick_bridge
    token = bridge.add_token("assistant", "rw")
    proxy_repo.add_files({"a.bin": b"a" * 1000})
    key = proxy_repo.key("a.bin")
    with raw_session(token, proxy_repo) as s:
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")
        s.send_line("NOTIFYCHANGE")
        wait_for("the watching session's shell to stop", lambda: not shells(bridge))
        assert stopped_idle(bridge) == 1
        commit = proxy_repo.commit_git_file("n.txt", b"n\n", "a change")
        s.expect(f"CHANGED {commit}", timeout=WAIT)
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")
        assert len(shells(bridge)) == 1
