#!/usr/bin/env python3
"""Tor benchmark: a stock git-annex client to a tor-annex node, directly vs
through the bridge, over a private Tor network on 127.0.0.1.

    direct  git-annex -> client tor -> node's onion -> torbridge (node) -> git-annex-shell
    bridge  git-annex -> client tor -> bridge's onion -> torbridge (bridge)
              -> SOCKS -> client tor -> node's onion -> torbridge (node) -> git-annex-shell

Both paths end in the same node repository. The client runs in a private
network namespace (its hard-coded SOCKS 127.0.0.1:9050 is ours only there);
see tests/harness/tor.py. Each round times ``git annex copy --to`` and
``git annex get --from`` of one file of ``--mib`` MiB on both paths,
alternating which goes first, and empties the node again after each path
(``drop --from``), so every timed copy transfers. It also reports how long
``torbridge serve`` takes from start to "torbridge ready" (every endpoint
listening and the onion descriptor uploaded), first start and restarts.

Same safety rules as the Tor tier: every tor is on the private network
(TestNet), nothing leaves 127.0.0.0/8, and the daemons' sockets are checked
to be on loopback after the run. Needs root (``ip netns``) and tor.

    python -m bench.bench_tor                 # 100 MiB, 2 rounds (~5-10 min)
    python -m bench.bench_tor --mib 20 --rounds 1
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
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.annex import Client
from tests.harness.tor import leftovers, netns_unavailable
from tests.harness.worlds import NODE_PORT, NODE_VIA_BRIDGE_PORT, TorWorld
from torbridge.testnet import TestNet

MIB = 1024 * 1024
PATHS = ("direct", "bridge")
OPS = ("copy", "get")
FILE = "big.bin"
COMMAND_TIMEOUT = 1800.0


class BenchError(Exception):
    pass


@dataclass
class Timings:
    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # CPU seconds (user + system) spent by each group of processes, per run
    cpu: dict[tuple[str, str], list[dict[str, float]]] = field(default_factory=dict)

    def add(self, path: str, op: str, seconds: float, cpu: dict[str, float]) -> None:
        self.runs.setdefault((path, op), []).append(seconds)
        self.cpu.setdefault((path, op), []).append(cpu)

    def median(self, path: str, op: str) -> float:
        return statistics.median(self.runs[(path, op)])

    def cpu_median(self, path: str, op: str, group: str) -> float:
        return statistics.median(run.get(group, 0.0) for run in self.cpu[(path, op)])


def _cpu_of(pid: int, children: bool) -> float:
    """utime + stime (+ reaped children's) of a process, in seconds; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime (git-annex-shell...)
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds by group: our tors, each daemon (with the session helpers it
    reaped), the SOCKS forwarder, and the git-annex client (reaped children of
    this process). Less sensitive than wall time to other load on the machine."""

    def __init__(self, net: TestNet, world: TorWorld) -> None:
        self.net, self.world = net, world

    def sample(self) -> dict[str, float]:
        w = self.world
        assert w.bridge is not None and w.node is not None and w.netns is not None
        assert w.bridge.proc is not None and w.node.proc is not None
        assert w.netns.forwarder is not None
        times = os.times()
        return {
            "tor": sum(_cpu_of(t.pid, False) for t in self.net.tors),
            "bridge daemon": _cpu_of(w.bridge.proc.pid, True),
            "node daemon": _cpu_of(w.node.proc.pid, True),
            "forwarder": _cpu_of(w.netns.forwarder.pid, False),
            "git-annex client": times.children_user + times.children_system,
        }

    def delta(self, before: dict[str, float]) -> dict[str, float]:
        after = self.sample()
        return {k: after[k] - before[k] for k in after}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def one_path(
    client: Client, world: TorWorld, meter: CpuMeter, key: str, path: str, t: Timings, mib: int
) -> None:
    """copy --to node (timed), drop here, get --from node (timed), empty the node."""
    node = world.node_repo
    if node.has_key(key):
        raise BenchError("the node already holds the file before the copy")
    cpu = meter.sample()
    start = time.monotonic()
    client.annex("copy", "--to", "node", "--", FILE, timeout=COMMAND_TIMEOUT)
    t.add(path, "copy", time.monotonic() - start, meter.delta(cpu))
    if not node.has_key(key):
        raise BenchError(f"{path}: copy --to reported success but the node lacks {key}")
    client.annex("drop", "--", FILE, timeout=COMMAND_TIMEOUT)
    cpu = meter.sample()
    start = time.monotonic()
    client.annex("get", "--from", "node", "--", FILE, timeout=COMMAND_TIMEOUT)
    t.add(path, "get", time.monotonic() - start, meter.delta(cpu))
    if (client.path / FILE).stat().st_size != mib * MIB:
        raise BenchError(f"{path}: get --from brought a file of the wrong size")
    client.annex("drop", "--from", "node", "--", FILE, timeout=COMMAND_TIMEOUT)
    if node.has_key(key):
        raise BenchError(f"{path}: drop --from left the content in the node")
    cells = []
    for op in OPS:
        cpu = t.cpu[(path, op)][-1]
        cells.append(
            f"{op} {t.runs[(path, op)][-1]:6.1f}s (CPU: tor {cpu['tor']:5.1f}s,"
            f" all {sum(cpu.values()):5.1f}s)"
        )
    say(f"  {path:6s} {'  '.join(cells)}  load {os.getloadavg()[0]:.1f}")


def run(args: argparse.Namespace) -> int:
    reason = netns_unavailable()
    if reason is not None:
        raise BenchError(f"no private network namespace: {reason}")
    if shutil.which("tor") is None:
        raise BenchError("tor is not installed")
    logging.getLogger("stem").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-tor-"))
    t = Timings()
    info = RunInfo()
    try:
        workdir = root / "testnet" if args.keep else None
        with TestNet(workdir, progress=lambda m: say(f"testnet: {m}")) as net:
            start = time.monotonic()
            net.start()
            info.network_up = time.monotonic() - start
            world = TorWorld(net, root, progress=lambda m: say(f"world: {m}"))
            try:
                assert world.node is not None and world.bridge is not None
                direct = world.client("direct")
                direct.link(world.node.tor_lines("direct")[NODE_PORT].line, "node", timeout=300)
                via = world.client("bridge")
                via.link(
                    world.bridge.tor_lines("bench")[NODE_VIA_BRIDGE_PORT].line,
                    "node",
                    timeout=300,
                )
                for client in (direct, via):
                    if client.remote_uuid("node") != world.node_repo.uuid:
                        raise BenchError(f"{client.path.name}: linked to the wrong repository")
                source = root / "payload.bin"
                make_file(source, args.mib)
                for client in (direct, via):
                    shutil.copy(source, client.path / FILE)
                    client.annex("add", "--", FILE)
                    client.git("commit", "-q", "-m", "payload")
                source.unlink()
                key = direct.key(FILE)
                if via.key(FILE) != key:
                    raise BenchError("the two clients hold different keys")
                clients = {"direct": direct, "bridge": via}
                meter = CpuMeter(net, world)
                if args.idle > 0:  # background: votes every 10 s, consensus fetches
                    say(f"measuring idle CPU for {args.idle:.0f}s")
                    before = meter.sample()
                    time.sleep(args.idle)
                    info.idle = {k: v / args.idle for k, v in meter.delta(before).items()}
                info.load_before = os.getloadavg()
                for n in range(1, args.rounds + 1):
                    order = PATHS if n % 2 else PATHS[::-1]
                    say(f"round {n}/{args.rounds} ({' then '.join(order)})")
                    for path in order:
                        one_path(clients[path], world, meter, key, path, t, args.mib)
                info.load_after = os.getloadavg()
                world.assert_loopback_only()
                # serve -> ready: after a restart (key in state_dir, tor warm).
                for _ in range(args.restarts):
                    world.bridge.stop()
                    world.bridge.start()
                info.ready = {
                    "bridge": world.bridge.ready_seconds,
                    "node": world.node.ready_seconds,
                }
                world.assert_loopback_only()
            finally:
                world.close()
        left = leftovers()
        if left:
            raise BenchError(f"left behind: {left}")
    finally:
        if args.keep:
            say(f"kept {root} (daemon logs, tor logs)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(args, t, info)
    return 0


@dataclass
class RunInfo:
    network_up: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ready: dict[str, list[float]] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)  # CPU s per s, nothing moving


def report(args: argparse.Namespace, t: Timings, info: RunInfo) -> None:
    print(f"\n{args.mib} MiB, {args.rounds} round(s), medians (MiB/s in brackets)")
    print(f"{'path':8s} {'copy --to':>18s} {'get --from':>18s}")
    for path in PATHS:
        cells = []
        for op in OPS:
            s = t.median(path, op)
            cells.append(f"{s:7.1f}s ({args.mib / s:5.2f})")
        print(f"{path:8s} {cells[0]:>18s} {cells[1]:>18s}")
    for op in OPS:
        ratio = t.median("direct", op) / t.median("bridge", op)
        verdict = "meets" if ratio >= 0.95 else "below"
        print(f"bridge/direct throughput, {op}: {ratio:.2f}x ({verdict} the 0.95x target)")
    groups = list(next(iter(t.cpu.values()))[0])
    print(f"\nCPU seconds per run (median), user + system: {', '.join(groups)}")
    for path in PATHS:
        for op in OPS:
            cells = [f"{t.cpu_median(path, op, g):6.1f}" for g in groups]
            total = sum(t.cpu_median(path, op, g) for g in groups)
            print(f"  {path:6s} {op:4s} {' '.join(cells)}   total {total:6.1f}")
    if info.idle:
        print(
            f"idle tors: {info.idle['tor']:.2f} CPU s/s (the private network's own"
            " voting and fetching); tor CPU net of it:"
        )
        for path in PATHS:
            for op in OPS:
                net_cpu = [
                    run["tor"] - info.idle["tor"] * secs
                    for run, secs in zip(t.cpu[(path, op)], t.runs[(path, op)], strict=True)
                ]
                print(f"  {path:6s} {op:4s} {statistics.median(net_cpu):6.1f}s")
    print(
        f"\nload average (1, 5, 15 min) before the rounds: {info.load_before}, "
        f"after: {info.load_after} ({os.cpu_count()} CPUs)"
    )
    print(f"private network up: {info.network_up:.1f}s")
    print("torbridge serve -> ready: the first start, then each timed restart (key kept)")
    for name, values in info.ready.items():
        print(f"  {name}: {', '.join(f'{v:.1f}s' for v in values)}")
    for (path, op), values in sorted(t.runs.items()):
        print(f"  all runs {path} {op}: {', '.join(f'{v:.1f}s' for v in values)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=100, help="size of the file (MiB)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (alternating the order)")
    p.add_argument("--restarts", type=int, default=2, help="bridge restarts timed to ready")
    p.add_argument("--idle", type=float, default=20, help="seconds of idle CPU sampling")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    args = p.parse_args()
    if args.mib < 1 or args.rounds < 1 or args.restarts < 0:
        p.error("--mib and --rounds must be >= 1, --restarts >= 0")
    try:
        return run(args)
    except BenchError as e:
        print(f"bench_tor: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
