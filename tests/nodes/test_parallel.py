"""One client's ``-J64`` through one token to a node endpoint and a cluster
endpoint; and failures that must cost the client one transfer, not two.

The nodes are real git-annex repositories served by ``git annex
remotedaemon`` (tbnode.py carries their connections); the client is the
stock one. After a failure, the next transfer runs in the SAME git-annex
process (``copy --batch``), on whatever connection the client pooled.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import batch_copy, parallel_files, peak_sessions, run_parallel_workflow
from tests.harness.clusters import ENDPOINT, setup_cluster
from tests.harness.nodes import Node, NodeNet, Setup

pytestmark = pytest.mark.annex


def test_j64_to_a_node(setup_node: Callable[..., Setup]) -> None:
    s = setup_node("tor")
    files = parallel_files(s.client)
    run_parallel_workflow(s.client, s.remote, files, lambda key: key in s.node.objects())
    log = s.bridge.log()
    assert "authentication failed" not in log
    assert peak_sessions(log) > 16, peak_sessions(log)
    s.node.assert_sound()
    s.bridge.assert_alive()


def test_j64_to_a_cluster(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> None:
    c = setup_cluster(
        make_nodes, make_node_bridge, make_client, proxy_repo, node_net, kinds=("p2p", "tor")
    )
    files = parallel_files(c.client)
    run_parallel_workflow(
        c.client, ENDPOINT, files, lambda key: bool(c.holding(key)), force_local_drop=True
    )
    log = c.bridge.log()
    assert "authentication failed" not in log
    assert peak_sessions(log) > 16, peak_sessions(log)
    for node in c.nodes:
        node.assert_sound()
    c.bridge.assert_alive()


# --- failures that must not cost the next transfer -------------------------------------


def two_files(client: Client) -> None:
    client.add_files({"a": os.urandom(2000), "b": os.urandom(2001), "c": os.urandom(2002)})


def test_node_down_at_version_then_back(setup_node: Callable[..., Setup]) -> None:
    """The node is down when the client's connection negotiates VERSION: the
    bridge closes (an ERROR would leave the pooled connection at version 0),
    so the next transfer of the same process opens a new one and works."""
    s = setup_node("tor")
    two_files(s.client)
    assert s.node.server is not None
    s.node.server.stop()
    linked = len(s.bridge.log())  # `p2p --link` made a session at version 0
    with batch_copy(s.client, s.remote) as batch:
        assert batch.copy("a")["success"] is False
        s.node.server.start()
        assert batch.copy("b")["success"] is True
        assert batch.copy("c")["success"] is True
        transcript = batch.close()
    # b and c went at version 4 (at version 0: no VALID, no BYPASS, no DATA-PRESENT).
    assert "version 0," not in s.bridge.log()[linked:], s.bridge.log()
    assert "Lost connection" not in transcript
    assert s.client.key("b") in s.node.objects()
    s.bridge.assert_alive()


def test_node_down_at_put_then_back(setup_node: Callable[..., Setup]) -> None:
    """The node goes away between two PUTs of one process: the bridge answers
    the PUT with ERROR, the stock client answers ERROR "expected PUT_FROM or
    ALREADY_HAVE", and its pooled connection must still work afterwards."""
    s = setup_node("tor")
    two_files(s.client)
    assert s.node.server is not None
    with batch_copy(s.client, s.remote, "--fast") as batch:
        assert batch.copy("a")["success"] is True
        s.node.server.stop()
        assert batch.copy("b")["success"] is False
        s.node.server.start()
        assert batch.copy("c")["success"] is True
        transcript = batch.close()
    assert "Lost connection" not in transcript, transcript[-3000:]
    assert s.client.key("c") in s.node.objects()
    # One connection all along (the link made the first session).
    assert s.bridge.log().count("session start") == 2, s.bridge.log()


def test_cluster_stores_nowhere_then_back(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> None:
    """No node of the cluster can take a PUT; once they are back, the next
    transfer of the same process works on the same connection."""
    c = setup_cluster(
        make_nodes, make_node_bridge, make_client, proxy_repo, node_net, kinds=("p2p", "tor")
    )
    two_files(c.client)
    with batch_copy(c.client, ENDPOINT, "--fast") as batch:
        assert batch.copy("a")["success"] is True
        for node in c.nodes:
            assert node.server is not None
            node.server.stop()
        assert batch.copy("b")["success"] is False
        for node in c.nodes:
            assert node.server is not None
            node.server.start()
        assert batch.copy("c")["success"] is True
        transcript = batch.close()
    assert "Lost connection" not in transcript, transcript[-3000:]
    assert c.holding(c.client.key("c"))
    assert not c.holding(c.client.key("b"))
    c.bridge.assert_alive()
