"""NOTIFYCHANGE on the proxy's own endpoint: the remotedaemon's (and the assistant's) live sync.

A stock ``git annex remotedaemon`` connects, says NOTIFYCHANGE and waits;
another client pushes through the bridge; the daemon answers CHANGED with
the new commits and the remotedaemon fetches at once. One ref watch in the
daemon serves every waiting session; nobody waiting, nothing is watched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import RemoteDaemon
from tests.harness.process import wait_for as harness_wait_for
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex

WAIT = 90.0  # generous: the machine is shared; nothing here is a timing assertion
# The harness's poll, with this module's deadline.
wait_for = partial(harness_wait_for, timeout=WAIT)


def inotify_descriptors(pid: int) -> int:
    """How many inotify instances process ``pid`` holds (its ref watch)."""
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count


def daemon_pid(bridge: Bridge) -> int:
    assert bridge.proc is not None
    return bridge.proc.pid


def status(bridge: Bridge) -> dict[str, object]:
    return json.loads(bridge.cli("status", "--json").stdout)  # type: ignore[no-any-return]


def watching_sessions(bridge: Bridge) -> int:
    sessions = status(bridge)["sessions"]
    assert isinstance(sessions, list)
    return sum(1 for s in sessions if s["request"] == "NOTIFYCHANGE")


@pytest.fixture
def remotedaemon() -> Iterator[Callable[[AnnexRepo], RemoteDaemon]]:
    started: list[RemoteDaemon] = []

    def start(repo: AnnexRepo) -> RemoteDaemon:
        started.append(RemoteDaemon(repo))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


def ref(repo: AnnexRepo, name: str) -> str | None:
    result = repo.git("rev-parse", "--verify", "--quiet", name, check=False)
    return result.stdout.strip() if result.ok else None


def test_remotedaemon_fetches_a_push_at_once(
    bridge: Bridge,
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    remotedaemon: Callable[[AnnexRepo], RemoteDaemon],
) -> None:
    a, b = make_client("alice"), make_client("bob")
    a.link(bridge.add_token("alice", "rw").line, "hub")
    b.link(bridge.add_token("bob", "rw").line, "hub")
    watcher = remotedaemon(a)
    url = watcher.expect("CONNECTED ")
    assert "p2p-annex::" in url
    wait_for("the remotedaemon's NOTIFYCHANGE", lambda: watching_sessions(bridge) == 1)
    assert inotify_descriptors(daemon_pid(bridge)) == 1

    # B pushes a new branch through the bridge; A's remotedaemon fetches it.
    commit = b.commit_git_file("notes.txt", b"from bob\n", "bob's note")
    b.git("push", "hub", "HEAD:refs/heads/from-bob")
    watcher.expect("SYNCING ")
    assert watcher.expect("DONESYNCING ").endswith(" 1"), watcher.seen
    wait_for("alice's hub/from-bob", lambda: ref(a, "refs/remotes/hub/from-bob") == commit)

    # A local commit on the proxy is seen the same way, on the same connection.
    local = proxy_repo.commit_git_file("proxy.txt", b"made on the proxy\n", "on the proxy")
    branch = proxy_repo.git("symbolic-ref", "--short", "HEAD").stdout.strip()
    watcher.expect("DONESYNCING ")
    wait_for(f"alice's hub/{branch}", lambda: ref(a, f"refs/remotes/hub/{branch}") == local)
    assert watcher.seen.count(watcher.seen[0]) == 1, "the remotedaemon reconnected"

    # The remotedaemon stops: its session ends, and with it the ref watch.
    watcher.stop()
    wait_for("the session's end", lambda: watching_sessions(bridge) == 0)
    wait_for("the watch's end", lambda: inotify_descriptors(daemon_pid(bridge)) == 0)
    log = bridge.log()
    assert "client left: hung up while waiting for changes" in log, log
    assert "NOTIFYCHANGE is not served" not in log


def test_a_push_with_nobody_watching_costs_nothing(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    commit = rw_client.commit_git_file("a.txt", b"a\n", "a")
    rw_client.git("push", "hub", "HEAD:refs/heads/nobody-watches")
    assert ref(proxy_repo, "refs/heads/nobody-watches") == commit
    assert inotify_descriptors(daemon_pid(bridge)) == 0
    ref_watch = status(bridge)["ref_watch"]
    assert ref_watch == {"sessions": 0, "mechanism": None, "starts": 0, "snapshots": 0}
    assert "ref watch started" not in bridge.log()


def test_many_watchers_share_one_watch(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    bridge = make_bridge()
    bridge.set_limits(max_sessions_per_token=64, max_sessions=128)
    bridge.start()
    token = bridge.add_token("many", "ro")
    sessions = [RawSession(token.socket) for _ in range(50)]
    try:
        for s in sessions:
            s.auth(token.token, proxy_repo.uuid)
            s.send_line("NOTIFYCHANGE")
        wait_for("50 watching sessions", lambda: watching_sessions(bridge) == 50)
        assert inotify_descriptors(daemon_pid(bridge)) == 1
        assert not bridge.session_processes(), "a watching session needs no git-annex-shell"
        before = status(bridge)["ref_watch"]
        assert isinstance(before, dict)
        assert before["sessions"] == 50 and before["starts"] == 1

        commit = proxy_repo.commit_git_file("x.txt", b"x\n", "one change for all")
        for s in sessions:
            s.expect(f"CHANGED {commit}", timeout=WAIT)
        after = status(bridge)["ref_watch"]
        assert isinstance(after, dict)
        # One snapshot for the change (maybe two, if the commit's writes
        # straddled the settle time), not one per session.
        assert after["starts"] == 1
        assert 1 <= after["snapshots"] - before["snapshots"] <= 3, (before, after)
        # The sessions go on: a second NOTIFYCHANGE waits again.
        for s in sessions[:5]:
            s.send_line("NOTIFYCHANGE")
        commit2 = proxy_repo.commit_git_file("y.txt", b"y\n", "another")
        for s in sessions[:5]:
            s.expect(f"CHANGED {commit2}", timeout=WAIT)
    finally:
        for s in sessions:
            s.close()
    wait_for("the sessions' end", lambda: not status(bridge)["sessions"])
    wait_for("the watch's end", lambda: inotify_descriptors(daemon_pid(bridge)) == 0)


def test_a_watcher_that_leaves_frees_its_session(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    bridge = make_bridge()
    bridge.set_limits(max_sessions_per_token=1)
    bridge.start()
    token = bridge.add_token("one", "rw")
    with RawSession(token.socket) as other:
        with RawSession(token.socket) as s:
            s.auth(token.token, proxy_repo.uuid)
            s.send_line("NOTIFYCHANGE")
            wait_for("the watching session", lambda: watching_sessions(bridge) == 1)
            # The token's one slot is taken: the next AUTH waits for it.
            other.send_line(f"AUTH {other.client_uuid} {token.token}")
            wait_for("the waiting AUTH", lambda: "waiting for a slot" in bridge.log())
        # The watcher hung up: its slot goes to the waiting connection,
        # although no ref changed.
        assert other.read_line() == f"AUTH-SUCCESS {proxy_repo.uuid}"
    wait_for("the session's end", lambda: not status(bridge)["sessions"])
    wait_for("the watch's end", lambda: inotify_descriptors(daemon_pid(bridge)) == 0)
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_line(f"CHECKPRESENT {'SHA256E-s1--' + '0' * 64}")
        s.expect("FAILURE")
