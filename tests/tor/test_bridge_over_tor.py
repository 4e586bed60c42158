"""The stock git-annex client through real Tor to torbridge, and on to a node.

    git-annex (own network namespace) -> 127.0.0.1:9050 -> client tor
      -> bridge's onion -> torbridge -> own repository            (port 5000)
                                     -> SOCKS -> client tor
                                        -> node's onion -> torbridge (node)  (port 5001)

All on a private Tor network on 127.0.0.1 (tests/tor/conftest.py); the
client side runs in a network namespace that has nothing but ``lo``. See
tests/harness/tor.py for the pieces. One TorWorld serves the module; the
last test takes it down and checks that nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client, object_contents, object_keys
from tests.harness.client import (
    FILES,
    JOBS,
    SIZE,
    JobSteps,
    RemoteDaemon,
    peak_sessions,
)
from tests.harness.tor import (
    TOR_COMMAND_TIMEOUT,
    PrivateNetns,
    TorBridge,
    hs_event_count,
    netns_unavailable,
    require_tor,
    tor_pids,
    wait_for_upload,
)
from tests.harness.worlds import HUB_PORT, NODE_VIA_BRIDGE_PORT, TorWorld
from torbridge.testnet import LOOPBACK, TestNet

pytestmark = [
    pytest.mark.tor,
    pytest.mark.annex,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8
]

log = logging.getLogger("tests.tor")
T = TOR_COMMAND_TIMEOUT


@pytest.fixture(scope="module")
def world(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorWorld]:
    require_tor()
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace: {reason}")
    w = TorWorld(testnet, tmp_path_factory.mktemp("torworld"), progress=log.info)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(autouse=True)
def _loopback_only(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no socket of the daemons (or their children) off loopback."""
    yield
    if "world" in request.fixturenames:
        w: TorWorld = request.getfixturevalue("world")
        if not w._closed:
            w.assert_loopback_only()


def wait_for_log(bridge: TorBridge, done: Callable[[str], bool], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not done(text := bridge.log()):
        assert time.monotonic() < deadline, f"not in the daemon log in time:\n{text[-3000:]}"
        time.sleep(0.1)
    return text


def payload(name: str, size: int = 48 * 1024) -> bytes:
    return name.encode() + b"\n" + os.urandom(size)


def linked_client(world: TorWorld, name: str, port: int, remote: str) -> Client:
    """A fresh client linked to the bridge's endpoint ``port`` with its own rw token."""
    assert world.bridge is not None
    client = world.client(name)
    client.link(world.bridge.tor_lines(name)[port].line, remote, timeout=T)
    return client


def copy_get_drop(client: Client, remote: str, holder: AnnexRepo) -> tuple[str, str]:
    """copy --to, get back after a local drop, drop --from one file; ``holder``
    is the repository the remote stores in. Returns (kept key, dropped key)."""
    files = {"kept.bin": payload("kept"), "dropped.txt": payload("dropped", 1000)}
    client.add_files(files, "two files")
    kept, dropped = client.key("kept.bin"), client.key("dropped.txt")

    client.annex("copy", "--to", remote, "--", *files, timeout=T)
    assert holder.key_content(kept) == files["kept.bin"]
    assert holder.key_content(dropped) == files["dropped.txt"]

    client.annex("drop", "--", "kept.bin", timeout=T)  # needs the remote's LOCKCONTENT
    assert "kept.bin" not in client.present_here()
    client.annex("get", "--from", remote, "--", "kept.bin", timeout=T)
    assert client.read("kept.bin") == files["kept.bin"]

    client.annex("drop", "--from", remote, "--", "dropped.txt", timeout=T)
    assert not holder.has_key(dropped)
    assert holder.has_key(kept)
    whereis = client.annex("whereis", "--", "dropped.txt", timeout=T).stdout
    assert remote not in whereis, whereis
    return kept, dropped


def test_own_repository_through_the_bridge_onion(world: TorWorld) -> None:
    """1. p2p --link with the line `token add` printed, copy/get/drop, push, pull."""
    assert world.bridge is not None
    lines = world.bridge.tor_lines("alice")
    assert sorted(lines) == [HUB_PORT, NODE_VIA_BRIDGE_PORT]
    assert {line.onion for line in lines.values()} == {world.bridge.onion}
    client = world.client("alice")
    client.link(lines[HUB_PORT].line, "hub", timeout=T)
    assert client.remote_uuid("hub") == world.proxy.uuid
    url = client.git("config", "remote.hub.url").stdout.strip()
    assert url == f"tor-annex::{world.bridge.onion}:{HUB_PORT}"

    kept, dropped = copy_get_drop(client, "hub", world.proxy)
    assert world.proxy.has_key(kept) and not world.proxy.has_key(dropped)

    # git push: the commit (and the git-annex branch) reach the proxy.
    client.git("push", "hub", "main:synced/main", timeout=T)
    client.git("push", "hub", "git-annex:synced/git-annex", timeout=T)
    log_text = world.proxy.git("log", "--format=%s", "synced/main").stdout
    assert "two files" in log_text
    assert (
        world.proxy.git("rev-parse", "synced/main").stdout == client.git("rev-parse", "main").stdout
    )

    # git pull: a commit made in the proxy reaches the client.
    sha = world.proxy.commit_git_file("from-proxy.txt", b"made on the proxy\n", "proxy commit")
    client.git("pull", "--no-edit", "--allow-unrelated-histories", "hub", "main", timeout=T)
    assert client.read("from-proxy.txt") == b"made on the proxy\n"
    assert client.git("merge-base", "--is-ancestor", sha, "HEAD", check=False).ok
    world.proxy.fsck_content()


def test_node_endpoint_relays_through_tor(world: TorWorld) -> None:
    """2. The bridge's node endpoint: torbridge dials the node's onion through Tor."""
    client = linked_client(world, "bob", NODE_VIA_BRIDGE_PORT, "nodevia")
    assert client.remote_uuid("nodevia") == world.node_repo.uuid
    before = object_keys(world.node_repo)

    kept, dropped = copy_get_drop(client, "nodevia", world.node_repo)

    # The node holds exactly what it should; the proxy stored nothing of it.
    assert object_keys(world.node_repo) == before | {kept}
    for key in (kept, dropped):
        assert not world.proxy.has_key(key)
    found = world.node_repo.annex("contentlocation", kept).stdout.strip()
    assert found, "git-annex in the node does not find the content"
    assert world.node_repo.annex("contentlocation", dropped, check=False).returncode != 0
    world.node_repo.fsck_content()
    assert world.bridge is not None
    assert "node1" in world.bridge.log()


@pytest.mark.parametrize(("port", "remote"), [(HUB_PORT, "hub"), (NODE_VIA_BRIDGE_PORT, "nodevia")])
def test_j64_through_one_circuit(world: TorWorld, port: int, remote: str) -> None:
    """One client's ``copy --to``, ``get --from``, ``drop --from`` and
    ``sync --content``, each ``-J64``, through the onion with one token:
    every stream rides the client's one rendezvous circuit, and with the
    default caps no stream closes it and no connection is refused (before:
    MaxStreams 32 killed the circuit at the 33rd job, max_sessions_per_token
    16 answered the 17th with AUTH-FAILURE). To the proxy's own endpoint,
    and to the node endpoint, whose sessions the bridge relays over Tor
    again to the node's own onion."""
    holder = world.proxy if port == HUB_PORT else world.node_repo
    client = linked_client(world, f"dave-{remote}", port, remote)
    # In a directory of this test's own: sync merges the proxy's tree,
    # which has the files of the module's other clients.
    files = {f"{remote}/p{i:03d}.bin": os.urandom(SIZE) for i in range(FILES)}
    client.add_files(files, "parallel files")
    keys = {name: client.key(name) for name in files}
    took = JobSteps(client, "over the onion")

    took.run("copy --to", "copy", "--to", remote, ".")
    held = object_contents(holder)
    for name, content in files.items():
        assert held.get(keys[name]) == content, name
    took.run("drop", "drop", ".")  # each one LOCKCONTENTs the far copy
    assert client.present_here() == set()
    took.run("get --from", "get", "--from", remote, ".")
    for name, content in files.items():
        assert client.read(name) == content, name

    # The far side's copies dropped (in the holder itself), then put back by sync.
    took.run("drop --from", "drop", "--from", remote, ".")
    assert not set(keys.values()) & object_keys(holder)
    assert client.annex("find", "--in", remote, "--", remote, timeout=T).stdout == ""
    # Each client of the module began a history of its own, and the node
    # endpoint's git is the proxy's repository (as with git-annex's own
    # proxies): sync merges histories it has not seen, as a user would be
    # asked to.
    took.run("sync --content", "sync", "--content", "--allow-unrelated-histories", remote)
    held = object_contents(holder)
    for name, content in files.items():
        assert held.get(keys[name]) == content, name
    found = client.annex("find", "--in", remote, "--", remote, timeout=T).stdout.split()
    assert set(found) == set(files)
    print(f"\n-J{JOBS} over Tor to {remote}: {took}")

    assert world.bridge is not None
    log_text = world.bridge.log()
    assert "authentication failed" not in log_text
    assert peak_sessions(log_text) > 16, peak_sessions(log_text)


def test_onion_address_survives_a_bridge_restart(world: TorWorld) -> None:
    """3. Same onion after a restart; a client linked before still works after."""
    bridge = world.bridge
    assert bridge is not None
    before = bridge.tor_lines("carol-before")[HUB_PORT]
    client = world.client("carol")
    client.link(before.line, "hub", timeout=T)
    client.add_files({"before.bin": payload("before")}, "before")
    client.annex("copy", "--to", "hub", "--", "before.bin", timeout=T)

    hs = world.tors["bridge"]
    since = hs_event_count(hs)
    bridge.stop()
    bridge.start()
    assert bridge.onion == before.onion
    wait_for_upload(world.net, hs, bridge.onion, since)  # a new upload, not the old ones
    after = bridge.tor_lines("carol-after")[HUB_PORT]
    assert after.onion == before.onion and after.port == HUB_PORT

    content = payload("after")
    client.add_files({"after.bin": content}, "after")
    client.annex("copy", "--to", "hub", "--", "after.bin", timeout=T)
    assert world.proxy.key_content(client.key("after.bin")) == content
    client.annex("drop", "--", "after.bin", timeout=T)
    client.annex("get", "--from", "hub", "--", "after.bin", timeout=T)
    assert client.read("after.bin") == content


def test_service_comes_back_after_the_hs_tor_restarts(world: TorWorld) -> None:
    """4. The bridge's service tor is stopped and started again (same datadir,
    control port); the daemon republishes; a client copy works again."""
    bridge = world.bridge
    assert bridge is not None
    client = linked_client(world, "dave", HUB_PORT, "hub")
    client.add_files({"one.bin": payload("one")}, "one")
    client.annex("copy", "--to", "hub", "--", "one.bin", timeout=T)
    published = bridge.log().count(" published (ports")

    hs = world.restart_hs_tor("bridge")
    wait_for_upload(world.net, hs, bridge.onion, 0, timeout=180)
    bridge.assert_alive()
    # The daemon logs its publication just after tor reports the upload.
    text = wait_for_log(bridge, lambda t: t.count(" published (ports") > published)
    assert "lost tor's control connection" in text
    assert text.count(" published (ports") == published + 1, text[-3000:]

    content = payload("two")
    client.add_files({"two.bin": content}, "two")
    client.annex("copy", "--to", "hub", "--", "two.bin", timeout=T)
    assert world.proxy.key_content(client.key("two.bin")) == content
    # The node endpoint works too (the bridge's relay uses the client tor).
    via = linked_client(world, "dave-node", NODE_VIA_BRIDGE_PORT, "nodevia")
    via.add_files({"three.bin": payload("three")}, "three")
    via.annex("copy", "--to", "nodevia", "--", "three.bin", timeout=T)
    assert world.node_repo.has_key(via.key("three.bin"))


def test_remotedaemon_over_tor_fetches_a_push(world: TorWorld) -> None:
    """Live sync through the onion: a stock remotedaemon (tor-annex:: remote)
    is told of another client's push and fetches it."""
    assert world.bridge is not None and world.netns is not None
    alice = linked_client(world, "erin", HUB_PORT, "hub")
    bob = linked_client(world, "frank", HUB_PORT, "hub")
    watcher = RemoteDaemon(alice, prefix=world.netns.argv([]))
    try:
        assert "tor-annex::" in watcher.expect("CONNECTED ", timeout=T)
        # Its NOTIFYCHANGE has reached the bridge once the watch runs.
        wait_for_log(world.bridge, lambda text: "ref watch started" in text, timeout=T)
        commit = bob.commit_git_file("over-tor.txt", b"pushed over tor\n", "over tor")
        bob.git("push", "hub", "HEAD:refs/heads/over-tor", timeout=T)
        assert watcher.expect("DONESYNCING ", timeout=T).endswith(" 1"), watcher.seen
        got = alice.git(
            "rev-parse", "--verify", "--quiet", "refs/remotes/hub/over-tor", check=False
        ).stdout.strip()
        assert got == commit, watcher.seen
    finally:
        watcher.stop()
    wait_for_log(world.bridge, lambda text: "ref watch stopped" in text, timeout=T)


def test_teardown_leaves_nothing(world: TorWorld) -> None:
    """5. Closing the world stops both daemons cleanly (exit 0), the forwarder,
    the namespace and our tors; nothing of ours listens any more. (The
    testnet's own tors are checked at the end of the session: conftest.)"""
    assert world.bridge is not None and world.node is not None and world.netns is not None
    daemons = [world.bridge, world.node]
    pids = world.our_pids()
    assert world.netns.forwarder is not None
    pids.append(world.netns.forwarder.pid)
    tors = [t.pid for t in world.tors.values()]
    sockets = [b.socket_path(e.name) for b in daemons for e in b.exposes]
    netns = world.netns.name
    assert all(s.exists() for s in sockets)

    world.close()  # raises unless both daemons exit 0 and remove their sockets

    assert all(b.returncode == 0 for b in daemons)
    assert not PrivateNetns.exists(netns)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert netns not in listed.stdout
    alive = [pid for pid in pids + tors if Path(f"/proc/{pid}").exists()]
    assert not alive, f"still running: {alive}"
    assert not set(tors) & set(tor_pids())
    assert not any(s.exists() for s in sockets)
    assert not world.socks_unix.exists()
    # Nothing listens on the control ports of our service tors any more.
    listening = subprocess.run(["ss", "-tlnH"], capture_output=True, text=True, check=True)
    for tor in world.tors.values():
        assert f"{LOOPBACK}:{tor.control_port} " not in listening.stdout
