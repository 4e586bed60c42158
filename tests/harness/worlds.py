"""Tor-tier worlds: what a test or a bench builds on a running TestNet.

:class:`WorldBase` holds what every world shares (tors of its own, a
private network namespace for the stock clients, torbridge daemons, the
loopback check and the teardown); :class:`TorWorld` is the path of
:mod:`tests.harness.tor`'s docstring (a bridge, a node torbridge behind it).
:mod:`tests.harness.clusterworld` and :mod:`tests.harness.balanceworld`
build the cluster and the Onionbalance worlds on the same base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Expose
from tests.harness.tor import (
    STARTED,
    STOP_TIMEOUT,
    TOR_COMMAND_TIMEOUT,
    NetnsAnnexEnv,
    PrivateNetns,
    TorBridge,
    TorPathError,
    restart_tor,
    stop_tor,
)
from torbridge.testnet import TestNet, TorProcess, unsafe_sockets

HUB_PORT = 5000  # the bridge: the proxy's own repository
NODE_VIA_BRIDGE_PORT = 5001  # the bridge: the proxied node
NODE_PORT = 6000  # the node torbridge: its own repository


class WorldBase:
    """What every Tor-tier world shares, built on a running TestNet: tors of
    its own, a private namespace for the stock clients, torbridge daemons.

    A subclass sets its own attributes, then calls ``__init__`` here, which
    runs its ``_build()`` (undone by ``close()`` if it fails) and lists its
    daemons in ``daemons()``. ``close()`` undoes all of it; the TestNet
    itself stays up.
    """

    def __init__(
        self, net: TestNet, root: Path, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self.net = net
        self.root = root
        self._say = progress or (lambda _m: None)
        self._t0 = time.monotonic()
        self._closed = False
        self.netns: PrivateNetns | None = None
        self.tors: dict[str, TorProcess] = {}
        if net.workdir is not None:
            STARTED["workdirs"].add(str(net.workdir))
        # AF_UNIX paths are short (108 bytes): the SocksPort lives in /tmp.
        self.socks_dir = Path(tempfile.mkdtemp(prefix="tb-socks-", dir="/tmp"))
        os.chmod(self.socks_dir, 0o700)  # tor wants a private directory for unix sockets
        try:
            self._build()
        except BaseException:
            self.close(check=False)
            raise

    def _build(self) -> None:
        raise NotImplementedError

    def daemons(self) -> list[TorBridge]:
        raise NotImplementedError

    def say(self, message: str) -> None:
        self._say(f"[{time.monotonic() - self._t0:6.1f}s] {message}")

    @property
    def socks_unix(self) -> Path:
        return self.socks_dir / "socks.sock"

    def our_pids(self) -> list[int]:
        return [pid for b in self.daemons() for pid in b.process_tree()]

    def assert_loopback_only(self) -> None:
        """No process of ours (the daemons and their children) has a socket
        off loopback (the tors are watched by the TestNet's watchdog; the
        client side lives in a namespace with nothing but lo)."""
        self.net.check()
        pids = set(self.our_pids())
        if pids:
            bad = unsafe_sockets(pids)
            assert not bad, f"a socket of ours is not on loopback: {bad}"

    def failure_sections(self) -> list[tuple[str, str]]:
        sections = [(f"torbridge log ({b.log_path})", b.log()[-20000:]) for b in self.daemons()]
        sections += [(f"tor {t.name}", t.log_tail(30)) for t in self.tors.values()]
        return sections

    def _before_close(self) -> None:
        """What a subclass must undo before its daemons stop."""

    def _after_close(self) -> None:
        """What a subclass must undo once its daemons, namespace and tors are gone."""

    def close(self, *, check: bool = True) -> None:
        """Stop the daemons (cleanly: exit 0, sockets removed, when ``check``),
        the namespace and forwarder, and our tors."""
        if self._closed:
            return
        self._closed = True
        self._before_close()
        errors: list[str] = []
        for b in self.daemons():
            try:
                if b.proc is not None and b.returncode is None and b.running:
                    if check:
                        b.stop(timeout=STOP_TIMEOUT)
                    else:
                        b.kill()
                elif check and b.proc is not None and b.returncode is None:
                    errors.append(f"{b.workdir.name} had died:\n{b.log()[-5000:]}")
            except AssertionError as e:
                errors.append(str(e))
            finally:
                b.close()
        if self.netns is not None:
            self.netns.close()
        for tor in self.tors.values():
            stop_tor(self.net, tor)
        self.tors.clear()
        self._after_close()
        shutil.rmtree(self.socks_dir, ignore_errors=True)
        if errors and check:
            raise AssertionError("daemon did not stop cleanly:\n" + "\n".join(errors))


class TorWorld(WorldBase):
    """The path of the module docstring, built on a running TestNet.

    Three tors of its own on the network (a client with a TCP and a unix
    SocksPort, and a service tor for each daemon), the namespace and its
    forwarder, the proxy and node repositories, the node daemon (linked
    into the proxy as ``node1`` with ``git annex p2p --link``, annex-proxy
    true) and the bridge daemon (``hub`` = own repository on 5000, ``node1``
    on 5001). ``close()`` undoes all of it; the TestNet itself stays up.
    """

    def __init__(
        self, net: TestNet, root: Path, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self.bridge: TorBridge | None = None
        self.node: TorBridge | None = None
        self.timings: dict[str, float] = {}
        super().__init__(net, root, progress=progress)

    def _build(self) -> None:
        if not GIT_ANNEX_BINARY.exists():
            raise TorPathError(f"git-annex binary not found at {GIT_ANNEX_BINARY}")
        t = time.monotonic()
        client = self.net.start_client(
            "annexclient", extra=[f"SocksPort unix:{self.socks_unix} ExtendedErrors"]
        )
        self.tors["client"] = client
        self.tors["bridge"] = self.net.start_service_tor("bridgehs")
        self.tors["node"] = self.net.start_service_tor("nodehs")
        self.timings["tors"] = time.monotonic() - t
        self.say("client and service tors bootstrapped")

        self.netns = PrivateNetns()
        self.netns.start_forwarder(self.socks_unix)
        self.say(f"namespace {self.netns.name}: 127.0.0.1:9050 -> {self.socks_unix}")

        self.env = AnnexEnv.create(self.root / "env")
        self.client_env = NetnsAnnexEnv.inside(self.env, self.netns)
        assert client.socks is not None
        self.client_socks = client.socks

        # The node: a second torbridge serving its own repository on its own onion.
        self.node_repo = AnnexRepo.create(self.env, self.root / "node", "node")
        self.node = TorBridge(
            self.env,
            self.node_repo.path,
            self.root / "nodebridge",
            [Expose("node", ".", NODE_PORT)],
            control=self.tors["node"].control,
            socks=self.client_socks,
        )
        self.node.start()
        self.timings["node ready"] = self.node.ready_seconds[-1]
        self.net.wait_for_descriptor(self.tors["node"], self.node.onion)
        self.say(f"node ready ({self.node.ready_seconds[-1]:.1f}s): {self.node.onion}")

        # The proxy links the node with git-annex's own p2p --link, through Tor.
        self.proxy = AnnexRepo.create(self.env, self.root / "proxy", "proxy")
        node_line = self.node.tor_lines("proxy")[NODE_PORT]
        t = time.monotonic()
        AnnexRepo(self.client_env, self.proxy.path).annex(
            "p2p",
            "--link",
            "--name",
            "node1",
            input=node_line.line + "\n",
            timeout=TOR_COMMAND_TIMEOUT,
        )
        self.timings["proxy links node"] = time.monotonic() - t
        self.proxy.git("config", "remote.node1.annex-proxy", "true")
        self.say(f"proxy linked node1 ({self.timings['proxy links node']:.1f}s)")

        self.bridge = TorBridge(
            self.env,
            self.proxy.path,
            self.root / "bridge",
            [Expose("hub", ".", HUB_PORT), Expose("node1", "node1", NODE_VIA_BRIDGE_PORT)],
            control=self.tors["bridge"].control,
            socks=self.client_socks,
        )
        self.bridge.start()
        self.timings["bridge ready"] = self.bridge.ready_seconds[-1]
        self.net.wait_for_descriptor(self.tors["bridge"], self.bridge.onion)
        self.say(f"bridge ready ({self.bridge.ready_seconds[-1]:.1f}s): {self.bridge.onion}")

    # clients
    def client(self, name: str) -> Client:
        """A fresh client repository; its git and git-annex run in the namespace."""
        return Client.create(self.client_env, self.root / "clients" / name, name)

    # the daemons
    def daemons(self) -> list[TorBridge]:
        return [b for b in (self.bridge, self.node) if b is not None]

    def restart_hs_tor(self, which: str) -> TorProcess:
        """Restart the service tor of "bridge" or "node"; the daemon must republish."""
        new = restart_tor(self.net, self.tors[which])
        self.tors[which] = new
        return new
