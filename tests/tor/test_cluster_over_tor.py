"""A cluster endpoint over the private Tor network, driven by the stock client.

The bridge's cluster endpoint has three tor-annex nodes, each a torbridge
on an onion of its own (tests/harness/clusterworld.py). One stock client's
``-J64`` copy, get, drop --from and sync --content through one token
reach every file on every node; with one node's
onion gone, a copy succeeds on the live nodes and the next copy does not
wait for the dead node again; once the node republishes, copies reach it
again. One world for the module; the last test takes it down.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.annex import object_contents, object_keys, whereis_uuids
from tests.harness.client import JOBS, JobSteps, parallel_files, peak_sessions
from tests.harness.clusterworld import (
    ENDPOINT,
    NODE_NAMES,
    ClusterTorWorld,
    success_plus,
    time_copies_with_a_dead_node,
)
from tests.harness.process import wait_for
from tests.harness.tor import (
    TOR_COMMAND_TIMEOUT,
    PrivateNetns,
    _alive,
    netns_unavailable,
    require_tor,
    tor_pids,
)
from torbridge.testnet import TestNet

pytestmark = [
    pytest.mark.tor,
    pytest.mark.annex,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8
]

log = logging.getLogger("tests.tor")
T = TOR_COMMAND_TIMEOUT
DEAD = "n3"
LIVE = {"n1", "n2"}


@pytest.fixture(scope="module")
def world(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTorWorld]:
    require_tor()
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace: {reason}")
    w = ClusterTorWorld(testnet, tmp_path_factory.mktemp("clusterworld"), progress=log.info)
    try:
        yield w
    finally:
        w.close(check=False)


@pytest.fixture(autouse=True)
def _loopback_only(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no socket of the daemons (or their children) off loopback."""
    yield
    if "world" in request.fixturenames:
        w: ClusterTorWorld = request.getfixturevalue("world")
        if not w._closed:
            w.assert_loopback_only()


def node_states(world: ClusterTorWorld) -> dict[str, Any]:
    assert world.bridge is not None
    clusters = json.loads(world.bridge.cli("status", "--json").stdout)["clusters"]
    return clusters[next(iter(clusters))]  # type: ignore[no-any-return]


def logged_nodes(world: ClusterTorWorld, key: str) -> set[str]:
    """The nodes the proxy's location log lists for ``key`` (git annex whereis)."""
    uuids = whereis_uuids(world.proxy, key)
    return {n.name for n in world.nodes.values() if n.uuid in uuids}


def test_j64_through_the_cluster_endpoint(world: ClusterTorWorld) -> None:
    """One client, one token, ``copy --to``, ``get --from``, ``drop --from``
    and ``sync --content``, each ``-J64``, through the bridge's onion to the
    cluster endpoint: every file reaches every node (each session fans out
    to three onions through Tor), every file comes back, ``drop --from``
    removes it from every node, and ``sync --content`` puts it on every
    node again."""
    client = world.client("jay")  # it pulled the proxy's history first
    files = parallel_files(client)
    keys = {name: client.key(name) for name in files}
    took = JobSteps(client, "the cluster over the onion")

    def on_every_node() -> None:
        for node in world.nodes.values():
            held = object_contents(node.repo)
            for name, content in files.items():
                assert held.get(keys[name]) == content, (name, node.name)

    took.run("copy --to", "copy", "--to", ENDPOINT, ".")
    on_every_node()
    # A cluster refuses LOCKCONTENT (as git-annex's gateway): the local drop is forced.
    took.run("drop --force", "drop", "--force", ".")
    assert client.present_here() == set()
    took.run("get --from", "get", "--from", ENDPOINT, ".")
    for name, content in files.items():
        assert client.read(name) == content, name

    took.run("drop --from", "drop", "--from", ENDPOINT, ".")
    for node in world.nodes.values():
        assert not set(keys.values()) & object_keys(node.repo), node.name
    assert client.annex("find", "--in", ENDPOINT, timeout=T).stdout == ""
    took.run("sync --content", "sync", "--content", ENDPOINT)
    on_every_node()
    assert set(client.annex("find", "--in", ENDPOINT, timeout=T).stdout.split()) == set(files)
    print(f"\n-J{JOBS} over Tor to the cluster: {took}")

    assert world.bridge is not None
    text = world.bridge.log()
    assert "authentication failed" not in text
    assert "unreachable" not in text, text[-5000:]
    assert peak_sessions(text) > 16, peak_sessions(text)


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_a_dead_node_holds_no_copy_up_and_is_used_again(world: ClusterTorWorld, how: str) -> None:
    """n3 dies while the client tor knows its descriptor: "stopped", its
    daemon stops and its onion service is removed from tor; "frozen", its
    host's tor is SIGSTOPped, the onion still published and nobody
    answering. Each time: the copy succeeds on n1 and n2, SUCCESS-PLUS
    names exactly them, and so does the proxy's location log (git annex
    whereis); the next copy does not try n3 again (it is marked down).
    Then n3 comes back (its daemon republishes / its host resumes): after
    a probe finds it answering, a copy reaches it again."""
    assert world.bridge is not None
    tried_before = world.bridge.log().count(f"node {DEAD} unreachable")
    client = world.client(f"dana-{how}")
    times = time_copies_with_a_dead_node(world, client, DEAD, how)
    live_uuids = {world.nodes[n].uuid for n in LIVE}
    for copy, key in zip(times.copies, times.keys, strict=True):
        assert world.holding(key) == LIVE, copy.describe()[-3000:]
        for name in LIVE:  # the bytes the client added, on each live node
            assert world.nodes[name].repo.key_content(key) == client.key_content(key)
        assert success_plus(copy) == live_uuids, copy.describe()[-3000:]

        def listed_on_live_nodes(key: str = key) -> bool:
            return logged_nodes(world, key) == LIVE

        wait_for(
            f"the proxy's location log to list exactly {LIVE}",
            listed_on_live_nodes,
            60,
            interval=0.5,
        )
    text = world.bridge.log()
    # The first session found n3 unreachable; the next one did not try it again.
    assert text.count(f"node {DEAD} unreachable") == tried_before + 1, text[-5000:]
    state = node_states(world)
    assert state[DEAD]["up"] is False and all(state[n]["up"] for n in LIVE), state
    assert world.bridge.cli("status").stdout.count(f"node {DEAD}: DOWN") == 1
    print(
        f"\ncopy over Tor: all nodes up {times.all_up:.1f}s; with {DEAD} {how}:"
        f" first {times.first:.1f}s, next {times.next:.1f}s"
    )

    # n3 comes back.
    if how == "stopped":
        world.start_node(DEAD)
    else:
        world.thaw_host(DEAD)
    n = 0
    last: dict[str, str] = {}

    def reached() -> bool:
        nonlocal n
        n += 1
        name = f"back-{how}-{n}.bin"
        client.add_file(name, f"back {how} {n} {time.time()}\n".encode() * 100)
        client.annex("copy", "--to", ENDPOINT, "--", name, timeout=T)
        last["key"] = client.key(name)
        return world.holding(last["key"]) == set(NODE_NAMES)

    # The backoff after a failed probe doubles (5 s, 10 s, ...): generous.
    wait_for(f"a copy to reach {DEAD} again", reached, 400, interval=3.0)
    key = last["key"]
    assert world.nodes[DEAD].repo.key_content(key) == client.key_content(key)
    assert node_states(world)[DEAD]["up"] is True
    assert f"node {DEAD} answers again" in world.bridge.log()


def test_teardown_leaves_nothing(world: ClusterTorWorld) -> None:
    """Closing the world stops every daemon cleanly (exit 0), the namespace,
    the forwarder and our four tors."""
    assert world.netns is not None and world.netns.forwarder is not None
    daemons = world.daemons()
    pids = [*world.our_pids(), world.netns.forwarder.pid]
    tors = [t.pid for t in world.tors.values()]
    netns = world.netns.name
    world.close()  # raises unless every daemon exits 0 and removes its sockets
    assert all(d.returncode == 0 for d in daemons)
    assert not PrivateNetns.exists(netns)
    alive = [pid for pid in pids + tors if _alive(pid)]  # (a zombie is not)
    assert not alive, f"still running: {alive}"
    assert not set(tors) & set(tor_pids())
    listening = subprocess.run(["ss", "-tlnH"], capture_output=True, text=True, check=True)
    for tor in world.tors.values():
        assert f"127.0.0.1:{tor.control_port} " not in listening.stdout
