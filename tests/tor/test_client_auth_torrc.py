"""Client authorization in the torrc mode, and tor's MetricsPort, against a real tor (issue 15).

    stock git-annex (private network namespace) -> forwarder -> client tor
      (ClientOnionAuthDir) -> the onion of HiddenServiceDir (the lines of
      `torbridge onion-snippet`, in the service tor's torrc) -> torbridge,
      [tor] onion = "torrc", client_auth = true, control = that tor

All on the private Tor network of tests/tor/conftest.py. The tests run in
order on one daemon: started with no client, it makes tor's
authorized_clients/ hold a key nobody has, so a tor without a key gets
"client authorization missing"; `client add` (tor reloaded through the
control port) lets the stock client in; `client revoke` shuts it out once
tor's introduction points rotate (what the operator guide promises: a
reload keeps them, a restart does not). Then a daemon in the ephemeral mode
on the same tor reads the proof-of-work figures from tor's MetricsPort.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Expose, parse_tor_lines
from tests.harness.process import wait_for
from tests.harness.tor import (
    BAD_CLIENT_AUTH,
    MISSING_CLIENT_AUTH,
    TOR_COMMAND_TIMEOUT,
    NetnsAnnexEnv,
    PrivateNetns,
    TorBridge,
    auth_client,
    control,
    hs_event_count,
    netns_unavailable,
    require_tor,
    restart_tor,
    stop_tor,
    wait_for_upload,
)
from tests.harness.tor import socks_error as tor_socks_error
from tests.harness.worlds import HUB_PORT
from torbridge.testnet import TestNet, TorProcess, free_ports
from torbridge.tor.clientauth import NOBODY_FILE
from torbridge.tor.health import parse_metrics, scrape

pytestmark = [
    pytest.mark.tor,
    pytest.mark.annex,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8
]

log = logging.getLogger("tests.tor")
T = TOR_COMMAND_TIMEOUT


class TorrcBridge(TorBridge):
    """A daemon in the torrc mode: its address is in tor's HiddenServiceDir."""

    @property
    def onion(self) -> str:
        return (Path(str(self.tor["hidden_service_dir"])) / "hostname").read_text().strip()


@dataclass
class TorrcWorld:
    net: TestNet
    client_tor: TorProcess
    service_tor: TorProcess
    auth_dir: Path
    hs_dir: Path
    metrics_port: str
    netns: PrivateNetns
    env: AnnexEnv
    client_env: NetnsAnnexEnv
    proxy: AnnexRepo
    bridge: TorBridge
    root: Path
    others: list[TorBridge] = field(default_factory=list)

    def failure_sections(self) -> list[tuple[str, str]]:
        daemons = [self.bridge, *self.others]
        sections = [(f"torbridge log ({b.workdir.name})", b.log()[-20000:]) for b in daemons]
        sections += [(f"tor {t.name}", t.log_tail(30)) for t in (self.client_tor, self.service_tor)]
        return sections


@pytest.fixture(scope="module")
def world(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorrcWorld]:
    require_tor()
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace: {reason}")
    root = tmp_path_factory.mktemp("torrcauth")
    hs_dir = root / "hs"
    w: TorrcWorld | None = None
    service: list[TorProcess] = []
    with contextlib.ExitStack() as stack:
        env = AnnexEnv.create(root / "env")
        machine = stack.enter_context(auth_client(testnet, "tcclient", root, env))
        proxy = AnnexRepo.create(env, root / "proxy", "proxy")
        assert machine.tor.socks is not None
        bridge = TorrcBridge(
            env,
            proxy.path,
            root / "bridge",
            [Expose("hub", ".", HUB_PORT)],
            socks=machine.tor.socks,
            tor={"onion": "torrc", "hidden_service_dir": hs_dir, "client_auth": True},
        )

        def teardown() -> None:
            """The daemons first, then the service tor (the world's, if it
            was restarted)."""
            for b in [bridge, *(w.others if w is not None else [])]:
                if b.running:
                    b.stop(timeout=30)
                b.close()
            for tor in [w.service_tor] if w is not None else service:
                if tor.process.poll() is None:
                    stop_tor(testnet, tor)

        stack.callback(teardown)
        # The operator's steps: the snippet into tor's configuration, tor
        # (re)started, then [tor] control so torbridge can reload it.
        snippet = bridge.cli("onion-snippet").stdout
        lines = [ln for ln in snippet.splitlines() if ln and not ln.startswith("#")]
        assert (
            f"HiddenServiceDir {hs_dir}" in lines and "HiddenServicePoWDefensesEnabled 1" in lines
        )
        metrics_port = f"127.0.0.1:{free_ports(1)[0]}"
        service_tor = testnet.start_service_tor(
            "tchs",
            extra=[*lines, f"MetricsPort {metrics_port}", "MetricsPortPolicy accept 127.0.0.1"],
        )
        service.append(service_tor)
        bridge.set_control(service_tor.control)
        wait_for("tor to make the onion's hostname", (hs_dir / "hostname").exists, 60)
        w = TorrcWorld(
            testnet,
            machine.tor,
            service_tor,
            machine.auth_dir,
            hs_dir,
            metrics_port,
            machine.netns,
            env,
            machine.env,
            proxy,
            bridge,
            root,
        )
        yield w


def client(world: TorrcWorld, name: str) -> Client:
    return Client.create(world.client_env, world.root / "clients" / name, name)


def socks_error(world: TorrcWorld) -> int | None:
    """The client tor's SOCKS5 reply code for the onion's hub port (None: it connected)."""
    return tor_socks_error(world.client_tor, world.bridge.onion, HUB_PORT)


def wait_reachable(world: TorrcWorld, timeout: float = 180) -> None:
    """Until the client tor connects: it may still hold the descriptor it
    could not decrypt, and asks an HSDir again only after a while."""
    deadline = time.monotonic() + timeout
    codes = []
    while (code := socks_error(world)) is not None:
        codes.append(hex(code))
        assert time.monotonic() < deadline, codes
        time.sleep(1)
    log.info("reachable after SOCKS errors %s", codes)


def wait_unreachable(world: TorrcWorld, timeout: float = 120) -> int:
    """Until the client tor gets a SOCKS error (which is returned)."""
    deadline = time.monotonic() + timeout
    while (code := socks_error(world)) is None:
        assert time.monotonic() < deadline, "the client tor still reaches the service"
        time.sleep(1)
    return code


def test_started_with_no_client_nobody_without_a_key_gets_in(world: TorrcWorld) -> None:
    """client_auth = true holds from the daemon's start, before any `client add`:
    tor is given a key nobody holds, and a tor without a key cannot reach it."""
    since = hs_event_count(world.service_tor)
    world.bridge.start(timeout=180)
    log_text = world.bridge.log()
    assert "nobody can reach the onion until `torbridge client add NAME`" in log_text, log_text
    assert "tor reloaded and uploaded" in log_text, log_text
    files = sorted(p.name for p in (world.hs_dir / "authorized_clients").iterdir())
    assert files == [NOBODY_FILE], files
    wait_for_upload(world.net, world.service_tor, world.bridge.onion, since)
    line = world.bridge.tor_lines("alice")[HUB_PORT]
    (world.root / "alice.line").write_text(line.line)
    assert socks_error(world) == MISSING_CLIENT_AUTH
    failed = client(world, "nokey").link(line.line, "hub", check=False, timeout=T)
    assert not failed.ok, failed.describe()
    totals = json.loads(world.bridge.cli("status", "--json").stdout)["totals"]
    assert totals.get("sessions_total", 0) == 0, totals  # nothing reached the daemon


def test_client_add_reloads_tor_and_the_stock_client_links(world: TorrcWorld) -> None:
    bridge = world.bridge
    out = bridge.cli("client", "add", "laptop", timeout=240)
    assert "warning" not in out.stderr, out.describe()
    assert "tor reloaded and uploaded" in out.stderr, out.describe()
    files = sorted(p.name for p in (world.hs_dir / "authorized_clients").iterdir())
    assert files == ["laptop.auth"], files
    file_line = next(ln for ln in out.stdout.splitlines() if ":descriptor:x25519:" in ln)
    path = world.auth_dir / "laptop.auth_private"
    path.write_text(file_line + "\n")
    path.chmod(0o600)
    assert control(world.client_tor, "SIGNAL RELOAD").startswith("250 OK"), "reload refused"
    wait_reachable(world)

    alice = client(world, "alice")
    alice.link((world.root / "alice.line").read_text(), "hub", timeout=T)
    content = b"torrc mode, behind client auth\n" + os.urandom(40_000)
    alice.add_files({"a.bin": content}, "a")
    alice.annex("copy", "--to", "hub", "--", "a.bin", timeout=T)
    assert world.proxy.key_content(alice.key("a.bin")) == content
    alice.annex("drop", "--", "a.bin", timeout=T)
    alice.annex("get", "--from", "hub", "--", "a.bin", timeout=T)
    assert alice.read("a.bin") == content


def test_client_revoke_shuts_the_client_out_once_tor_restarts(world: TorrcWorld) -> None:
    """As the operator guide says: the reload gives tor the new client list and
    `client revoke` closes the rendezvous circuits, but the introduction
    points stay, so a client tor that kept the descriptor still gets in;
    after `systemctl restart tor` (here: the service tor restarted on its
    torrc) it cannot reach the service at all."""
    bridge = world.bridge
    out = bridge.cli("client", "revoke", "laptop", timeout=240)
    assert "warning" not in out.stderr, out.describe()
    assert "restart tor" in out.stderr, out.describe()
    files = sorted(p.name for p in (world.hs_dir / "authorized_clients").iterdir())
    assert files == [NOBODY_FILE], files
    kept = socks_error(world)
    log.info("revoked, with the old descriptor in its tor: SOCKS %s", kept)
    assert kept is None, hex(kept or 0)

    world.service_tor = restart_tor(world.net, world.service_tor)  # `systemctl restart tor`
    wait_for_upload(world.net, world.service_tor, bridge.onion, 0)  # a new tor: its own events
    code = wait_unreachable(world)
    assert code in (MISSING_CLIENT_AUTH, BAD_CLIENT_AUTH), hex(code)
    alice = Client(world.client_env, world.root / "clients" / "alice")
    alice.add_files({"b.bin": b"after revoke\n"}, "b")
    failed = alice.annex("copy", "--to", "hub", "--", "b.bin", check=False, timeout=T)
    assert not failed.ok, failed.describe()
    assert not world.proxy.has_key(alice.key("b.bin"))
    codes = [socks_error(world) for _ in range(2)]
    assert all(c in (MISSING_CLIENT_AUTH, BAD_CLIENT_AUTH) for c in codes), codes


def test_status_shows_pow_figures_from_tors_metrics_port(world: TorrcWorld) -> None:
    """tor's MetricsPort, as the daemon reads it: the proof-of-work suggested
    effort and the rejected introductions of its (ephemeral) onion, whose
    ADD_ONION turned the defense on."""
    eph = TorBridge(
        world.env,
        world.proxy.path,
        world.root / "ephemeral",
        [Expose("hub", ".", HUB_PORT)],
        control=world.service_tor.control,
        socks=world.client_tor.socks or "",
        tor={"metrics_port": world.metrics_port},
    )
    world.others.append(eph)
    eph.start()
    service_id = eph.onion.removesuffix(".onion")
    text = scrape(world.metrics_port)
    ours = [ln for ln in text.splitlines() if service_id in ln]
    log.info("tor's metrics for the onion:\n%s", "\n".join(ours))
    figures = parse_metrics(text, service_id)
    assert "pow_suggested_effort" in figures and "intro_rejected_total" in figures, ours
    deadline = time.monotonic() + 120
    while True:
        tor = json.loads(eph.cli("status", "--json").stdout)["tor"]
        if tor["pow_suggested_effort"] is not None:
            break
        assert time.monotonic() < deadline, tor
        time.sleep(1)
    assert tor["intro_rejected_total"] is not None and tor["poll_error"] is None, tor
    assert tor["pow_suggested_effort"] >= 0 and tor["intro_rejected_total"] >= 0, tor
    assert "PoW suggested effort" in eph.cli("status").stdout
    line = eph.tor_lines("bob")[HUB_PORT]
    assert line.onion == eph.onion and parse_tor_lines(line.line)
