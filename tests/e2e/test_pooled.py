"""Pooled connections: the stock client keeps its P2P connections open
between transfers, and one the server closed costs it a transfer.

git-annex's Remote/P2P.hs takes a connection from its pool for each
request and puts it back after; it does not notice that the server closed
it until it uses it again, and then fails that request ("Lost connection to
peer") without retrying. ``git annex copy --batch`` drives one git-annex
process through several transfers with a pause between them, as a long
``sync --content`` or the assistant does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import batch_copy
from tests.harness.process import wait_for

pytestmark = pytest.mark.annex


@pytest.fixture
def make_limits_bridge(make_bridge: Callable[..., Bridge]) -> Callable[[dict[str, float]], Bridge]:
    """A running daemon for the proxy's own repository, with a [limits] table."""

    def make(limits: dict[str, float]) -> Bridge:
        b = make_bridge(limits=limits)  # registered for teardown and the failure report
        b.start()
        return b

    return make


def three_files(client: Client) -> dict[str, bytes]:
    files = {f"f{i}": os.urandom(3000 + i) for i in range(3)}
    client.add_files(files)
    return files


def test_a_server_closed_pooled_connection_costs_the_stock_client_a_transfer(
    make_limits_bridge: Callable[[dict[str, float]], Bridge],
    client: Client,
    proxy_repo: AnnexRepo,
) -> None:
    """The finding, with an operator-set idle_timeout: the transfer after the
    close fails, the one after it (on a new connection) works."""
    bridge = make_limits_bridge({"idle_timeout": 1})
    client.link(bridge.add_token("client", "rw").line, "hub")
    three_files(client)
    with batch_copy(client, "hub") as batch:
        assert batch.copy("f0")["success"] is True
        # The daemon ends the idle session; the client's pool still holds it.
        wait_for(
            "the idle session ended",
            lambda: (
                "client lost" in bridge.log() or "no message before the deadline" in bridge.log()
            ),
        )
        second = batch.copy("f1")
        third = batch.copy("f2")
        transcript = batch.close()
    assert second["success"] is False, second
    assert "Lost connection to peer" in json.dumps(second) + transcript
    assert third["success"] is True, third
    assert proxy_repo.has_key(client.key("f2")) and not proxy_repo.has_key(client.key("f1"))


def test_default_keeps_pooled_connections_and_closes_only_the_idle_peer(
    make_limits_bridge: Callable[[dict[str, float]], Bridge],
    client: Client,
    proxy_repo: AnnexRepo,
) -> None:
    """Defaults (idle_timeout none), with a short peer_idle: the session's
    git-annex-shell goes away while the client is idle, the client's pooled
    connection stays, and every later transfer on it works."""
    bridge = make_limits_bridge({"peer_idle": 1})
    client.link(bridge.add_token("client", "rw").line, "hub")
    files = three_files(client)
    linked = bridge.log().count("session start")  # `p2p --link` made one
    with batch_copy(client, "hub") as batch:
        assert batch.copy("f0")["success"] is True
        wait_for("the idle peer closed", lambda: not bridge.session_processes())
        assert batch.copy("f1")["success"] is True
        wait_for("the idle peer closed again", lambda: not bridge.session_processes())
        assert batch.copy("f2")["success"] is True
        transcript = batch.close()
    assert "Lost connection" not in transcript
    for name, content in files.items():
        assert proxy_repo.key_content(client.key(name)) == content
    # One connection served all three.
    assert bridge.log().count("session start") == linked + 1, bridge.log()
