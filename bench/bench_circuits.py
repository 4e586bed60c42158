#!/usr/bin/env python3
"""Parallel circuits to a node: ``git annex copy -J4`` through the bridge to a
tor-annex node, with every relayed session on one tor circuit
(``[tor] node_circuits = 1``, as before) and spread over circuits by SOCKS
credentials (``node_circuits = 8``, the default), in the same run.

    git-annex -J4 -> client tor -> bridge's onion -> torbridge (bridge)
      -> SOCKS (one set of credentials per slot) -> client tor
      -> node's onion -> torbridge (node) -> git-annex-shell

The private Tor network and the stock client in a private network namespace
are those of the Tor tier (tests/harness/tor.py: TorWorld). Each round
restarts the bridge with one setting, copies ``--files`` files of ``--mib``
MiB with ``-J4``, counts the rendezvous circuits the client tor holds to the
node's onion, empties the node again; then the other setting. The order
alternates between rounds. Needs root (``ip netns``) and tor.

    python -m bench.bench_circuits                     # 8 x 4 MiB, 2 rounds
    python -m bench.bench_circuits --files 8 --mib 8 --rounds 1
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.annex import Client
from tests.harness.tor import TorBridge, leftovers, netns_unavailable
from tests.harness.worlds import NODE_VIA_BRIDGE_PORT, TorWorld
from torbridge.testnet import TestNet, TorProcess

MIB = 1024 * 1024
SETTINGS = {"one circuit": 1, "spread": 8}
COMMAND_TIMEOUT = 1800.0


class BenchError(Exception):
    pass


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def set_node_circuits(bridge: TorBridge, n: int) -> None:
    """Restart the bridge with ``[tor] node_circuits = n`` (its onion key is kept)."""
    base = TorBridge.config_text
    bridge.config_text = lambda: base(bridge) + f"node_circuits = {n}\n"  # type: ignore[method-assign]
    bridge.write_config()
    bridge.stop()
    bridge.start()


def rend_circuits(tor: TorProcess, onion: str) -> int:
    """Open client rendezvous circuits of ``tor`` to ``onion``."""
    controller = tor.controller()
    try:
        status = controller.get_info("circuit-status", "")
    finally:
        controller.close()
    service_id = onion.removesuffix(".onion")
    return sum(
        1
        for line in status.splitlines()
        if "PURPOSE=HS_CLIENT_REND" in line and f"REND_QUERY={service_id}" in line
    )


def one_copy(
    world: TorWorld, client: Client, files: list[str], keys: list[str]
) -> tuple[float, int]:
    """copy -J4 --to the node (timed); the node's circuits seen; then empty the node."""
    node = world.node_repo
    assert world.node is not None
    if any(node.has_key(k) for k in keys):
        raise BenchError("the node holds the files before the copy")
    start = time.monotonic()
    client.annex("copy", "-J4", "--to", "nodevia", "--", *files, timeout=COMMAND_TIMEOUT)
    seconds = time.monotonic() - start
    circuits = rend_circuits(world.tors["client"], world.node.onion)
    if not all(node.has_key(k) for k in keys):
        raise BenchError("copy --to reported success but the node lacks a file")
    client.annex("drop", "-J4", "--from", "nodevia", "--", *files, timeout=COMMAND_TIMEOUT)
    if any(node.has_key(k) for k in keys):
        raise BenchError("drop --from left content in the node")
    return seconds, circuits


def run(args: argparse.Namespace) -> int:
    reason = netns_unavailable()
    if reason is not None:
        raise BenchError(f"no private network namespace: {reason}")
    if shutil.which("tor") is None:
        raise BenchError("tor is not installed")
    logging.getLogger("stem").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-circuits-"))
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    seen: dict[str, list[int]] = {name: [] for name in SETTINGS}
    try:
        with TestNet(progress=lambda m: say(f"testnet: {m}")) as net:
            net.start()
            world = TorWorld(net, root, progress=lambda m: say(f"world: {m}"))
            try:
                assert world.bridge is not None
                client = world.client("jobs")
                client.link(
                    world.bridge.tor_lines("bench")[NODE_VIA_BRIDGE_PORT].line,
                    "nodevia",
                    timeout=300,
                )
                files = [f"f{i}.bin" for i in range(args.files)]
                client.add_files({f: os.urandom(args.mib * MIB) for f in files}, "payload")
                keys = [client.key(f) for f in files]
                for n in range(1, args.rounds + 1):
                    order = list(SETTINGS) if n % 2 else list(SETTINGS)[::-1]
                    for name in order:
                        set_node_circuits(world.bridge, SETTINGS[name])
                        seconds, circuits = one_copy(world, client, files, keys)
                        times[name].append(seconds)
                        seen[name].append(circuits)
                        say(
                            f"round {n}: {name:11s} copy -J4 {seconds:6.1f}s"
                            f" ({args.files * args.mib / seconds:5.2f} MiB/s),"
                            f" {circuits} rendezvous circuit(s) to the node;"
                            f" load {os.getloadavg()[0]:.1f}"
                        )
                world.assert_loopback_only()
            finally:
                world.close()
        left = leftovers()
        if left:
            raise BenchError(f"left behind: {left}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = args.files * args.mib
    print(
        f"\ncopy -J4 of {args.files} x {args.mib} MiB through the bridge to a tor-annex node,"
        f" {args.rounds} round(s), medians"
    )
    for name, n in SETTINGS.items():
        s = statistics.median(times[name])
        print(
            f"  node_circuits = {n} ({name}): {s:6.1f}s ({total / s:5.2f} MiB/s),"
            f" rendezvous circuits seen: {seen[name]}"
        )
    ratio = statistics.median(times["one circuit"]) / statistics.median(times["spread"])
    print(f"spread / one circuit throughput: {ratio:.2f}x")
    print(f"load average: {os.getloadavg()} ({os.cpu_count()} CPUs)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8, help="files copied with -J4")
    p.add_argument("--mib", type=int, default=4, help="size of each file (MiB)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (alternating the order)")
    args = p.parse_args()
    if args.files < 1 or args.mib < 1 or args.rounds < 1:
        p.error("--files, --mib and --rounds must be >= 1")
    try:
        return run(args)
    except BenchError as e:
        print(f"bench_circuits: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
