"""No token in the daemon's log, even at debug level, over real sessions;
no onion, token or proxy path in what a client hears when a node fails.

A stock client links to a node's endpoint and moves content through it (the
bridge authenticates to the node with the node's token), raw sessions fail
AUTH in every way a token can be sent wrong, and the whole debug log is then
searched for each token: the client's, the node's, and the wrong ones.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import p2p_errors
from tests.harness.clusters import CLUSTER, ENDPOINT, setup_cluster
from tests.harness.nodes import Node, NodeNet, Setup
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex


def _forms(token: str) -> list[str]:
    """The token as it could leak: whole, either case, or a good part of it."""
    return [token, token.lower(), token.upper(), token[: len(token) // 2]]


@pytest.mark.parametrize("kind", ["p2p", "tor"])
def test_no_token_in_the_debug_log(
    kind: str,
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    setup_node: Callable[..., Setup],
) -> None:
    s = setup_node(kind)
    s.bridge.stop()  # again at debug level, the same config and tokens
    s.bridge.proc = None
    s.bridge.verbose = True
    s.bridge.start()
    assert s.node.server is not None
    node_token = s.node.server.token
    client = s.bridge.add_token("other", "rw", endpoint=s.node.name)

    # A session that authenticates and relays to the node (PUT, GET, drop).
    content = os.urandom(300_000)
    s.client.add_files({"f.bin": content})
    s.client.annex("copy", "--to", s.remote, "f.bin", timeout=120)
    s.client.annex("drop", "f.bin", timeout=120)
    s.client.annex("get", "--from", s.remote, "f.bin", timeout=120)
    assert s.client.read("f.bin") == content
    s.node.assert_holds({s.client.key("f.bin"): content})

    # Raw sessions that send a token, good or bad, in every wrong way.
    wrong = "feedc0de" * 16
    sock = s.bridge.socket_path(s.node.name)
    lines = [
        f"AUTH {uuid.uuid4()} {wrong}",  # a wrong token: AUTH-FAILURE
        f"AUTH not-a-uuid {client.token}",  # a good token, a bad UUID
        f"AUTH {uuid.uuid4()} {client.token} trailing",  # malformed around a good token
        f"AUTH {uuid.uuid4()} {client.token}%",
        f"{client.token}",  # a token as a command
        f"AUTH {uuid.uuid4()} {wrong}{'0' * 40000}",  # over the line cap
    ]
    for line in lines:
        with RawSession(sock) as raw:
            raw.send_raw(line.encode() + b"\n", may_close=True)
            raw.is_closed(timeout=10)
    with RawSession(sock) as raw:  # AUTH again after AUTH, and a token inside a session
        raw.auth(client.token, s.node.uuid)
        raw.send_line(f"AUTH {raw.client_uuid} {client.token}")
        raw.send_line(f"CHECKPRESENT {client.token}")
        raw.is_closed(timeout=10)
    s.bridge.stop()

    log = s.bridge.log()
    assert " DEBUG " in log, "the daemon did not log at debug level"
    assert "client: AUTH" in log and "<token>" in log, log[-2000:]  # logged, redacted
    assert "authentication failed" in log
    for name, token in (
        ("client", client.token),
        ("node", node_token),
        ("wrong", wrong),
        ("linked client", _linked_token(s)),
    ):
        for form in _forms(token):
            assert form not in log, f"the {name} token is in the daemon's log"
    # Nor in what the bridge keeps at rest besides the node tokens git-annex stores.
    for path in s.bridge.state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for token in (client.token, wrong):
                assert token.encode() not in data, f"a token in {path}"


def _linked_token(s: Setup) -> str:
    """The token the stock client was linked with (git-annex keeps it in its creds)."""
    creds = s.client.path / ".git" / "annex" / "creds"
    for path in creds.iterdir():
        text = path.read_text().strip()
        if text and text.isalnum() and len(text) >= 32:
            return text
    raise AssertionError(f"no token in {sorted(p.name for p in creds.iterdir())}")


# --- what a client hears when a node fails ------------------------------------------------


def _assert_no_internals(text: str, node: Node, s_proxy: Path, bridge: Bridge) -> None:
    assert node.onion is not None and node.server is not None
    secrets = {
        "the node's onion": node.onion.removesuffix(".onion"),
        "the node's token": node.server.token,
        "the proxy's path": str(s_proxy),
        "the bridge's state": str(bridge.state_dir),
    }
    for what, secret in secrets.items():
        for form in _forms(secret):
            assert form not in text, f"{what} reached the client:\n{text[-3000:]}"


def test_a_node_down_tells_the_client_no_internals(setup_node: Callable[..., Setup]) -> None:
    """A tor-annex node behind its own endpoint is down (tor, here our SOCKS
    server, cannot reach its onion): the client hears that the node is
    unreachable; the daemon's log says why."""
    s = setup_node("tor")
    assert s.node.server is not None and s.node.onion is not None
    s.client.add_file("f", b"content\n")
    s.node.server.stop()
    down = s.client.annex("copy", "--to", s.remote, "--debug", "f", check=False)
    assert not down.ok, down.describe()
    errors = p2p_errors(down)
    assert errors and set(errors) == {f"{s.node.name}: unreachable"}, down.describe()[-3000:]
    _assert_no_internals(down.stdout + down.stderr, s.node, s.proxy.path, s.bridge)
    # The operator's log keeps the cause.
    assert "descriptor not found" in s.bridge.log(), s.bridge.log()[-3000:]


def test_a_cluster_node_down_tells_the_client_no_internals(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> None:
    s = setup_cluster(
        make_nodes, make_node_bridge, make_client, proxy_repo, node_net, kinds=("tor",)
    )
    node = s.nodes[0]
    assert node.server is not None
    s.client.add_file("f", b"content\n")
    node.server.stop()
    down = s.client.annex("copy", "--to", ENDPOINT, "--debug", "f", check=False)
    assert not down.ok, down.describe()
    errors = p2p_errors(down)
    told = f"{CLUSTER}: no node stored it ({node.name}: unreachable)"
    assert errors and set(errors) == {told}, down.describe()[-3000:]
    _assert_no_internals(down.stdout + down.stderr, node, proxy_repo.path, s.bridge)
    assert f"{node.name} unreachable" in s.bridge.log()
