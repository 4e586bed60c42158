"""A cluster endpoint over the private Tor network, with tor-annex nodes.

    stock git-annex (private namespace) -> client tor -> bridge's onion
      -> torbridge, cluster endpoint (port 5001)
           -> SOCKS -> client tor -> n1's onion -> torbridge (n1's repository)
           -> SOCKS -> client tor -> n2's onion -> torbridge (n2's repository)
           -> SOCKS -> client tor -> n3's onion -> torbridge (n3's repository)

The proxy repository is the cluster's gateway, configured with git-annex's
own commands (docs/clusters.md): each node linked with ``git annex p2p
--link`` through Tor (a ``tor-annex::`` remote), ``initcluster``,
``annex-cluster-node`` on each node remote, ``updatecluster``. Each node is
a torbridge serving its own repository on an onion of its own (n1 and n2
published through one service tor, n3 through a tor of its own). A node
can die two ways:

- ``stop_node``: its daemon stops, so its onion service is removed from
  tor (the service tor closes its circuits: a client's introduction is
  refused at once); ``start_node`` republishes the same address;
- ``freeze_host`` (n3 only): its service tor is SIGSTOPped, as a host that
  lost power or network: the descriptor is still on the HSDirs and the
  introduction points still take introductions, but nothing answers, so a
  client waits for tor's SocksTimeout (120 s); ``thaw_host`` resumes it.

Built from the pieces of tests/harness/tor.py and worlds.py.

Run as a script, it measures what a client waits for a copy to the cluster
with one node's onion gone, against any build of the bridge daemon::

    python -m tests.harness.clusterworld dead-node [--how stopped|frozen]
        [--bridge-pythonpath DIR]

(``DIR``: a checkout whose ``torbridge`` package the bridge daemon runs;
the nodes and the test code stay this tree's.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Expose
from tests.harness.process import Result
from tests.harness.tor import (
    STOP_TIMEOUT,
    TOR_COMMAND_TIMEOUT,
    NetnsAnnexEnv,
    PrivateNetns,
    TorBridge,
    TorPathError,
    hs_event_count,
    netns_unavailable,
    wait_for_upload,
)
from tests.harness.worlds import WorldBase
from torbridge.testnet import TestNet, TorProcess

CLUSTER = "torcluster"
HUB_PORT = 5000  # the bridge: the proxy's own repository
CLUSTER_PORT = 5001  # the bridge: the cluster
ENDPOINT = "cl"  # the client's remote for the cluster endpoint
NODE_PORT = 6000  # each node torbridge: its own repository (on its own onion)
NODE_NAMES = ("n1", "n2", "n3")
T = TOR_COMMAND_TIMEOUT


@dataclass
class TorNode:
    name: str
    repo: AnnexRepo
    daemon: TorBridge
    uuid: str
    onion: str


def success_plus(copy: Result) -> set[str]:
    """The UUIDs of the last ``SUCCESS-PLUS`` the client received (``--debug``)."""
    lines = [line for line in copy.output.splitlines() if "P2P < SUCCESS-PLUS" in line]
    assert lines, f"no SUCCESS-PLUS:\n{copy.describe()[-4000:]}"
    return set(lines[-1].split("SUCCESS-PLUS", 1)[1].split())


class ClusterTorWorld(WorldBase):
    """The path of the module docstring on a running TestNet; ``close()``
    undoes all of it (the TestNet itself stays up).

    ``bridge_pythonpath``: run the bridge daemon (and its ``torbridge``
    commands) with this PYTHONPATH, i.e. another build of torbridge.
    """

    def __init__(
        self,
        net: TestNet,
        root: Path,
        *,
        progress: Callable[[str], None] | None = None,
        bridge_pythonpath: str | None = None,
    ) -> None:
        self.bridge_pythonpath = bridge_pythonpath
        self.bridge: TorBridge | None = None
        self.nodes: dict[str, TorNode] = {}
        self._node_daemons: list[TorBridge] = []
        self._frozen: set[str] = set()  # node hosts SIGSTOPped, thawed at close
        super().__init__(net, root, progress=progress)

    def _build(self) -> None:
        if not GIT_ANNEX_BINARY.exists():
            raise TorPathError(f"git-annex binary not found at {GIT_ANNEX_BINARY}")
        self.tors["client"] = self.net.start_client(
            "clclient", extra=[f"SocksPort unix:{self.socks_unix} ExtendedErrors"]
        )
        self.tors["bridge"] = self.net.start_service_tor("clbridgehs")
        self.tors["nodes"] = self.net.start_service_tor("clnodeshs")
        self.tors["n3"] = self.net.start_service_tor("cln3hs")  # n3's host, frozen at will
        self.say("client and service tors bootstrapped")
        self.netns = PrivateNetns()
        self.netns.start_forwarder(self.socks_unix)
        self.env = AnnexEnv.create(self.root / "env")
        self.client_env = NetnsAnnexEnv.inside(self.env, self.netns)
        socks = self.tors["client"].socks
        assert socks is not None
        self.client_socks = socks

        self.proxy = AnnexRepo.create(self.env, self.root / "proxy", "proxy")
        proxy_in_netns = AnnexRepo(self.client_env, self.proxy.path)
        for name in NODE_NAMES:
            repo = AnnexRepo.create(self.env, self.root / name, name)
            daemon = TorBridge(
                self.env,
                repo.path,
                self.root / f"{name}bridge",
                [Expose(name, ".", NODE_PORT)],
                control=self.node_tor(name).control,
                socks=self.client_socks,
            )
            self._node_daemons.append(daemon)
            daemon.start()
            self.net.wait_for_descriptor(self.node_tor(name), daemon.onion)
            line = daemon.tor_lines("proxy")[NODE_PORT].line
            # git-annex's own p2p --link, through Tor: a tor-annex:: remote.
            proxy_in_netns.annex("p2p", "--link", "--name", name, input=line + "\n", timeout=T)
            self.proxy.git("config", f"remote.{name}.annex-proxy", "true")
            self.nodes[name] = TorNode(name, repo, daemon, repo.uuid, daemon.onion)
            self.say(f"node {name} ready and linked: {daemon.onion}")

        self.proxy.annex("initcluster", CLUSTER)
        for name in NODE_NAMES:
            self.proxy.git("config", f"remote.{name}.annex-cluster-node", CLUSTER)
        out = self.proxy.annex("updatecluster").output
        for name in NODE_NAMES:
            if f"Added node {name}" not in out:
                raise TorPathError(f"updatecluster did not add {name}: {out}")
        self.cluster_uuid = self.proxy.git("config", f"annex.cluster.{CLUSTER}").stdout.strip()

        bridge_env = self.env
        if self.bridge_pythonpath is not None:
            bridge_env = dataclasses.replace(
                self.env, env={**self.env.env, "PYTHONPATH": self.bridge_pythonpath}
            )
        self.bridge = TorBridge(
            bridge_env,
            self.proxy.path,
            self.root / "bridge",
            [Expose("hub", ".", HUB_PORT), Expose(ENDPOINT, CLUSTER, CLUSTER_PORT)],
            control=self.tors["bridge"].control,
            socks=self.client_socks,
        )
        self.bridge.start()
        self.net.wait_for_descriptor(self.tors["bridge"], self.bridge.onion)
        self.say(f"bridge ready: {self.bridge.onion}")

    # --- clients, nodes

    def client(self, name: str) -> Client:
        """A fresh client linked to the cluster endpoint (its own rw token),
        which has pulled the gateway's git-annex branch (cluster.log: it
        then counts the nodes a SUCCESS-PLUS names as copies)."""
        assert self.bridge is not None
        client = Client.create(self.client_env, self.root / "clients" / name, name)
        line = self.bridge.tor_lines(name)[CLUSTER_PORT].line
        client.link(line, ENDPOINT, timeout=T)
        if client.remote_uuid(ENDPOINT) != self.cluster_uuid:
            raise TorPathError(f"{ENDPOINT} is {client.remote_uuid(ENDPOINT)}, not the cluster")
        client.annex("pull", "--no-content", ENDPOINT, timeout=T)
        return client

    def node_tor(self, name: str) -> TorProcess:
        """The service tor that publishes node ``name``'s onion."""
        return self.tors[name] if name in self.tors else self.tors["nodes"]

    def holding(self, key: str) -> set[str]:
        """The nodes whose repository has ``key`` (looked at in the node)."""
        return {n.name for n in self.nodes.values() if n.repo.has_key(key)}

    def stop_node(self, name: str) -> None:
        """Stop the node's daemon: its onion service is gone from tor."""
        self.nodes[name].daemon.stop(timeout=STOP_TIMEOUT)
        self.say(f"node {name} stopped: its onion is gone")

    def start_node(self, name: str) -> None:
        """Start the node's daemon again: it republishes the same onion."""
        node = self.nodes[name]
        since = hs_event_count(self.node_tor(name))
        node.daemon.start()
        if node.daemon.onion != node.onion:
            raise TorPathError(f"{name} came back on another onion")
        wait_for_upload(self.net, self.node_tor(name), node.onion, since)
        self.say(f"node {name} republished")

    def freeze_host(self, name: str) -> None:
        """SIGSTOP the node's own service tor (by PID): its onion stays
        published, but nothing on that host answers any more."""
        os.kill(self.tors[name].pid, signal.SIGSTOP)
        self._frozen.add(name)
        self.say(f"node {name}'s host frozen: its onion is published, nothing answers")

    def thaw_host(self, name: str) -> None:
        os.kill(self.tors[name].pid, signal.SIGCONT)
        self._frozen.discard(name)
        self.say(f"node {name}'s host resumed")

    def kill_node(self, name: str, how: str) -> None:
        """``how``: "stopped" (stop_node) or "frozen" (freeze_host)."""
        if how == "stopped":
            self.stop_node(name)
        elif how == "frozen":
            self.freeze_host(name)
        else:
            raise ValueError(f"how: {how!r}")

    # --- checks, teardown

    def daemons(self) -> list[TorBridge]:
        return [*self._node_daemons, *([self.bridge] if self.bridge is not None else [])]

    def _before_close(self) -> None:
        for name in list(self._frozen):
            with contextlib.suppress(ProcessLookupError):
                self.thaw_host(name)


# --------------------------------------------------------------------------
# what a client waits with one node's onion gone


@dataclass
class DeadNodeTimes:
    all_up: float  # a copy with every node up
    first: float  # the first copy after the node's onion went away
    next: float  # the copy after that
    copies: list[Result]  # first, next (with --debug)
    keys: list[str]  # their keys


def time_copies_with_a_dead_node(
    world: ClusterTorWorld,
    client: Client,
    dead: str,
    how: str = "stopped",
    size: int = 48 * 1024,
) -> DeadNodeTimes:
    """One copy with every node up (every node's onion has been used, the
    client tor knows its descriptor); then ``dead`` dies (``how``, see
    ``kill_node``) and two more copies, each a new ``git annex copy`` (a new
    session)."""

    def copy(name: str) -> tuple[float, Result, str]:
        client.add_file(name, name.encode() + b"\n" + os.urandom(size))
        started = time.monotonic()
        result = client.annex("copy", "--to", ENDPOINT, "--debug", "--", name, timeout=T)
        return time.monotonic() - started, result, client.key(name)

    all_up, _, key = copy(f"all-up-{how}.bin")
    if world.holding(key) != set(NODE_NAMES):
        raise AssertionError(f"with every node up, the copy reached {world.holding(key)}")
    world.kill_node(dead, how)
    first, first_copy, first_key = copy(f"first-{how}.bin")
    nxt, next_copy, next_key = copy(f"next-{how}.bin")
    world.say(f"copy: all up {all_up:.1f}s; {dead} {how}: first {first:.1f}s, next {nxt:.1f}s")
    return DeadNodeTimes(all_up, first, nxt, [first_copy, next_copy], [first_key, next_key])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.clusterworld")
    sub = parser.add_subparsers(dest="command", required=True)
    dead = sub.add_parser("dead-node", help="time copies to the cluster with one node gone")
    dead.add_argument("--bridge-pythonpath", help="the torbridge build the bridge runs")
    dead.add_argument("--how", choices=("stopped", "frozen"), default="stopped")
    dead.add_argument("--rounds", type=int, default=1, help="measurements (fresh world each)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    say = logging.getLogger("clusterworld").info
    reason = netns_unavailable()
    if reason is not None:
        print(f"cannot run: {reason}")
        return 2
    results: list[DeadNodeTimes] = []
    tried: list[int] = []  # sessions that tried n3 and found it unreachable
    with TestNet(progress=say) as net:
        net.start()
        for i in range(args.rounds):
            root = Path(tempfile.mkdtemp(prefix="tb-clusterworld-"))
            world = ClusterTorWorld(
                net, root, progress=say, bridge_pythonpath=args.bridge_pythonpath
            )
            try:
                client = world.client(f"timer{i}")
                results.append(time_copies_with_a_dead_node(world, client, "n3", args.how))
                assert world.bridge is not None
                tried.append(world.bridge.log().count("node n3 unreachable"))
            finally:
                world.close(check=False)
                shutil.rmtree(root, ignore_errors=True)
    for r, n in zip(results, tried, strict=True):
        print(
            f"all up {r.all_up:.1f}s; n3 {args.how}: first {r.first:.1f}s, next {r.next:.1f}s"
            f" (sessions that tried n3: {n})"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
