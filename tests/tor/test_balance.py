"""Two bridge hosts behind one Onionbalance frontend, stock clients (docs/scale-out.md).

One module, one private network of 3 authorities and 4 relays (7 HSDirs:
Onionbalance's hash ring needs them), shared by the tests below in order.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.annex import Client, whereis_uuids
from tests.harness.balanceworld import ENDPOINT, BalanceWorld
from tests.harness.tor import TOR_COMMAND_TIMEOUT, netns_unavailable, require_tor
from torbridge.testnet import ONIONBALANCE_MIN_HSDIRS, TestNet

pytestmark = [pytest.mark.tor, pytest.mark.annex]
log = logging.getLogger("tests.tor.balance")
T = TOR_COMMAND_TIMEOUT
CONVERGE = 120.0  # seconds for the hosts' location logs to meet (a few sync intervals)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalanceWorld]:
    require_tor()
    pytest.importorskip("onionbalance")
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    with TestNet(progress=log.info, relays=ONIONBALANCE_MIN_HSDIRS - 3) as net:
        net.start()
        w = BalanceWorld(net, tmp_path_factory.mktemp("balance"), progress=log.info)
        try:
            yield w
        finally:
            w.close()


def _clients(world: BalanceWorld) -> list[Client]:
    found = getattr(world, "_test_clients", None)
    if found is None:
        found = []
        for i in range(world.n_clients):
            c = world.client(f"client{i}")
            line = world.tokens[f"client{i}"]
            assert world.frontend in line  # token add printed the FRONTEND address
            c.link(line, ENDPOINT, timeout=T)
            assert c.remote_uuid(ENDPOINT) == world.cluster_uuid
            c.annex("pull", "--no-content", ENDPOINT, timeout=T)  # brings cluster.log
            found.append(c)
        world._test_clients = found  # type: ignore[attr-defined]
    return found


def _wait_logged(world: BalanceWorld, key: str, present: bool) -> float:
    """Until both hosts' location logs agree on the nodes having ``key``; seconds taken."""
    nodes = {n.uuid for n in world.nodes.values()}
    t0 = time.monotonic()
    while True:
        seen = [whereis_uuids(h, key) & nodes for h in (world.host_a, world.host_b)]
        if all((s == nodes) if present else not s for s in seen):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < CONVERGE, f"logs did not meet for {key}: {seen}"
        time.sleep(1)


def test_copy_get_drop_through_the_frontend(world: BalanceWorld) -> None:
    clients = _clients(world)
    for i, c in enumerate(clients):
        data = os.urandom(200_000 + i)
        c.add_file(f"f{i}.bin", data)
        key = c.key(f"f{i}.bin")
        c.annex("copy", "--to", ENDPOINT, f"f{i}.bin", timeout=T)
        for node in world.nodes.values():
            assert node.has_key(key) and node.key_content(key) == data
        world.say(f"client{i}: logs met {_wait_logged(world, key, True):.1f}s after the copy")
        c.annex("drop", "--force", f"f{i}.bin")
        c.annex("get", "--from", ENDPOINT, f"f{i}.bin", timeout=T)
        assert c.read(f"f{i}.bin") == data
        c.annex("drop", "--from", ENDPOINT, f"f{i}.bin", "--force", timeout=T)
        assert not any(node.has_key(key) for node in world.nodes.values())
    sessions = {n: b.session_starts() for n, b in world.bridges.items()}
    world.say(f"sessions per instance: {sessions}")
    assert all(sessions.values()), sessions  # both instances served clients


def test_git_push_lands_in_the_owner_whichever_instance(world: BalanceWorld) -> None:
    clients = _clients(world)
    relayed_before = world.bridges["B"].log().count("CONNECT")
    for round_ in range(2):
        for i, c in enumerate(clients):
            branch = f"c{i}r{round_}"
            c.commit_git_file(f"notes-{branch}.txt", branch.encode(), f"note {branch}")
            c.git("push", ENDPOINT, f"HEAD:refs/heads/{branch}", timeout=T)
            c.git("pull", ENDPOINT, f"{branch}", timeout=T)
    heads_a = world.host_a.git("for-each-ref", "--format=%(refname:short)", "refs/heads").stdout
    heads_b = world.host_b.git("for-each-ref", "--format=%(refname:short)", "refs/heads").stdout
    for i in range(len(clients)):
        for round_ in range(2):
            assert f"c{i}r{round_}" in heads_a.split()  # every push reached the owner
            assert f"c{i}r{round_}" not in heads_b.split()  # none stayed on B
    # B served some of these sessions (the gate proved B reachable; with 12
    # pushes and pulls spread at random, B gets some) and relayed their CONNECTs.
    b = world.bridges["B"]
    world.say(f"B sessions {b.session_starts()}, A sessions {world.bridges['A'].session_starts()}")
    assert b.log().count("CONNECT") >= relayed_before


def test_instance_drained_then_stopped(world: BalanceWorld) -> None:
    """The planned removal of an instance (docs/scale-out.md, "When an
    instance dies"): drained first, then stopped, no client waits.

    Stopped without the drain, a client that introduces itself through one
    of the stopped instance's introduction points in the first seconds gets
    an INTRODUCE_ACK (the point has not yet learnt that the circuit behind
    it closed), waits ~80 s for a rendezvous that never comes and fails at
    tor's SocksTimeout (120 s); bench/bench_balance.py measures that. After
    the drain the client holds no descriptor listing B, so nothing can
    bring it to B's introduction points."""
    clients = _clients(world)
    waited = world.drain("B")
    world.timings["drain B"] = waited
    world.say(f"B drained: the client holds a frontend descriptor without B after {waited:.1f}s")
    a, b = world.bridges["A"], world.bridges["B"]
    world.stop_instance("B")
    b_before = b.session_starts()
    before = (a.session_starts("client0"), a.session_starts("probe"))
    c = clients[0]
    c.add_file("after-stop.bin", b"x" * 50_000)
    t0 = time.monotonic()
    c.annex("copy", "--to", ENDPOINT, "after-stop.bin", timeout=T)  # the first attempt
    took = world.timings["copy after B stopped"] = time.monotonic() - t0
    world.say(f"first copy after instance B stopped took {took:.1f}s")
    key = c.key("after-stop.bin")
    assert all(node.has_key(key) for node in world.nodes.values())
    for i in range(4):
        assert world.probe(f"after-stop{i}", timeout=120)
    assert a.session_starts("client0") > before[0]  # the copy went through A
    assert a.session_starts("probe") == before[1] + 4  # and every probe
    assert b.session_starts() == b_before
    Path(world.root / "timings.txt").write_text(repr(world.timings))
