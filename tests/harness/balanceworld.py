"""Two bridge hosts behind one Onionbalance frontend, on a private Tor network.

For tests/tor/test_balance.py and bench/bench_balance.py (docs/scale-out.md):

    stock git-annex clients (private namespace; the forwarder gives each
    connection a SOCKS username of its own) -> client tor -> FRONTEND
    address -> instance A's or B's intro points -> torbridge A | B
    (endpoint "cl", cluster tbcluster) -> nodes c1, c2 (path remotes both
    hosts proxy)

Host A owns the git repository; host B is a clone that relays CONNECT to
A's instance onion and syncs its git-annex branch with A through a
p2p-annex remote "owner". Onionbalance runs as ``torbridge balance run
--testnet`` on a tor of its own. Every tor is the TestNet's (127.0.0.1).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import socks  # type: ignore[import-untyped]
import stem  # type: ignore[import-untyped]

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import TOR_LINE, Expose
from tests.harness.tor import (
    REPO_ROOT,
    STARTED_PIDS,
    NetnsAnnexEnv,
    PrivateNetns,
    TorBridge,
    TorPathError,
    stop_tor,
)
from tests.harness.worlds import WorldBase
from torbridge.testnet import TestNet

PORT = 5001
CLUSTER = "tbcluster"
ENDPOINT = "cl"
SYNC_INTERVAL = 2.0  # the hosts' git-annex branch sync, seconds
FRONTEND_TIMEOUT = 240.0  # onionbalance start -> both instances reached through the frontend


class BalancedBridge(TorBridge):
    """``torbridge serve`` in torrc mode, one instance behind the frontend."""

    def __init__(
        self, env: AnnexEnv, repository: Path, workdir: Path, *, socks_address: str, frontend: str
    ) -> None:
        self.hs_dir = workdir / "hs"
        super().__init__(
            env,
            repository,
            workdir,
            [Expose(ENDPOINT, CLUSTER, PORT)],
            socks=socks_address,
            tor={"onion": "torrc", "hidden_service_dir": self.hs_dir},
            tables={"balance": {"frontend": frontend, "sync_interval": SYNC_INTERVAL}},
        )

    def set_git_owner(self, onion: str, remote: str) -> None:
        """Relay CONNECT to the git owner's instance ``onion``, sync with ``remote``."""
        self.tables["balance"].update(git_owner=onion, owner_remote=remote)
        self.write_config()

    def torrc_lines(self) -> list[str]:
        return [
            f"HiddenServiceDir {self.hs_dir}",
            f"HiddenServicePort {PORT} unix:{self.socket_path(ENDPOINT)}",
            "HiddenServiceOnionBalanceInstance 1",
            "HiddenServiceNumIntroductionPoints 3",
        ]

    def start(self, timeout: float = 120.0) -> None:
        super().start(timeout)

    @property
    def onion(self) -> str:
        return (self.hs_dir / "hostname").read_text().strip()

    def session_starts(self, token_name: str | None = None) -> int:
        """Sessions this instance started (from its log), of one token or all."""
        who = re.escape(token_name) if token_name else r"\S+"
        return len(re.findall(rf"session start, token {who} ", self.log()))


def _add_node(host: AnnexRepo, name: str, path: Path) -> None:
    host.git("remote", "add", name, str(path))
    host.annex("info", name)  # reads the node's UUID
    host.git("config", f"remote.{name}.annex-proxy", "true")
    host.git("config", f"remote.{name}.annex-cluster-node", CLUSTER)


class BalanceWorld(WorldBase):
    """Everything of the module docstring on a running TestNet (7+ HSDirs)."""

    def __init__(
        self,
        net: TestNet,
        root: Path,
        *,
        clients: int = 3,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.bridges: dict[str, BalancedBridge] = {}
        self.ob: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}
        self.tokens: dict[str, str] = {}  # name -> address line
        self.n_clients = clients
        super().__init__(net, root, progress=progress)

    def _build(self) -> None:
        unix_socks = self.socks_unix
        self.tors["client"] = self.net.start_client(
            "annexclient", extra=[f"SocksPort unix:{unix_socks} ExtendedErrors"]
        )
        self.tors["ob"] = self.net.start_client("obtor")
        client_socks = self.tors["client"].socks
        assert client_socks is not None
        self.client_socks = client_socks
        self.netns = PrivateNetns()
        self.netns.start_forwarder(unix_socks, isolate=True)
        self.env = AnnexEnv.create(self.root / "env")
        self.client_env = NetnsAnnexEnv.inside(self.env, self.netns)

        # The frontend key first: the instances name it before their tor starts.
        self.ob_dir = self.root / "ob"
        out = self.env.run(["torbridge", "balance", "frontend", "--dir", str(self.ob_dir)]).stdout
        self.frontend = out.split("frontend:", 1)[1].split()[0]

        # Host A: the git owner, gateway of the cluster over two path nodes.
        self.host_a = AnnexRepo.create(self.env, self.root / "hostA", "hostA")
        self.nodes = {n: AnnexRepo.create(self.env, self.root / n, n) for n in ("c1", "c2")}
        self.host_a.annex("initcluster", CLUSTER)
        for name, node in self.nodes.items():
            _add_node(self.host_a, name, node.path)
        self.host_a.annex("updateproxy")
        self.host_a.annex("updatecluster")
        self.cluster_uuid = self.host_a.git("config", f"annex.cluster.{CLUSTER}").stdout.strip()

        # Host B: a clone (the cluster's logs come with it), the same nodes.
        b_path = self.root / "hostB"
        self.env.run(["git", "clone", "-q", str(self.host_a.path), str(b_path)])
        self.host_b = AnnexRepo(self.env, b_path)
        self.host_b.annex("init", "hostB")
        self.host_b.git("remote", "remove", "origin")
        self.host_b.git("config", f"annex.cluster.{CLUSTER}", self.cluster_uuid)
        for name, node in self.nodes.items():
            _add_node(self.host_b, name, node.path)
        self.host_b.annex("updateproxy")
        self.host_b.annex("updatecluster")

        for name, repo in (("A", self.host_a), ("B", self.host_b)):
            bridge = BalancedBridge(
                self.env,
                repo.path,
                self.root / f"bridge{name}",
                socks_address=client_socks,
                frontend=self.frontend,
            )
            self.bridges[name] = bridge
            bridge.hs_dir.mkdir(mode=0o700)
            ob_config = bridge.cli("balance", "instance-config").stdout
            (bridge.hs_dir / "ob_config").write_text(ob_config)
            self.tors[name] = self.net.start_service_tor(f"inst{name}", extra=bridge.torrc_lines())
        self.say("instance tors bootstrapped")
        a, b = self.bridges["A"], self.bridges["B"]
        for bridge in (a, b):
            deadline = time.monotonic() + 60
            while not (bridge.hs_dir / "hostname").exists():
                if time.monotonic() > deadline:
                    raise TorPathError("an instance tor made no hostname")
                time.sleep(0.1)
        a.start()
        self.net.wait_for_descriptor(self.tors["A"], a.onion, timeout=120)
        self.say(f"host A ready: {a.onion}")

        # Tokens are made on A (they print the FRONTEND address), imported on B.
        for name in ["hostB", "probe", *(f"client{i}" for i in range(self.n_clients))]:
            extra = ["--git", "write"] if name == "hostB" else []
            out = a.cli("token", "add", name, *extra, timeout=120).stdout.strip()
            self.tokens[name] = out
        exported = a.cli("token", "export").stdout
        self.env.run(
            ["torbridge", "--config", str(b.config_path), "token", "import"], input=exported
        )

        # B links A's instance (never the frontend) and syncs its branch with it.
        token = self.token("hostB")
        line = f"p2p-annex::torbridge:{a.onion}:{PORT}:{token}"
        t = time.monotonic()
        self.env.run(
            ["git", "annex", "p2p", "--link", "--name", "owner"],
            self.host_b.path,
            input=line + "\n",
            extra_env={"TORBRIDGE_SOCKS": client_socks},
            timeout=240,
        )
        self.timings["B links owner"] = time.monotonic() - t
        b.set_git_owner(a.onion, "owner")
        b.start()
        self.net.wait_for_descriptor(self.tors["B"], b.onion, timeout=120)
        self.say(f"host B ready: {b.onion}")

        lines = [br.cli("balance", "instance").stdout.strip() for br in (a, b)]
        self.env.run(["torbridge", "balance", "frontend", "--dir", str(self.ob_dir), *lines])
        self.start_frontend()

    def token(self, name: str) -> str:
        match = TOR_LINE.fullmatch(self.tokens[name])
        assert match is not None, self.tokens[name]
        return match.group(3)

    def _spawn_frontend(self) -> None:
        log = open(self.root / "onionbalance.log", "ab")  # noqa: SIM115
        ob_control = self.tors["ob"].control
        self.ob = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torbridge",
                "balance",
                "run",
                "--dir",
                str(self.ob_dir),
                "--control",
                ob_control,
                "--testnet",
            ],
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        STARTED_PIDS.add(self.ob.pid)

    def _stop_frontend(self) -> None:
        if self.ob is not None and self.ob.poll() is None:
            self.ob.send_signal(signal.SIGTERM)
            try:
                self.ob.wait(5)
            except subprocess.TimeoutExpired:
                self.ob.kill()
                self.ob.wait()

    def start_frontend(self) -> None:
        """Onionbalance, then connections through the frontend until both
        instances have served one (the frontend descriptor lists them both)."""
        self._spawn_frontend()
        assert self.ob is not None
        t0 = time.monotonic()
        first: float | None = None
        deadline = t0 + FRONTEND_TIMEOUT
        n = 0
        while not all(br.session_starts("probe") for br in self.bridges.values()):
            self.net.check()
            if self.ob.poll() is not None:
                raise TorPathError(f"onionbalance exited:\n{self.ob_log()[-3000:]}")
            if time.monotonic() > deadline:
                probes = [b.session_starts("probe") for b in self.bridges.values()]
                raise TorPathError(
                    f"the frontend did not reach both instances in {FRONTEND_TIMEOUT:.0f}s"
                    f" (probe sessions {probes})"
                    f"\n{self.ob_log()[-3000:]}"
                )
            n += 1
            if self.probe(f"gate{n}", timeout=30) and first is None:
                first = time.monotonic() - t0
                self.say(f"first connection through the frontend after {first:.1f}s")
            time.sleep(0.5)
        self.timings["first connection"] = first or 0.0
        self.timings["both instances"] = time.monotonic() - t0
        self.say(f"both instances reached through the frontend ({n} probes)")

    def probe(self, username: str, timeout: float = 60) -> bool:
        """One P2P AUTH through the frontend, on circuits of its own; True if accepted."""
        return self.probe_outcome(self.frontend, username, timeout)[1] == "AUTH-SUCCESS"

    def probe_outcome(self, onion: str, username: str, timeout: float = 60) -> tuple[float, str]:
        """One P2P AUTH to ``onion`` (the frontend or an instance), on
        circuits of its own: seconds taken and "AUTH-SUCCESS", the answer,
        or the SOCKS error."""
        host, port = self.client_socks.rsplit(":", 1)
        s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        s.set_proxy(socks.SOCKS5, host, int(port), rdns=True, username=username, password="x")
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            s.connect((onion, PORT))
            s.sendall(f"AUTH 00000000-0000-4000-8000-000000000001 {self.token('probe')}\n".encode())
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            answer = data.decode(errors="replace").split(" ", 1)[0].strip() or "closed"
        except (OSError, socks.ProxyError) as e:
            answer = f"{type(e).__name__}: {e}"
        finally:
            s.close()
        return time.monotonic() - t0, answer

    def drain(self, name: str, timeout: float = 600.0) -> float:
        """The planned removal of instance ``name`` (docs/scale-out.md): the
        frontend's config without it (``balance frontend --drain``),
        Onionbalance restarted on that config
        (it publishes a descriptor without the instance's introduction
        points), then wait, the instance still serving, until the client
        tor holds a frontend descriptor that lists only the introduction
        points the other instances publish now (a client keeps a descriptor
        until the next time period begins, then fetches the new one at its
        next connection). Only theirs, not merely none of ``name``'s
        current ones: a descriptor the client fetched before ``name``
        rotated its introduction points lists old ones that the test cannot
        recognise as ``name``'s, and a CI run that waited for "none of the
        current ones" stopped the instance while the client still held such
        a descriptor (its next copy hung until tor's SOCKS timeout). Seconds
        waited."""
        gone = self.intro_keys_of(name)
        staying = self._intro_keys_except(name)
        held = self.client_frontend_intro_keys()
        self.say(
            f"drain {name}: the client holds a frontend descriptor with"
            f" {len(held & gone) if held is not None else 'none'} of {name}'s"
            f" {len(gone)} introduction points"
            f" and {len(held - gone - staying) if held is not None else 0} unknown ones"
        )
        uploads = self.ob_log().count("Uploading first descriptor")
        t0 = time.monotonic()
        self._stop_frontend()
        self.env.run(
            [
                "torbridge",
                "balance",
                "frontend",
                "--dir",
                str(self.ob_dir),
                "--drain",
                self.bridges[name].onion,
            ]
        )
        self._spawn_frontend()
        n = 0
        while True:
            held = self.client_frontend_intro_keys()
            if held is None:  # none held: a connection makes the client fetch one
                n += 1
                self.probe(f"drain{n}", timeout=60)
            elif self.ob_log().count("Uploading first descriptor") > uploads and held <= staying:
                return time.monotonic() - t0
            else:  # the others may have rotated theirs meanwhile
                staying = self._intro_keys_except(name)
            if time.monotonic() - t0 > timeout:
                raise TorPathError(
                    f"the client still holds introduction points other than the remaining"
                    f" instances' after {timeout:.0f}s"
                )
            time.sleep(1)

    def intro_keys_of(self, name: str) -> set[bytes]:
        """The introduction points (auth keys) instance ``name`` publishes."""
        onion = self.bridges[name].onion
        ctl = self.tors[name].controller()
        try:
            raw = ctl.get_info(f"hs/service/desc/id/{onion.removesuffix('.onion')}")
        finally:
            ctl.close()
        return _intro_keys(raw, onion)

    def _intro_keys_except(self, name: str) -> set[bytes]:
        """The introduction points every instance but ``name`` publishes now."""
        keys: set[bytes] = set()
        for other in self.bridges:
            if other != name:
                keys |= self.intro_keys_of(other)
        return keys

    def client_frontend_intro_keys(self) -> set[bytes] | None:
        """The introduction points of the frontend descriptor the client tor
        holds; None if it holds none (its next connection fetches one)."""
        ctl = self.tors["client"].controller()
        try:
            raw = ctl.get_info(f"hs/client/desc/id/{self.frontend.removesuffix('.onion')}")
        except stem.ControllerError:
            return None
        finally:
            ctl.close()
        return _intro_keys(raw, self.frontend)

    def ob_log(self) -> str:
        return (self.root / "onionbalance.log").read_text(errors="replace")

    def client(self, name: str) -> Client:
        return Client.create(self.client_env, self.root / "clients" / name, name)

    def stop_instance(self, name: str, *, kill: bool = False) -> None:
        """Stop instance ``name``'s tor: SIGTERM (it exits at once,
        ShutdownWaitLength 0), or SIGKILL with ``kill``."""
        tor = self.tors.pop(name)
        if kill and tor.process.poll() is None:
            tor.process.kill()
            tor.process.wait()
        stop_tor(self.net, tor)

    def failure_sections(self) -> list[tuple[str, str]]:
        out = [(f"torbridge {n}", b.log()[-15000:]) for n, b in self.bridges.items()]
        with contextlib.suppress(OSError):
            out.append(("onionbalance", self.ob_log()[-5000:]))
        out += [(f"tor {t.name}", t.log_tail(20)) for t in self.tors.values()]
        return out

    def daemons(self) -> list[TorBridge]:
        return list(self.bridges.values())

    def _before_close(self) -> None:
        self._stop_frontend()

    def _after_close(self) -> None:
        _kill_strays(self.root)

    def close(self, *, check: bool = True) -> None:
        """As every world's; an instance that did not stop cleanly is no error
        here (what the tests check is the clients' view)."""
        with contextlib.suppress(AssertionError):
            super().close(check=check)


def _intro_keys(raw: str, onion: str) -> set[bytes]:
    from stem.descriptor.hidden_service import (  # type: ignore[import-untyped]
        HiddenServiceDescriptorV3,
    )

    inner = HiddenServiceDescriptorV3.from_str(raw).decrypt(onion)
    return {bytes(ip.auth_key_cert.key) for ip in inner.introduction_points}


def _kill_strays(root: Path) -> None:
    """git's remote helpers that git-annex left running in our repositories
    (found by their working directory; only ours are under ``root``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root) + "/") and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
