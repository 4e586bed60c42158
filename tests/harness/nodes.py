"""Real git-annex nodes behind the bridge: helpers for the node tests.

A node is a git-annex repository the proxy repository has as a remote and
the bridge exposes as its own endpoint. Three kinds:

- ``p2p``: served by ``git annex remotedaemon`` over git-annex's generic P2P
  transport ``p2p-annex::tbnode:NAME`` (the program is tbnode.py).
- ``tor``: the same remotedaemon, reached as ``tor-annex::ONION.onion:PORT``
  through a SOCKS5 server of ours that stands in for tor (tbnode.SocksServer).
- ``local``: a plain path remote git-annex proxies itself; the bridge reaches
  it through ``git-annex-shell p2pstdio --uuid``.

The proxy links the p2p and tor nodes with git-annex's own ``git annex p2p
--link``; for tor that runs in a private network namespace where our SOCKS
server sits on 127.0.0.1:9050 (git-annex's hard-coded tor SOCKS port).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.harness import tbnode
from tests.harness.annex import AnnexEnv, AnnexRepo, Client, object_keys, whereis_uuids
from tests.harness.bridge import Bridge
from tests.harness.process import wait_for

TBNODE = Path(tbnode.__file__).resolve()
NET = "tbnode"
KINDS = ("p2p", "tor", "local")
ONION_PORT = 5555

# Timeouts of the bridge under test: short, so that a hang fails fast.
BRIDGE_LIMITS = {"peer_timeout": 30.0, "stall_timeout": 30.0}


def random_onion() -> str:
    """56 base32 characters, the shape of a v3 onion name (nobody checks the checksum)."""
    return base64.b32encode(os.urandom(35)).decode("ascii").lower() + ".onion"


# --- the test network ---------------------------------------------------------------


class NodeNet:
    """The ``tbnode`` network of one test: its registry dir and its program on PATH."""

    def __init__(self, env: AnnexEnv, directory: Path) -> None:
        self.env = env
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        program = env.bin_dir / f"git-annex-p2p-{NET}"
        program.write_text(f'#!/bin/sh\nexec {sys.executable} {TBNODE} "$@"\n')
        program.chmod(0o755)
        # The daemon gets the same environment (Bridge runs with env.env).
        env.env["TBNODE_DIR"] = str(directory)

    def set_fault(self, name: str, **spec: object) -> None:
        """The next connection to node ``name`` gets this fault (tbnode.Fault)."""
        self.fired(name, clear=True)
        path = tbnode.fault_file(self.directory, name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, path)

    def fired(self, name: str, clear: bool = False) -> bool:
        path = tbnode.fired_file(self.directory, name)
        there = path.exists()
        if clear:
            path.unlink(missing_ok=True)
        return there


class NodeServer:
    """``git annex remotedaemon --foreground`` serving a node over ``tbnode``."""

    def __init__(self, net: NodeNet, repo: AnnexRepo, name: str) -> None:
        self.net = net
        self.repo = repo
        self.name = name
        self.address = f"p2p-annex::{NET}:{name}"
        self.log_path = repo.path.parent / f"{name}-remotedaemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.token = self._configure()

    def _configure(self) -> str:
        creds = self.repo.path / ".git" / "annex" / "creds"
        creds.mkdir(parents=True, exist_ok=True)
        (creds / "p2paddrs").write_text(self.address + "\n")
        out = self.repo.annex("p2p", "--gen-addresses").stdout
        for line in out.splitlines():
            if line.startswith(self.address + ":"):
                return line[len(self.address) + 1 :].strip()
        raise AssertionError(f"no address line for {self.address} in:\n{out}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        assert not self.running, f"{self.name}: remotedaemon already running"
        tbnode.pid_record(self.net.directory, self.name).unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in _reap)
        # stdin is remotedaemon's control channel: held open by us (a pipe we
        # never write), it exits when it closes.
        self.proc = subprocess.Popen(
            ["git-annex", "remotedaemon", "--foreground", "--debug"],
            cwd=self.repo.path,
            env=self.net.env.env,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        record = tbnode.pid_record(self.net.directory, self.name)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"remotedaemon of {self.name} exited:\n{self.log()}")
            try:
                if int(record.read_text()) != self.proc.pid:
                    return False
                tbnode.connect_node(self.net.directory, self.name).close()
            except (OSError, ValueError):
                return False
            return True

        wait_for(f"remotedaemon of {self.name} to listen", listening, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Close its stdin (how remotedaemon is told to quit); kill it if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the remotedaemon alone (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reap()

    def wait_dead(self, timeout: float = 10.0) -> None:
        """After a fault killed it: reap it."""
        assert self.proc is not None
        self.proc.wait(timeout=timeout)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            # Its listener program and git helpers share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no remotedaemon log)"


# --- nodes ----------------------------------------------------------------------------


@dataclass
class Node:
    kind: str
    name: str  # the proxy's remote name, and the bridge endpoint's
    repo: AnnexRepo
    uuid: str
    server: NodeServer | None = None  # p2p and tor
    onion: str | None = None  # tor

    def objects(self) -> set[str]:
        """Keys of every object file in the node's annex (whatever git-annex thinks)."""
        return object_keys(self.repo)

    def findkeys(self) -> set[str]:
        """``git annex findkeys --in here``, run in the node."""
        out = self.repo.annex("findkeys", "--in", "here").stdout
        return {line for line in out.splitlines() if line}

    def assert_holds(self, expected: dict[str, bytes]) -> None:
        """The node holds exactly these keys, byte for byte, and knows it."""
        assert self.objects() == set(expected), (
            f"{self.name}: objects {sorted(self.objects())} != {sorted(expected)}"
        )
        assert self.findkeys() == set(expected), (
            f"{self.name}: findkeys --in here {sorted(self.findkeys())} != {sorted(expected)}"
        )
        for key, content in expected.items():
            got = self.repo.key_content(key)
            assert got == content, f"{self.name}: {key} differs ({len(got)} B)"
            assert self.uuid in whereis_uuids(self.repo, key), (
                f"{self.name}: its own whereis does not list it for {key}"
            )

    def assert_sound(self) -> None:
        """fsck of every object here, nothing in .git/annex/bad."""
        self.repo.fsck_content(timeout=180)


def link_p2p(proxy: AnnexRepo, server: NodeServer, name: str) -> None:
    proxy.annex("p2p", "--link", "--name", name, input=f"{server.address}:{server.token}\n")


def link_tor(proxy: AnnexRepo, net: NodeNet, server: NodeServer, name: str, onion: str) -> None:
    """``git annex p2p --link`` of a tor-annex address, as git-annex does it.

    git-annex dials tor at 127.0.0.1:9050: only in a private network
    namespace (``unshare --net``) where our SOCKS server takes that port.
    """
    address = f"tor-annex::{onion}:{ONION_PORT}:{server.token}"
    result = net.env.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            str(TBNODE),
            "socks-run",
            f"{onion}={server.name}",
            "--",
            "git",
            "annex",
            "p2p",
            "--link",
            "--name",
            name,
        ],
        proxy.path,
        input=address + "\n",
    )
    assert "ok" in result.stdout, result.describe()


def make_node(
    kind: str,
    name: str,
    env: AnnexEnv,
    net: NodeNet,
    proxy: AnnexRepo,
    root: Path,
    socks: tbnode.SocksServer | None = None,
    update_proxy: bool = True,
) -> Node:
    """A node repository of ``kind``, served (p2p/tor) and linked from the proxy."""
    repo = AnnexRepo.create(env, root / name, name)
    uuid = repo.uuid
    if kind == "local":
        proxy.git("remote", "add", name, str(repo.path))
        proxy.annex("info", name)  # git-annex reads the node's UUID into annex-uuid
        node = Node(kind, name, repo, uuid)
    else:
        server = NodeServer(net, repo, name)
        server.start()
        if kind == "p2p":
            link_p2p(proxy, server, name)
            node = Node(kind, name, repo, uuid, server)
        else:
            assert socks is not None
            onion = random_onion()
            socks.routes[onion] = name
            link_tor(proxy, net, server, name, onion)
            node = Node(kind, name, repo, uuid, server, onion)
    got = proxy.git("config", f"remote.{name}.annex-uuid").stdout.strip()
    assert got == uuid, f"proxy's remote {name} has annex-uuid {got!r}, node is {uuid}"
    proxy.git("config", f"remote.{name}.annex-proxy", "true")
    if kind == "local" and update_proxy:
        # git-annex-shell only proxies remotes listed in proxy.log.
        proxy.annex("updateproxy")
    return node


@dataclass
class Setup:
    """One node behind a running bridge, and a client linked to its endpoint."""

    node: Node
    bridge: Bridge
    client: Client
    proxy: AnnexRepo
    net: NodeNet
    socks: tbnode.SocksServer

    @property
    def remote(self) -> str:
        """The client's name for the node's endpoint (the node's name)."""
        return self.node.name


# --- the bridge -------------------------------------------------------------------------


def relay_helpers(bridge: Bridge) -> list[str]:
    """The bridge's live children that carry a session to a node."""
    return bridge.helpers(str(TBNODE), "p2pstdio")


def wait_location(
    repo: AnnexRepo, key: str, uuid: str, present: bool, timeout: float = 30.0
) -> None:
    """Poll ``repo``'s location log until ``uuid`` has (or lacks) ``key``.

    The bridge writes it off the data path (``setpresentkey --batch``).
    """
    wait_for(
        f"{repo.path.name}'s location log to {'list' if present else 'drop'} {uuid} for {key}",
        lambda: (uuid in whereis_uuids(repo, key)) == present,
        timeout,
        interval=0.25,
    )
