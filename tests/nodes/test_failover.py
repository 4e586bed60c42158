"""A cluster that rides through node failures, driven by the stock client.

The proxy is the gateway of a 3-node cluster (tests/harness/clusters.py);
faults are injected by the relays that carry the nodes' connections
(tbnode.py). A GET whose node is killed, stopped or cut mid-body goes on
from the next holder, and the stock client, with ``annex.forward-retry=0``
(no second chance), gets the object and fsck passes. A PUT with one node
dead and one that accepts connections but never answers succeeds on the
live nodes within the connect deadline, and the next copy skips both.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import get_offsets, p2p_errors
from tests.harness.clusters import ENDPOINT, ClusterSetup, setup_cluster
from tests.harness.nodes import Node, NodeNet
from tests.harness.process import wait_for

pytestmark = pytest.mark.annex

MiB = 1024 * 1024
BIG = 24 * MiB
CUT = 8 * MiB  # bytes of the body the serving node sends before its fault
# stall_timeout: a stopped node is given up on within this (and the GET goes on).
LIMITS = {"peer_timeout": 60.0, "stall_timeout": 30.0}
NO_RETRY = ("-c", "annex.forward-retry=0", "-c", "annex.retry=0")


@pytest.fixture
def cluster(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> Callable[..., ClusterSetup]:
    def make(limits: dict[str, float] | None = None, **kwargs: Any) -> ClusterSetup:
        def bridge(exposes: list[Any], **kw: object) -> Bridge:
            return make_node_bridge(exposes, limits=limits, **kw)

        return setup_cluster(make_nodes, bridge, make_client, proxy_repo, node_net, **kwargs)

    return make


def costs(proxy: AnnexRepo, order: dict[str, int]) -> Callable[[list[Node]], None]:
    """Node costs, so the test knows which node serves a GET first."""

    def set_costs(_nodes: list[Node]) -> None:
        for name, cost in order.items():
            proxy.git("config", f"remote.{name}.annex-cost", str(cost))

    return set_costs


def server_pid(node: Node) -> int:
    assert node.server is not None
    return node.server.pid


def status(s: ClusterSetup) -> dict[str, Any]:
    return json.loads(s.bridge.cli("status", "--json").stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("fault", ["kill", "stop", "cut"])
def test_get_goes_on_from_the_next_node(
    fault: str, cluster: Callable[..., ClusterSetup], proxy_repo: AnnexRepo
) -> None:
    s = cluster(
        limits=LIMITS,
        before_start=costs(proxy_repo, {"c1-p2p": 50, "c2-tor": 60, "c3-local": 70}),
    )
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    key = s.client.key("big")
    s.client.annex("copy", "--to", ENDPOINT, "--", "big", timeout=300)
    assert s.holding(key) == {"c1-p2p", "c2-tor", "c3-local"}
    s.client.annex("drop", "--force", "--", "big")

    victim = s.node("c1-p2p")  # the cheapest: it serves the GET
    pid = server_pid(victim)
    if fault == "kill":
        s.net.set_fault(victim.name, down_bytes=CUT, kill=pid)
    elif fault == "stop":
        s.net.set_fault(
            victim.name, down_bytes=CUT, kill=pid, signal=int(signal.SIGSTOP), stop=False
        )
    else:  # the connection is cut mid-body (the relay dies); the node lives
        s.net.set_fault(victim.name, down_bytes=CUT, kill=0)
    try:
        started = time.monotonic()
        get = s.client.annex(
            "get", *NO_RETRY, "--from", ENDPOINT, "--debug", "--", "big", check=False, timeout=300
        )
        took = time.monotonic() - started
        assert s.net.fired(victim.name), "the fault never fired"
    finally:
        if fault == "stop":
            os.kill(pid, signal.SIGCONT)
    print(f"\nget with the serving node {fault}: {took:.1f}s")
    assert get.ok, get.describe()
    # One GET from the client, from 0: it never knew.
    assert get_offsets(get) == [0], get.describe()
    assert not p2p_errors(get), get.describe()
    assert s.client.read("big") == data
    fsck = s.client.annex("fsck", "--", "big")
    assert fsck.ok and "failed" not in fsck.output, fsck.describe()
    log = s.bridge.log()
    assert f"node {victim.name} lost" in log, log
    state = status(s)["clusters"]
    assert state and state[next(iter(state))][victim.name]["up"] is False
    if fault == "kill":
        assert victim.server is not None
        victim.server.wait_dead()
        victim.server.start()
    victim.assert_sound()


def test_get_when_no_node_can_finish(
    cluster: Callable[..., ClusterSetup], proxy_repo: AnnexRepo
) -> None:
    """Every holder lost mid-body: the client's connection is cut; it keeps
    what it got and resumes from there on the next get (no bad byte kept)."""
    s = cluster(
        limits=LIMITS,
        kinds=("p2p", "tor"),
        before_start=costs(proxy_repo, {"c1-p2p": 50, "c2-tor": 60}),
    )
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    key = s.client.key("big")
    s.client.annex("copy", "--to", ENDPOINT, "--", "big", timeout=300)
    s.client.annex("drop", "--force", "--", "big")
    s.net.set_fault("c1-p2p", down_bytes=CUT, kill=0)
    s.net.set_fault("c2-tor", down_bytes=CUT, kill=0)
    get = s.client.annex(
        "get", *NO_RETRY, "--from", ENDPOINT, "--debug", "--", "big", check=False, timeout=300
    )
    assert not get.ok, get.describe()
    assert "big" not in s.client.present_here()
    partial = s.client.tmp_files().get(key, 0)
    assert CUT < partial < BIG, partial
    again = s.client.annex("get", "--from", ENDPOINT, "--debug", "--", "big", timeout=300)
    assert get_offsets(again) == [partial], again.describe()
    assert s.client.read("big") == data
    s.client.annex("fsck", "--", "big")


def test_put_with_a_dead_and_a_silent_node(cluster: Callable[..., ClusterSetup]) -> None:
    """Default configuration: a dead node (its onion gone) and a silent one
    (it accepts connections and never answers) hold no copy up."""
    s = cluster(limits={})
    silent, dead, live = s.node("c1-p2p"), s.node("c2-tor"), s.node("c3-local")
    assert dead.server is not None and silent.server is not None
    dead.server.stop()
    silent_pid = server_pid(silent)
    os.kill(silent_pid, signal.SIGSTOP)  # the kernel still accepts its connections
    times: list[float] = []
    try:
        for name in ("one", "two"):
            s.client.add_file(name, os.urandom(100_000))
            started = time.monotonic()
            copy = s.client.annex("copy", "--to", ENDPOINT, "--debug", "--", name, timeout=300)
            times.append(time.monotonic() - started)
            key = s.client.key(name)
            assert s.holding(key) == {live.name}
            # SUCCESS-PLUS names exactly the node that stored it.
            plus = [line for line in copy.output.splitlines() if "P2P < SUCCESS-PLUS" in line]
            assert plus and plus[-1].split("SUCCESS-PLUS")[1].split() == [live.uuid], plus
        print(f"\ncopy with a dead and a silent node: first {times[0]:.1f}s, next {times[1]:.1f}s")
        assert times[0] < 60, times  # the connect deadline (20 s), not a transfer timeout
        log = s.bridge.log()
        # The second session did not try the silent node again: it was down.
        assert log.count(f"node {silent.name} unreachable") == 1, log
        assert log.count(f"node {dead.name} unreachable") == 1, log
        nodes = next(iter(status(s)["clusters"].values()))
        assert not nodes[silent.name]["up"] and not nodes[dead.name]["up"]
        assert nodes[live.name]["up"]
        text = s.bridge.cli("status").stdout
        assert f"node {silent.name}: DOWN" in text, text
        metrics = s.bridge.cli("status", "--metrics").stdout
        assert f'torbridge_cluster_node_up{{cluster="tbcluster",node="{silent.name}"}} 0' in metrics
        assert f'torbridge_cluster_node_up{{cluster="tbcluster",node="{live.name}"}} 1' in metrics
    finally:
        os.kill(silent_pid, signal.SIGCONT)

    # Both come back: a probe finds them answering, and copies reach them again.
    dead.server.start()
    n = 0

    def back() -> bool:
        nonlocal n
        n += 1
        name = f"again{n}"
        s.client.add_file(name, os.urandom(1000))
        s.client.annex("copy", "--to", ENDPOINT, "--", name, timeout=120)
        return s.holding(s.client.key(name)) == {silent.name, dead.name, live.name}

    wait_for("the nodes to be used again", back, 120, interval=2.0)
    nodes = next(iter(status(s)["clusters"].values()))
    assert all(state["up"] for state in nodes.values()), nodes
    for node in s.nodes:
        node.assert_sound()
