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

from tests.e2e.harness import Client
from tests.tor.balanceworld import ENDPOINT, PORT, BalanceWorld, whereis
from tests.tor.conftest import require_tor
from tests.tor.torpath import TOR_COMMAND_TIMEOUT, netns_unavailable
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
        seen = [whereis(h, key) & nodes for h in (world.host_a, world.host_b)]
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
    sessions = {n: b.sessions() for n, b in world.bridges.items()}
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
    world.say(f"B sessions {b.sessions()}, A sessions {world.bridges['A'].sessions()}")
    assert b.log().count("CONNECT") >= relayed_before


def test_one_instance_stopped(world: BalanceWorld) -> None:
    clients = _clients(world)
    world.stop_instance("B")
    t0 = time.monotonic()
    before = world.bridges["A"].sessions()
    c = clients[0]
    c.add_file("after-stop.bin", b"x" * 50_000)
    # Measured: the first attempt can fail after tor's 120 s SocksTimeout
    # (SocksErrorTTLExpired) while the client still holds a frontend
    # descriptor listing B's introduction points; a retry after Onionbalance
    # republished without B goes through A.
    attempts = []
    while True:
        r = c.annex("copy", "--to", ENDPOINT, "after-stop.bin", check=False, timeout=T)
        attempts.append(round(time.monotonic() - t0, 1))
        if r.ok:
            break
        assert time.monotonic() - t0 < 600, f"no copy through A in 600 s: {r.describe()}"
    world.say(f"copy attempts after B stopped ended at {attempts} s")
    waited = time.monotonic() - t0
    world.timings["copy after B stopped"] = waited
    world.say(f"first copy after instance B stopped took {waited:.1f}s")
    for i in range(4):
        assert world.probe(f"after-stop{i}", timeout=120)
    assert world.bridges["A"].sessions() > before
    assert PORT == 5001
    Path(world.root / "timings.txt").write_text(repr(world.timings))
