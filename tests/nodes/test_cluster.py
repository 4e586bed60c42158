"""A stock client and a 3-node cluster behind the bridge (p2p, tor and local nodes).

The proxy is the cluster's gateway, configured with git-annex's own
commands (tests/harness/clusters.py). The client links the cluster endpoint
and uses it as one remote; the nodes' contents are checked in the nodes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import tbnode
from tests.harness.annex import AnnexEnv, AnnexRepo, Client, whereis_uuids
from tests.harness.bridge import Bridge, Expose
from tests.harness.client import put_offsets
from tests.harness.clusters import CLUSTER, ENDPOINT, ClusterSetup, init_cluster, setup_cluster
from tests.harness.nodes import BRIDGE_LIMITS, Node, NodeNet, make_node
from tests.harness.process import wait_for
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex

ALL = {"c1-p2p", "c2-tor", "c3-local"}


@pytest.fixture
def cluster(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> Callable[..., ClusterSetup]:
    def make(**kwargs: object) -> ClusterSetup:
        return setup_cluster(
            make_nodes,
            make_node_bridge,
            make_client,
            proxy_repo,
            node_net,
            **kwargs,  # type: ignore[arg-type]
        )

    return make


def wait_logged(s: ClusterSetup, key: str, names: set[str]) -> None:
    wait_for(
        f"the proxy's log to list {names} for {key}",
        lambda: s.logged(key) == names,
        30,
        interval=0.25,
    )


def test_copy_get_drop_through_the_cluster(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    files = {"a.bin": os.urandom(300_000), "b.txt": b"small\n", "empty": b""}
    s.client.add_files(files)
    keys = {name: s.client.key(name) for name in files}

    s.client.annex("copy", "--to", ENDPOINT, "--", *files)
    for name, key in keys.items():
        assert s.holding(key) == ALL, f"{name} is on {s.holding(key)}"
        # SUCCESS-PLUS told the client which nodes have it; the proxy logged them too.
        assert {n.uuid for n in s.nodes} <= whereis_uuids(s.client, key)
        wait_logged(s, key, ALL)
    for node in s.nodes:
        node.assert_holds({keys[n]: files[n] for n in files})

    # The cluster cannot lock (LOCKCONTENT is refused): drop the local copy by force.
    s.client.annex("drop", "--force", "--", "a.bin", "b.txt")
    s.client.annex("get", "--from", ENDPOINT, "--", "a.bin", "b.txt")
    assert s.client.read("a.bin") == files["a.bin"]
    fsck = s.client.annex("fsck", "--from", ENDPOINT, "--", *files)
    assert "failed" not in fsck.output, fsck.describe()

    # drop --from: gone from every node, and from the logs.
    s.client.annex("drop", "--from", ENDPOINT, "--", "a.bin")
    assert s.holding(keys["a.bin"]) == set()
    wait_logged(s, keys["a.bin"], set())
    assert not {n.uuid for n in s.nodes} & whereis_uuids(s.client, keys["a.bin"])
    for node in s.nodes:
        node.assert_sound()


def test_a_big_upload_is_fanned_out_by_the_kernel(cluster: Callable[..., ClusterSetup]) -> None:
    """The stock client's PUT body reaches every kind of node (a p2p-annex
    program and git-annex-shell on pipes, a tor-annex node on a socket) by
    tee(2)/splice(2), byte-exact (transport/fanout.py)."""
    s = cluster()
    s.bridge.stop()  # again at debug level, where the fanout says what it moved
    s.bridge.proc = None
    s.bridge.verbose = True
    s.bridge.start()
    size = 8 * 1024 * 1024 + 1234
    data = os.urandom(size)
    s.client.add_file("t.bin", data)
    key = s.client.key("t.bin")
    s.client.annex("copy", "--to", ENDPOINT, "--", "t.bin")
    assert s.holding(key) == ALL
    for node in s.nodes:
        node.assert_holds({key: data})
    log = s.bridge.log_path.read_text()
    moved = [int(x) for x in re.findall(r"(\d+) body bytes fanned out by tee", log)]
    # All but the first pieces (the held DATA lines, the client's buffered bytes).
    assert moved and size - moved[-1] <= 1024 * 1024, moved


def test_drop_reaches_a_node_the_log_does_not_know(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    content = os.urandom(50_000)
    s.client.add_file("x.dat", content)
    key = s.client.key("x.dat")
    s.client.annex("copy", "--to", ENDPOINT, "--", "x.dat")
    # A node gets the same object by its own means: the proxy's log does not know.
    extra = s.node("c3-local")
    s.client.annex("drop", "--from", ENDPOINT, "--", "x.dat")
    extra.repo.add_file("x.dat", content)
    assert extra.repo.key("x.dat") == key and s.logged(key) == set()
    s.client.annex("copy", "--to", ENDPOINT, "--", "x.dat")  # c3 answers ALREADY-HAVE
    assert s.holding(key) == ALL
    s.client.annex("drop", "--from", ENDPOINT, "--", "x.dat")
    assert s.holding(key) == set()
    # Again, and this time nothing tells the proxy before the drop.
    extra.repo.add_file("again.dat", content)  # the same key
    assert s.logged(key) == set() and s.holding(key) == {"c3-local"}
    token = s.bridge.add_token("raw-remove", "rw", endpoint=ENDPOINT)
    with RawSession(token.socket) as r:
        r.auth(token.token, s.uuid)
        assert r.version(4) == "VERSION 4"
        r.send_line(f"REMOVE {key}")
        reply = r.read_line(timeout=60).split()  # a node without it removed it too
        assert reply[0] == "SUCCESS-PLUS" and set(reply[1:]) == {n.uuid for n in s.nodes}
    assert s.holding(key) == set()


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4])
def test_client_versions(version: int, cluster: Callable[..., ClusterSetup]) -> None:
    """PUT, CHECKPRESENT, GET, LOCKCONTENT, GETTIMESTAMP, REMOVE at every version."""
    s = cluster()
    data = os.urandom(10_000)
    s.client.add_file("v.bin", data)
    key = s.client.key("v.bin")
    token = s.bridge.add_token(f"raw{version}", "rw", endpoint=ENDPOINT)
    names = {n.uuid for n in s.nodes}
    with RawSession(token.socket) as r:
        r.auth(token.token, s.uuid)
        if version:
            assert r.version(version) == f"VERSION {version}"
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("FAILURE")
        r.send_line(f"PUT v.bin {key}")
        r.expect("PUT-FROM 0")
        r.send_line(f"DATA {len(data)}")
        r.send_raw(data)
        if version >= 1:
            r.send_line("VALID")
        reply = r.read_line()
        if version >= 2:
            assert reply.startswith("SUCCESS-PLUS ") and set(reply.split()[1:]) == names, reply
        else:
            assert reply == "SUCCESS"
        wait_for("the log", lambda: s.logged(key) == ALL, 30)
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("SUCCESS")
        r.send_line(f"PUT v.bin {key}")
        reply = r.read_line()
        if version >= 2:
            # Every node is logged: all are asked, all have it.
            assert reply.startswith("ALREADY-HAVE-PLUS ") and set(reply.split()[1:]) == names, reply
        else:
            assert reply == "ALREADY-HAVE"
        r.send_line(f"GET 0 v.bin {key}")
        assert r.read_line() == f"DATA {len(data)}"
        assert r.read_exact(len(data)) == data
        if version >= 1:
            r.expect("VALID")
        r.send_line("SUCCESS")
        r.send_line(f"LOCKCONTENT {key}")
        r.expect("FAILURE")
        r.send_line("FROBNICATE")
        r.expect("ERROR unknown command")
        if version >= 3:
            r.send_line("GETTIMESTAMP")
            ts = int(r.read_line().split()[1])
            r.send_line(f"REMOVE-BEFORE {ts + 60} {key}")
        else:
            r.send_line(f"REMOVE {key}")
        reply = r.read_line()
        if version >= 2:
            assert reply.startswith("SUCCESS-PLUS ") and set(reply.split()[1:]) == names, reply
        else:
            assert reply == "SUCCESS"
    assert s.holding(key) == set()


def test_preferred_content_chooses_the_targets(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    s.proxy.annex("wanted", "c1-p2p", "largerthan=100kb")
    s.proxy.annex("wanted", "c2-tor", "include=*.bin")
    files = {"small.txt": b"x" * 1000, "big.bin": os.urandom(200_000), "mid.bin": b"y" * 5000}
    s.client.add_files(files)
    keys = {name: s.client.key(name) for name in files}
    s.client.annex("copy", "--to", ENDPOINT, "--", *files)
    assert s.holding(keys["small.txt"]) == {"c3-local"}
    assert s.holding(keys["big.bin"]) == ALL
    assert s.holding(keys["mid.bin"]) == {"c2-tor", "c3-local"}
    # Nobody wants it: it still goes somewhere (every node not logged).
    s.proxy.annex("wanted", "c3-local", "nothing")
    s.proxy.annex("wanted", "c2-tor", "nothing")
    s.client.add_file("other.txt", b"z" * 10)
    key = s.client.key("other.txt")
    s.bridge.stop()
    s.bridge.start()  # forget the cached expressions
    s.client.annex("copy", "--to", ENDPOINT, "--", "other.txt")
    assert s.holding(key) == ALL


def test_partial_uploads_at_different_offsets(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    data = os.urandom(400_000)
    s.client.add_file("p.bin", data)
    key = s.client.key("p.bin")
    # Interrupted uploads left each node a different amount (git-annex resumes
    # from the size of .git/annex/tmp/KEY).
    for name, have in {"c1-p2p": 50_000, "c2-tor": 300_000, "c3-local": 120_000}.items():
        tmp = s.node(name).repo.path / ".git" / "annex" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / key).write_bytes(data[:have])
    copy = s.client.annex("copy", "--to", ENDPOINT, "--debug", "--", "p.bin")
    assert put_offsets(copy) == [50_000], copy.describe()
    for node in s.nodes:
        node.assert_holds({key: data})
        node.assert_sound()


def test_a_node_down_at_the_start(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    down = s.node("c1-p2p")
    assert down.server is not None
    down.server.stop()
    s.client.add_file("d.bin", os.urandom(20_000))
    key = s.client.key("d.bin")
    s.client.annex("copy", "--to", ENDPOINT, "--", "d.bin")
    assert s.holding(key) == ALL - {"c1-p2p"}
    assert down.uuid not in whereis_uuids(s.client, key)
    assert "c1-p2p unreachable" in s.bridge.log()
    # The drop cannot reach c1: the client hears that it did not finish.
    drop = s.client.annex("drop", "--from", ENDPOINT, "--", "d.bin", check=False)
    assert not drop.ok
    assert s.holding(key) == set()
    down.server.start()
    s.client.annex("drop", "--from", ENDPOINT, "--", "d.bin")


def test_a_node_killed_mid_transfer(cluster: Callable[..., ClusterSetup]) -> None:
    s = cluster()
    victim = s.node("c2-tor")
    assert victim.server is not None
    size = 30 * 1024 * 1024
    data = os.urandom(size)
    s.client.add_file("k.bin", data)
    key = s.client.key("k.bin")
    s.net.set_fault(victim.name, up_bytes=5 * 1024 * 1024, kill=victim.server.pid)
    copy = s.client.annex("copy", "--to", ENDPOINT, "--", "k.bin", timeout=300)
    assert s.net.fired(victim.name), "the fault never fired"
    assert s.holding(key) == ALL - {victim.name}
    assert victim.uuid not in whereis_uuids(s.client, key), copy.describe()
    for node in s.nodes:
        if node is not victim:
            node.assert_holds({key: data})
    victim.server.wait_dead()
    victim.server.start()
    victim.assert_sound()
    # The bridge goes on: the next upload reaches the live nodes at once
    # (the victim is marked down and skipped, docs/clusters.md "When nodes
    # fail"), and every node again once a probe finds the victim answering.
    s.client.add_file("next.bin", b"next\n")
    s.client.annex("copy", "--to", ENDPOINT, "--", "next.bin")
    assert s.holding(s.client.key("next.bin")) >= ALL - {victim.name}
    n = 0

    def every_node() -> bool:
        nonlocal n
        n += 1
        s.client.add_file(f"next{n}.bin", b"next %d\n" % n)
        s.client.annex("copy", "--to", ENDPOINT, "--", f"next{n}.bin")
        return s.holding(s.client.key(f"next{n}.bin")) == ALL

    wait_for("the restarted node to be used again", every_node, 120, interval=1.0)


def test_already_there_and_the_rest_failing(cluster: Callable[..., ClusterSetup]) -> None:
    """git-annex's gateway crashes here (`minimum []`); the content is in the cluster."""
    s = cluster()
    content = b"already\n" * 100
    s.client.add_file("a.txt", content)
    key = s.client.key("a.txt")
    s.node("c3-local").repo.add_file("a.txt", content)
    for name in ("c1-p2p", "c2-tor"):
        server = s.node(name).server
        assert server is not None
        server.stop()
    copy = s.client.annex("copy", "--to", ENDPOINT, "--debug", "--", "a.txt")
    assert "ALREADY-HAVE-PLUS " + s.node("c3-local").uuid in copy.output, copy.describe()
    assert s.node("c3-local").uuid in whereis_uuids(s.client, key)


def test_two_gateways(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
    annex_env: AnnexEnv,
    socks_server: tbnode.SocksServer,
    tmp_path: Path,
) -> None:
    """A copy through either gateway reaches every node once: BYPASS breaks the loop.

    Gateway A (the proxy) has node c1, gateway B node c2; each links the
    other's own and cluster endpoints and runs ``git annex extendcluster``.
    """
    gw_a = proxy_repo
    c1 = make_nodes("p2p", "c1-p2p")
    uuid = init_cluster(gw_a, [c1])
    bridge_a = make_node_bridge([Expose("hub", ".", 5000), Expose(ENDPOINT, CLUSTER, 5001)])
    bridge_a.start()

    gw_b = AnnexRepo.create(annex_env, tmp_path / "gwB", "gateway B")
    c2 = make_node("p2p", "c2-p2p", annex_env, node_net, gw_b, tmp_path / "nodesB")
    bridge_b = Bridge(
        annex_env,
        gw_b.path,
        tmp_path / "bridgeB",
        [Expose("hub", ".", 5000), Expose(ENDPOINT, CLUSTER, 5001)],
        limits=BRIDGE_LIMITS,
        tor={"socks": socks_server.address},
    )
    try:
        link_gateway(gw_b, "gwA", bridge_a)
        gw_b.annex("extendcluster", "gwA", CLUSTER)
        gw_b.git("config", "remote.c2-p2p.annex-cluster-node", CLUSTER)
        gw_b.annex("updatecluster")
        assert gw_b.git("config", f"annex.cluster.{CLUSTER}").stdout.strip() == uuid
        bridge_b.start()
        link_gateway(gw_a, "gwB", bridge_b)
        gw_a.annex("extendcluster", "gwB", CLUSTER)
        bridge_a.stop()
        bridge_a.start()

        nodes = {"c1-p2p": c1, "c2-p2p": c2}
        for gateway, bridge in (("A", bridge_a), ("B", bridge_b)):
            client = make_client(f"client{gateway}")
            client.link(
                bridge.add_token(f"client{gateway}", "rw", endpoint=ENDPOINT).line, ENDPOINT
            )
            assert client.remote_uuid(ENDPOINT) == uuid
            data = os.urandom(100_000)
            client.add_file(f"via-{gateway}.bin", data)
            key = client.key(f"via-{gateway}.bin")
            copy = client.annex("copy", "--to", ENDPOINT, "--debug", "--", f"via-{gateway}.bin")
            plus = re.findall(r"P2P < SUCCESS-PLUS (.*)", copy.output)
            assert plus and set(plus[0].split()) == {c1.uuid, c2.uuid}, copy.describe()
            for name, node in nodes.items():
                node.assert_holds({**node_keys(node, exclude=key), key: data})
                assert node.server is not None
                puts = node.server.log().count(f"P2P < PUT via-{gateway}.bin {key}")
                assert puts == 1, f"{name} got {puts} PUTs of {key} through gateway {gateway}"

        # A key on A's own node only: A's location log lists c1 (and so the
        # cluster's UUID, which the log shows once any node has it). Every
        # CHECKPRESENT and GET through A is c1's; B, which could only ask
        # its own c2, is never asked.
        data = os.urandom(50_000)
        gw_a.add_file("only-A.bin", data)
        key = gw_a.key("only-A.bin")
        gw_a.annex("copy", "--to", "c1-p2p", "--", "only-A.bin")
        token = bridge_a.add_token("rawA", "rw", endpoint=ENDPOINT)
        with RawSession(token.socket) as r:
            r.auth(token.token, uuid)
            assert r.version(4) == "VERSION 4"
            for _ in range(6):  # the holder is picked at random among equals
                r.send_line(f"CHECKPRESENT {key}")
                r.expect("SUCCESS")
                r.send_line(f"GET 0 only-A.bin {key}")
                assert r.read_line() == f"DATA {len(data)}"
                assert r.read_exact(len(data)) == data
                r.expect("VALID")
                r.send_line("SUCCESS")
        assert c2.server is not None
        assert key not in c2.server.log(), "gateway B was asked for a key only A's node has"
    finally:
        bridge_b.stop()
        bridge_b.close()
        assert c2.server is not None
        c2.server.stop()


def link_gateway(repo: AnnexRepo, name: str, bridge: Bridge) -> None:
    """Link the other gateway's own endpoint as NAME, its cluster endpoint as NAME-CLUSTER."""
    for remote, endpoint in ((name, "hub"), (f"{name}-{CLUSTER}", ENDPOINT)):
        line = bridge.add_token(f"{remote}-link", "rw", endpoint=endpoint).line
        repo.annex("p2p", "--link", "--name", remote, input=line + "\n")


def node_keys(node: Node, exclude: str) -> dict[str, bytes]:
    """What ``node`` holds already, but ``exclude``: for assert_holds."""
    return {k: node.repo.key_content(k) for k in node.objects() if k != exclude}
