"""Onion client authorization and "no address before it works" (issue 15, items 1 and 3).

    stock git-annex (private network namespace) -> forwarder -> client tor
      (ClientOnionAuthDir, control port) -> bridge's onion, [tor] client_auth = true

All on the private Tor network of tests/tor/conftest.py. The tests run in
order on one bridge: `token add` against a daemon that is still publishing
waits and hands out an address that links at once; a client tor without a
key gets tor's "client authorization missing" SOCKS error; with the line
`torbridge client add` printed (as a ClientOnionAuthDir file) the stock
client links, copies and fetches; after `client revoke` it cannot reach the
service; the ONION_CLIENT_AUTH_ADD form works too. Then tor itself checks
how many clients fit in the descriptor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import READY_LINE, Bridge, Expose, parse_tor_lines
from tests.harness.tor import (
    BAD_CLIENT_AUTH,
    MISSING_CLIENT_AUTH,
    STARTED_PIDS,
    TOR_COMMAND_TIMEOUT,
    NetnsAnnexEnv,
    PrivateNetns,
    TorBridge,
    auth_client,
    control,
    netns_unavailable,
    require_tor,
    stop_tor,
)
from tests.harness.tor import socks_error as tor_socks_error
from tests.harness.worlds import HUB_PORT
from torbridge.testnet import TestNet, TorProcess
from torbridge.tor.clientauth import (
    MAX_DESCRIPTOR,
    KeyPair,
    descriptor_size,
    max_clients,
)
from torbridge.tor.onion import PowDefenses, publish

pytestmark = [
    pytest.mark.tor,
    pytest.mark.annex,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8
]

log = logging.getLogger("tests.tor")
T = TOR_COMMAND_TIMEOUT


@dataclass
class AuthWorld:
    net: TestNet
    client_tor: TorProcess
    service_tor: TorProcess
    auth_dir: Path
    netns: PrivateNetns
    env: AnnexEnv
    client_env: NetnsAnnexEnv
    proxy: AnnexRepo
    bridge: TorBridge
    root: Path


@pytest.fixture(scope="module")
def world(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthWorld]:
    require_tor()
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace: {reason}")
    root = tmp_path_factory.mktemp("authworld")
    with contextlib.ExitStack() as stack:
        env = AnnexEnv.create(root / "env")
        machine = stack.enter_context(auth_client(testnet, "caclient", root, env))
        service_tor = testnet.start_service_tor("cahs")
        stack.callback(stop_tor, testnet, service_tor)
        proxy = AnnexRepo.create(env, root / "proxy", "proxy")
        assert machine.tor.socks is not None
        bridge = TorBridge(
            env,
            proxy.path,
            root / "bridge",
            [Expose("hub", ".", HUB_PORT)],
            control=service_tor.control,
            socks=machine.tor.socks,
            tor={"client_auth": True},
        )
        stack.callback(stop_bridge, bridge)
        yield AuthWorld(
            testnet,
            machine.tor,
            service_tor,
            machine.auth_dir,
            machine.netns,
            env,
            machine.env,
            proxy,
            bridge,
            root,
        )


def stop_bridge(bridge: TorBridge) -> None:
    if bridge.running:
        bridge.stop(timeout=30)
    bridge.close()


def socks_error(world: AuthWorld, onion: str) -> int | None:
    """The client tor's SOCKS5 reply code for onion:HUB_PORT (None: it connected)."""
    code = tor_socks_error(world.client_tor, onion, HUB_PORT)
    log.info("SOCKS reply for %s: %s", onion, "connected" if code is None else hex(code))
    return code


def client(world: AuthWorld, name: str) -> Client:
    return Client.create(world.client_env, world.root / "clients" / name, name)


def test_token_add_waits_for_the_onion_and_the_address_works_at_once(world: AuthWorld) -> None:
    """Item 3. The daemon is started and `token add` is run while it publishes:
    the line comes out only once tor has the descriptor. (Client auth is on,
    with no client yet: linking is checked in the next test, with a key.)"""
    bridge = world.bridge
    Bridge.start(bridge, timeout=60)  # the sockets listen; no wait for READY
    assert bridge.proc is not None
    STARTED_PIDS.add(bridge.proc.pid)
    deadline = time.monotonic() + 60
    while not (bridge.state_dir / "control.sock").exists():
        assert time.monotonic() < deadline, bridge.log()
        time.sleep(0.05)
    result = bridge.cli("token", "add", "alice", timeout=240)
    assert READY_LINE in bridge.log(), "token add returned before the onion was published"
    assert "warning" not in result.stderr, result.describe()
    [line] = parse_tor_lines(result.stdout)
    assert line.onion == bridge.onion
    status = bridge.cli("status").stdout
    assert f"onion: {bridge.onion} (published" in status, status
    (world.root / "alice.line").write_text(line.line)


def test_without_a_key_tor_says_client_authorization_missing(world: AuthWorld) -> None:
    """A tor that has the address but no key cannot even reach the service."""
    code = socks_error(world, world.bridge.onion)
    assert code == MISSING_CLIENT_AUTH, hex(code or 0)
    c = client(world, "nokey")
    failed = c.link((world.root / "alice.line").read_text(), "hub", check=False, timeout=T)
    assert not failed.ok, failed.describe()
    totals = json.loads(world.bridge.cli("status", "--json").stdout)["totals"]
    assert totals.get("sessions_total", 0) == 0, totals  # nothing reached the daemon


def test_the_printed_key_lets_the_stock_client_in(world: AuthWorld) -> None:
    bridge = world.bridge
    out = bridge.cli("client", "add", "laptop", timeout=240)
    assert "warning" not in out.stderr, out.describe()
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith("#")]
    file_line, control_line = lines
    onion_id = bridge.onion.removesuffix(".onion")
    assert file_line.startswith(f"{onion_id}:descriptor:x25519:")
    assert control_line.startswith(f"ONION_CLIENT_AUTH_ADD {onion_id} x25519:")
    assert "laptop" in bridge.cli("client", "list").stdout
    # The client machine's tor: the line in ClientOnionAuthDir, then a reload.
    path = world.auth_dir / "laptop.auth_private"
    path.write_text(file_line + "\n")
    path.chmod(0o600)
    assert control(world.client_tor, "SIGNAL RELOAD").startswith("250 OK"), "reload refused"

    alice = client(world, "alice")
    alice.link((world.root / "alice.line").read_text(), "hub", timeout=T)
    content = b"behind client auth\n" + os.urandom(40_000)
    alice.add_files({"a.bin": content}, "a")
    alice.annex("copy", "--to", "hub", "--", "a.bin", timeout=T)
    assert world.proxy.key_content(alice.key("a.bin")) == content
    alice.annex("drop", "--", "a.bin", timeout=T)
    alice.annex("get", "--from", "hub", "--", "a.bin", timeout=T)
    assert alice.read("a.bin") == content
    (world.root / "control.line").write_text(control_line)


def test_revoked_key_cannot_reach_the_service_and_the_control_port_form_works(
    world: AuthWorld,
) -> None:
    bridge = world.bridge
    out = bridge.cli("client", "revoke", "laptop", timeout=240)
    assert "revoked; the onion is published without its key" in out.stderr, out.describe()
    assert "laptop" not in bridge.cli("client", "list").stdout
    alice = Client(world.client_env, world.root / "clients" / "alice")
    alice.add_files({"b.bin": b"after revoke\n"}, "b")
    failed = alice.annex("copy", "--to", "hub", "--", "b.bin", check=False, timeout=T)
    assert not failed.ok, failed.describe()
    assert not world.proxy.has_key(alice.key("b.bin"))
    # The client tor's cached descriptor may name the old introduction points
    # for one more try; then it fetches the new one and cannot decrypt it.
    codes = [socks_error(world, bridge.onion) for _ in range(3)]
    assert None not in codes, codes
    assert codes[-1] in (MISSING_CLIENT_AUTH, BAD_CLIENT_AUTH), [hex(c or 0) for c in codes]

    # A new key, given through the client tor's control port this time.
    out = bridge.cli("client", "add", "laptop2", timeout=240)
    control_line = out.stdout.splitlines()[-1]
    assert control_line.startswith("ONION_CLIENT_AUTH_ADD ")
    (world.auth_dir / "laptop.auth_private").unlink()
    reply = control(world.client_tor, control_line)
    # 251: it replaced the (revoked) key the ClientOnionAuthDir file gave it
    assert reply.startswith(("250 OK", "251 ")), reply
    alice.annex("copy", "--to", "hub", "--", "b.bin", timeout=T)
    assert world.proxy.key_content(alice.key("b.bin")) == b"after revoke\n"


def test_sighup_republishes_only_when_the_ports_change(world: AuthWorld) -> None:
    """Item 4 over Tor: a reload that changes a limit leaves the onion alone;
    one that adds an endpoint publishes it again, and the stock client links
    the new port at once."""
    bridge = world.bridge
    assert bridge.proc is not None
    publications = bridge.log().count("published again")
    bridge.config_path.write_text(bridge.config_text() + "\n[limits]\nidle_timeout = 1800\n")
    bridge.proc.send_signal(signal.SIGHUP)
    wait_log(bridge, "configuration reloaded", 1)
    assert bridge.log().count("published again") == publications
    bridge.exposes.append(Expose("second", ".", HUB_PORT + 2))
    bridge.write_config()
    bridge.proc.send_signal(signal.SIGHUP)
    wait_log(bridge, "configuration reloaded", 2)
    assert "the onion's ports changed; publishing it again" in bridge.log()
    assert bridge.log().count("published again") == publications + 1
    result = bridge.cli("token", "add", "second-user", "--endpoint", "second", timeout=240)
    [line] = parse_tor_lines(result.stdout)
    assert line.port == HUB_PORT + 2 and line.onion == bridge.onion
    c = client(world, "second")
    c.link(line.line, "second", timeout=T)
    c.add_files({"s.bin": b"through the port a reload added\n"}, "s")
    c.annex("copy", "--to", "second", "--", "s.bin", timeout=T)
    assert world.proxy.key_content(c.key("s.bin")) == b"through the port a reload added\n"


def wait_log(bridge: TorBridge, text: str, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while bridge.log().count(text) < count:
        assert time.monotonic() < deadline, bridge.log()[-3000:]
        time.sleep(0.1)


def test_status_shows_the_publishing_tors_health(world: AuthWorld) -> None:
    """Item 2: bootstrap, network, introduction points and the uploads per HSDir,
    as the daemon polls them from its service tor (every 20 s)."""
    deadline = time.monotonic() + 120
    while True:
        tor = json.loads(world.bridge.cli("status", "--json").stdout)["tor"]
        uploaded = [u for u in tor["uploads"].values() if u["result"] == "uploaded"]
        if tor["intro_points"] and uploaded:
            break
        assert time.monotonic() < deadline, tor
        time.sleep(2)
    assert tor["bootstrap_percent"] == 100 and tor["network"] == "up", tor
    assert tor["state"] == "ok" and tor["upload_failures_total"] == 0, tor
    assert tor["last_publish_age_seconds"] is not None, tor
    text = world.bridge.cli("status").stdout
    assert "tor: ok; bootstrap 100%, network up, " in text, text
    assert "introduction points" in text and ": uploaded " in text, text
    metrics = world.bridge.cli("status", "--metrics").stdout
    assert (
        "torbridge_onion_degraded 0" in metrics and "torbridge_tor_bootstrap_percent 100" in metrics
    ), metrics


def test_the_clients_that_fit_fit_in_tors_descriptor(world: AuthWorld, tmp_path: Path) -> None:
    """max_clients() keys: tor builds and uploads the descriptor, under 50 KB
    and under our estimate (so the refusal never comes too late)."""
    n = max_clients()
    keys = [KeyPair.new().public_base32 for _ in range(n)]
    with world.service_tor.controller() as c:
        for count, which in ((1, keys[:1]), (n, keys)):
            state = tmp_path / str(count)
            state.mkdir()
            onion = publish(
                c,
                state,
                {5000: tmp_path / "x.sock"},
                32,
                180,
                pow_defenses=PowDefenses(),
                client_keys=which,
            )
            size = len(c.get_info(f"hs/service/desc/id/{onion.removesuffix('.onion')}"))
            log.info(
                "descriptor with %d clients: %d bytes (estimate %d)",
                count,
                size,
                descriptor_size(count),
            )
            assert size <= descriptor_size(count) <= MAX_DESCRIPTOR, (count, size)
