"""A quiet session's node connection is stopped and reopened, and the client never knows.

Every kind of node (a p2p-annex program, a tor-annex node through SOCKS, a
remote git-annex-shell proxies) with ``[limits] peer_idle = 1``: one stock
git-annex process (``--batch``, one pooled connection) copies a file, stays
quiet until the bridge has stopped its node connection, then copies and
gets more on the same connection. A node's git-annex serves at most 100
P2P connections at a time, so quiet bridge sessions must not hold them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from functools import partial

import pytest

from tests.harness.bridge import Bridge
from tests.harness.client import Batch
from tests.harness.nodes import KINDS, Setup
from tests.harness.process import wait_for as harness_wait_for

pytestmark = pytest.mark.annex

# The harness's poll, with e2e's idle-test deadline (the machine is shared).
wait_for = partial(harness_wait_for, timeout=90.0)


def stopped_idle(bridge: Bridge) -> int:
    totals = json.loads(bridge.cli("status", "--json").stdout)["totals"]
    return int(totals.get("peers_stopped_idle_total", 0))


def sessions(bridge: Bridge) -> list[int]:
    return [s["id"] for s in json.loads(bridge.cli("status", "--json").stdout)["sessions"]]


@pytest.fixture
def batches() -> Iterator[Callable[..., Batch]]:
    started: list[Batch] = []

    def start(*args: object) -> Batch:
        started.append(Batch(*args))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.wait()


@pytest.mark.parametrize("kind", KINDS)
def test_node_connection_stopped_while_quiet(
    kind: str, setup_node: Callable[..., Setup], batches: Callable[..., Batch]
) -> None:
    s = setup_node(kind, limits={"peer_idle": 1})
    client, node, bridge, remote = s.client, s.node, s.bridge, s.remote
    files = {f"f{i}.bin": os.urandom(40_000 + i) for i in range(3)}
    client.add_files(files)
    keys = {name: client.key(name) for name in files}

    copy = batches(client, "copy", "--to", remote)
    copy.do("f0.bin")
    wait_for("one session", lambda: len(sessions(bridge)) == 1)
    [sid] = sessions(bridge)
    wait_for("the node connection to be stopped", lambda: stopped_idle(bridge) >= 1)
    copy.do("f1.bin")
    copy.do("f2.bin")
    assert sessions(bridge) == [sid], "the client's connection was not kept"
    copy.close()
    node.assert_holds({keys[n]: files[n] for n in files})

    client.annex("drop", *files)
    before = stopped_idle(bridge)
    get = batches(client, "get", "--from", remote)
    get.do("f0.bin")
    wait_for("the node connection to be stopped", lambda: stopped_idle(bridge) > before)
    get.do("f1.bin")
    get.close()
    assert client.read("f0.bin") == files["f0.bin"]
    assert client.read("f1.bin") == files["f1.bin"]
    client.fsck("--from", remote)
    node.assert_sound()
    assert "protocol version changed" not in bridge.log()
