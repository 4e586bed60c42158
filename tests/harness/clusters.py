"""A git-annex cluster behind the bridge, configured with git-annex's own commands.

The proxy repository is the gateway: ``git annex initcluster``, then
``remote.NODE.annex-cluster-node`` on each node remote and ``git annex
updatecluster``, which records P2P-address nodes in cluster.log as well.
The bridge exposes the cluster as an endpoint whose AUTH-SUCCESS carries
the cluster's UUID.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.harness.annex import AnnexRepo, Client, whereis_uuids
from tests.harness.bridge import Bridge, Expose
from tests.harness.nodes import Node, NodeNet

CLUSTER = "tbcluster"
ENDPOINT = "cl"


def init_cluster(proxy: AnnexRepo, nodes: list[Node], name: str = CLUSTER) -> str:
    """Make ``proxy`` the gateway of cluster ``name`` over ``nodes``; its UUID."""
    proxy.annex("initcluster", name)
    for node in nodes:
        proxy.git("config", f"remote.{node.name}.annex-cluster-node", name)
    out = proxy.annex("updatecluster").output
    for node in nodes:
        assert f"Added node {node.name}" in out, out
    return proxy.git("config", f"annex.cluster.{name}").stdout.strip()


@dataclass
class ClusterSetup:
    nodes: list[Node]
    bridge: Bridge
    client: Client
    proxy: AnnexRepo
    net: NodeNet
    uuid: str  # the cluster's

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def holding(self, key: str) -> set[str]:
        """Names of the nodes whose annex has ``key`` (checked in the node)."""
        return {n.name for n in self.nodes if key in n.objects()}

    def logged(self, key: str) -> set[str]:
        """Names of the nodes the proxy's location log lists for ``key``."""
        uuids = whereis_uuids(self.proxy, key)
        return {n.name for n in self.nodes if n.uuid in uuids}


def setup_cluster(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy: AnnexRepo,
    net: NodeNet,
    kinds: tuple[str, ...] = ("p2p", "tor", "local"),
    before_start: Callable[[list[Node]], None] | None = None,
) -> ClusterSetup:
    nodes = [make_nodes(kind, f"c{i}-{kind}") for i, kind in enumerate(kinds, 1)]
    uuid = init_cluster(proxy, nodes)
    if before_start is not None:
        before_start(nodes)
    bridge = make_node_bridge([Expose("hub", ".", 5000), Expose(ENDPOINT, CLUSTER, 5001)])
    bridge.start()
    client = make_client("client")
    client.link(bridge.add_token("client", "rw", endpoint=ENDPOINT).line, ENDPOINT)
    assert client.remote_uuid(ENDPOINT) == uuid
    # git pull through the cluster endpoint (CONNECT runs in the proxy's own
    # repository) brings cluster.log: the client then counts the nodes a
    # SUCCESS-PLUS names as copies in the cluster, and `get --from` finds them.
    client.annex("pull", "--no-content", ENDPOINT)
    return ClusterSetup(nodes, bridge, client, proxy, net, uuid)
