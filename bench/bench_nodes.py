#!/usr/bin/env python3
"""Node benchmark: a stock git-annex client to a node, directly vs through torbridge.

The node is a real git-annex repository served by git-annex's own
``git annex remotedaemon`` over the tests' generic P2P network ``tbnode``
(tests/nodes/tbnode.py). One client repository has two remotes with the
node's UUID:

  direct  client -> git-annex-p2p-tbnode -> the node's remotedaemon
  bridge  client -> git-annex-p2p-torbridge -> unix socket -> torbridge serve
                 -> git-annex-p2p-tbnode -> the node's remotedaemon

The bridge reaches the node as a p2p-annex remote of the proxy repository
(linked with ``git annex p2p --link``, ``annex-proxy=true``), exposed as its
own endpoint. Each round times ``git annex copy --to`` and ``git annex get
--from`` for one big file and many 4 KiB files on both paths, alternating
which path goes first, and empties the node after each run. It reports
medians, bridge/direct ratios, the spread between rounds, the load average
and the torbridge daemon's peak RSS (VmHWM). See bench/README.md.

Run from the repository root's checkout (it imports the test harness,
tests/harness/, and bench/bench_transfer.py); everything stays on this
machine (pipes and unix sockets).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.bench_transfer import (
    PATHS,
    BenchError,
    Runner,
    add_workload,
    check_disk,
    loadavg,
    parse_workload_args,
    report,
    run_in_temp_dir,
    run_rounds,
    spread,
    workload_parser,
)
from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.nodes import Node, NodeNet, make_node
from tests.harness.process import CommandError

NODE = "node"  # the node's name: the proxy's remote and the bridge endpoint


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = workload_parser(__doc__.split("\n\n")[0])
    return parse_workload_args(parser, argv)


class World:
    """The node (served by remotedaemon), the proxy, the bridge and the client."""

    def __init__(self, root: Path) -> None:
        self.env = AnnexEnv.create(root / "env")
        self.net = NodeNet(self.env, root / "tbnode")
        self.proxy = AnnexRepo.create(self.env, root / "proxy", "proxy")
        self.node: Node | None = None
        self.bridge: Bridge | None = None
        self.client = Client.create(self.env, root / "client", "client")
        self.root = root

    def start_node(self) -> Node:
        self.node = make_node("p2p", NODE, self.env, self.net, self.proxy, self.root / "nodes")
        return self.node

    def link_direct(self, node: Node) -> None:
        assert node.server is not None
        self.client.link(f"{node.server.address}:{node.server.token}", "direct")

    def start_bridge(self) -> int:
        """The daemon (its default limits, no Tor), linked as ``bridge``; its pid."""
        self.bridge = Bridge(
            self.env, self.proxy.path, self.root / "bridge", [Expose(NODE, NODE, 5001)], limits={}
        )
        self.bridge.start()
        assert self.bridge.proc is not None
        self.client.link(self.bridge.add_token("bench", "rw", endpoint=NODE).line, "bridge")
        return self.bridge.proc.pid

    def check_linked(self, node: Node, paths: Sequence[str]) -> None:
        for path in paths:
            uuid = self.client.remote_uuid(path)
            if uuid != node.uuid:
                raise BenchError(f"remote {path} has UUID {uuid!r}, the node is {node.uuid}")

    def close(self) -> None:
        errors: list[str] = []
        if self.bridge is not None:
            try:
                if self.bridge.running:
                    self.bridge.stop()
            except AssertionError as exc:
                errors.append(str(exc))
            finally:
                self.bridge.close()
        if self.node is not None and self.node.server is not None:
            self.node.server.stop()
        if errors:
            raise BenchError("the daemon did not stop cleanly:\n" + "\n".join(errors))


def bench(root: Path, args: argparse.Namespace) -> None:
    paths = [args.only] if args.only else list(PATHS)
    check_disk(root, args)
    world = World(root)
    runner = Runner(world.env.env)
    version = runner.run(["git", "annex", "version", "--raw"], root).stdout.decode().strip()
    print(f"git-annex {version}; {os.cpu_count()} CPUs; paths: {', '.join(paths)};")
    print(f"big file {args.big_mib} MiB, {args.small} small files, {args.rounds} round(s)")
    print(f"temp dir {root}")
    print("setting up the node, the proxy and the client...", flush=True)
    workloads = add_workload(runner, world.client.path, args.big_mib, args.small)
    try:
        node = world.start_node()
        pid: int | None = None
        if "direct" in paths:
            world.link_direct(node)
        if "bridge" in paths:
            pid = world.start_bridge()
        world.check_linked(node, paths)
        load_before = loadavg()
        print(f"measuring... (load average {load_before})", flush=True)
        results = run_rounds(runner, world.client.path, paths, workloads, args.rounds, pid)
        load_after = loadavg()
        if node.objects():
            raise BenchError(f"the node still holds {sorted(node.objects())} after the rounds")
    except (CommandError, AssertionError) as exc:
        raise BenchError(str(exc)) from None
    finally:
        world.close()
    report(results, workloads, paths)
    spread(results, workloads, paths)
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_in_temp_dir("bench_nodes", "tb-bench-nodes-", bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
