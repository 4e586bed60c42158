"""Fixtures for the node tests: real git-annex nodes behind a running bridge.

Reuses the e2e fixtures (``annex_env``, ``proxy_repo``, ``make_client``);
adds the ``tbnode`` network, a SOCKS5 server standing in for tor, node
repositories served by ``git annex remotedaemon``, and a bridge whose config
names the SOCKS server. Every remotedaemon, SOCKS server and daemon a test
starts is stopped at its teardown.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import annex_env, make_client, proxy_repo  # noqa: F401 (fixtures)
from tests.harness import tbnode
from tests.harness.annex import AnnexEnv, AnnexRepo, Client, Expose
from tests.harness.nodes import Node, NodeBridge, NodeNet, make_node

LOGS = pytest.StashKey[list[Callable[[], tuple[str, str]]]]()
"""Logs to attach to a failed test's report: (title, text) makers."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for make in item.stash.get(LOGS, []):
            title, text = make()
            report.sections.append((title, text[-20000:]))
    return report


def _logs(request: pytest.FixtureRequest) -> list[Callable[[], tuple[str, str]]]:
    stash: pytest.Stash = request.node.stash
    logs = stash.get(LOGS, None)
    if logs is None:
        logs = []
        stash[LOGS] = logs
    return logs


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
    logs = _logs(request)

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
            logs.append(lambda: (f"remotedaemon of {name} ({server.log_path})", server.log()))
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
    request: pytest.FixtureRequest,
    annex_env: AnnexEnv,  # noqa: F811
    proxy_repo: AnnexRepo,  # noqa: F811
    socks_server: tbnode.SocksServer,
    tmp_path: Path,
) -> Iterator[Callable[..., NodeBridge]]:
    """Factory: a configured (not started) bridge; stopped cleanly at teardown."""
    bridges: list[NodeBridge] = []
    logs = _logs(request)

    def make(exposes: list[Expose], **kwargs: object) -> NodeBridge:
        kwargs.setdefault("socks", socks_server.address)
        b = NodeBridge(
            annex_env,
            proxy_repo.path,
            tmp_path / f"bridge{len(bridges)}",
            exposes,
            **kwargs,  # type: ignore[arg-type]
        )
        bridges.append(b)
        logs.append(lambda: (f"torbridge daemon log ({b.log_path})", b.log()))
        return b

    yield make
    errors: list[str] = []
    for b in bridges:
        try:
            if b.proc is not None and b.returncode is None:
                left = b.wait_idle(10)
                if left:
                    errors.append(f"session processes leaked: {left}")
                b.stop()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            b.close()
    if errors:
        pytest.fail("daemon did not stop cleanly:\n" + "\n".join(errors), pytrace=False)


@dataclass
class Setup:
    """One node behind a running bridge, and a client linked to its endpoint."""

    node: Node
    bridge: NodeBridge
    client: Client
    proxy: AnnexRepo
    net: NodeNet
    socks: tbnode.SocksServer

    @property
    def remote(self) -> str:
        """The client's name for the node's endpoint (the node's name)."""
        return self.node.name


@pytest.fixture
def setup_node(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., NodeBridge],
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
