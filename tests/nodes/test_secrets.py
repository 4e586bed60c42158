"""No token in the daemon's log, even at debug level, over real sessions.

A stock client links to a node's endpoint and moves content through it (the
bridge authenticates to the node with the node's token), raw sessions fail
AUTH in every way a token can be sent wrong, and the whole debug log is then
searched for each token: the client's, the node's, and the wrong ones.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from tests.e2e.harness import RawSession
from tests.nodes.conftest import Setup
from tests.nodes.nodes import Node, NodeBridge

pytestmark = pytest.mark.annex


def _forms(token: str) -> list[str]:
    """The token as it could leak: whole, either case, or a good part of it."""
    return [token, token.lower(), token.upper(), token[: len(token) // 2]]


@pytest.mark.parametrize("kind", ["p2p", "tor"])
def test_no_token_in_the_debug_log(
    kind: str,
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., NodeBridge],
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
    for name, token in (("client", client.token), ("node", node_token), ("wrong", wrong),
                        ("linked client", _linked_token(s))):
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
