"""Fixtures for the node tests: real git-annex nodes behind a running bridge.

Uses the harness fixtures (``annex_env``, ``proxy_repo``, ``make_client``,
``make_bridge``);
adds the ``tbnode`` network, a SOCKS5 server standing in for tor, node
repositories served by ``git annex remotedaemon``, and a bridge whose config
names the SOCKS server. Every remotedaemon, SOCKS server and daemon a test
starts is stopped at its teardown.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import tbnode
from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.fixtures import (  # noqa: F401 (fixtures and the report hook)
    annex_env,
    bridge_teardown,
    make_bridge,
    make_client,
    proxy_repo,
    pytest_runtest_makereport,
    report_log,
)
from tests.harness.nodes import BRIDGE_LIMITS, Node, NodeNet, Setup, make_node


@pytest.fixture
def node_net(annex_env: AnnexEnv, tmp_path: Path) -> NodeNet:  # noqa: F811
    return NodeNet(annex_env, tmp_path / "tbnode")


@pytest.fixture
def socks_server(node_net: NodeNet) -> Iterator[tbnode.SocksServer]:
    """Our stand-in for tor's SocksPort, on a random loopback port."""
    server = tbnode.SocksServer("127.0.0.1", 0, node_net.directory).start()
    yield server
    server.stop()


@pytest.fixture
def make_nodes(
    request: pytest.FixtureRequest,
    annex_env: AnnexEnv,  # noqa: F811
    node_net: NodeNet,
    proxy_repo: AnnexRepo,  # noqa: F811
    socks_server: tbnode.SocksServer,
    tmp_path: Path,
) -> Iterator[Callable[..., Node]]:
    """Factory: ``make(kind, name)`` -> a served node linked from the proxy."""
    nodes: list[Node] = []

    def make(kind: str, name: str, root: Path | None = None, **kwargs: object) -> Node:
        node = make_node(
            kind,
            name,
            annex_env,
            node_net,
            proxy_repo,
            root or tmp_path / "nodes",
            socks=socks_server,
            **kwargs,  # type: ignore[arg-type]
        )
        nodes.append(node)
        if node.server is not None:
            server = node.server
            title = f"remotedaemon of {name} ({server.log_path})"
            report_log(request, lambda: (title, server.log()))
        return node

    yield make
    pids = []
    for node in nodes:
        if node.server is not None:
            if node.server.proc is not None:
                pids.append(node.server.proc.pid)
            node.server.stop()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"remotedaemon {pid} survived the teardown", pytrace=False)


@pytest.fixture
def make_node_bridge(
    make_bridge: Callable[..., Bridge],  # noqa: F811
    socks_server: tbnode.SocksServer,
) -> Callable[..., Bridge]:
    """Factory: ``make(exposes)``: a configured (not started) bridge that
    reaches tor-annex nodes through ``socks`` (``socks_server`` by default), with the short
    ``BRIDGE_LIMITS`` unless ``limits`` says otherwise; stopped cleanly at
    teardown (``make_bridge``)."""

    def make(
        exposes: list[Expose],
        limits: dict[str, float] | None = None,
        socks: str | None = None,
        **kwargs: object,
    ) -> Bridge:
        return make_bridge(
            exposes=exposes,
            limits=BRIDGE_LIMITS if limits is None else limits,
            tor={"socks": socks or socks_server.address},
            **kwargs,
        )

    return make


@pytest.fixture
def setup_node(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],  # noqa: F811
    proxy_repo: AnnexRepo,  # noqa: F811
    node_net: NodeNet,
    socks_server: tbnode.SocksServer,
) -> Callable[..., Setup]:
    """Factory: ``setup_node(kind)``: node ``n-KIND``, a bridge, a linked client."""

    def make(kind: str, limits: dict[str, float] | None = None, **node_kwargs: object) -> Setup:
        name = f"n-{kind}"
        node = make_nodes(kind, name, **node_kwargs)
        bridge = make_node_bridge(
            [Expose("hub", ".", 5000), Expose(name, name, 5001)], limits=limits
        )
        bridge.start()
        client = make_client("client")
        client.link(bridge.add_token("client", "rw", endpoint=name).line, name)
        assert client.remote_uuid(name) == node.uuid
        return Setup(node, bridge, client, proxy_repo, node_net, socks_server)

    return make
