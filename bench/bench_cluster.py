#!/usr/bin/env python3
"""Cluster benchmark: a stock git-annex client PUTs to a 3-node cluster vs to one node.

One torbridge daemon exposes two endpoints of the same proxy repository:

  cluster  `cl`: a git-annex cluster (initcluster/updatecluster, as
           tests/nodes/clusters.py sets it up) of N nodes; one PUT from the
           client is fanned out to every node
  single   `solo`: one more node of the same kind, proxied on its own

Every node is a real git-annex repository served by `git annex remotedaemon`
over the test P2P network of tests/nodes (p2p-annex::tbnode:NAME). Each
round times `git annex copy --to` of one big file and of many 4 KiB files
to both endpoints, alternating which goes first, checks that every node got
every object, and empties the nodes again through the bridge (`drop --from
--force`). It reports medians, the cluster/single throughput ratio (issue
5's target: >= 0.8) and the daemon's peak RSS (VmHWM) per run. See
bench/README.md.

Run from the repository root; everything stays on this machine (pipes and
unix sockets, no network).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_transfer import sigterm_as_interrupt
from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.clusters import CLUSTER, init_cluster
from tests.harness.nodes import Node, NodeNet, make_node
from tests.harness.process import CommandError, descendants

ROOT = Path(__file__).resolve().parent.parent  # the checkout, for the daemon's PYTHONPATH

MIB = 1024 * 1024
SMALL_SIZE = 4096
PATHS = ("cluster", "single")
ENDPOINTS = {"cluster": "cl", "single": "solo"}
WORKLOADS = ("big", "small")
BIG_TARGET = "big.bin"
SMALL_TARGET = "small"
COMMAND_TIMEOUT = 3600.0  # one copy of --big-mib on a loaded machine
REAP_WAIT = 1.0  # seconds after a copy before its CPU is counted (not timed)
QUICK = {"big_mib": 64, "small": 100, "rounds": 2}


class BenchError(Exception):
    """A setup or run failure, reported as one clear message."""


@dataclass
class Workload:
    name: str
    target: str
    files: int
    size: int  # total bytes

    @property
    def label(self) -> str:
        if self.name == "big":
            return f"big ({self.size // MIB} MiB)"
        return f"small ({self.files} x {SMALL_SIZE // 1024} KiB)"


@dataclass
class Results:
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rss_kib: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # VmHWM per run
    # CPU seconds per run and part: "daemon" (its own), "relays" (its
    # helpers: node transports, git-annex queries), "nodes", "client".
    cpu: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    rss_idle_kib: int = 0
    rss_resettable: bool = True

    def median(self, path: str, workload: str) -> float | None:
        values = self.seconds.get((path, workload))
        return statistics.median(values) if values else None

    def spread(self, path: str, workload: str) -> float | None:
        """(max - min) / median over the rounds."""
        values = self.seconds.get((path, workload))
        if not values or len(values) < 2:
            return None
        return (max(values) - min(values)) / statistics.median(values)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="big file size (default 1024)")
    parser.add_argument("--small", type=int, default=1000, help="number of 4 KiB files")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median over them)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: --big-mib {QUICK['big_mib']} --small {QUICK['small']}"
        f" --rounds {QUICK['rounds']}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.big_mib < 1 or args.small < 1 or args.rounds < 1 or args.nodes < 1:
        parser.error("--big-mib, --small, --rounds and --nodes must be at least 1")
    return args


# ---------------------------------------------------------------- setup


@dataclass
class Rig:
    env: AnnexEnv
    proxy: AnnexRepo
    cluster_nodes: list[Node]
    single_node: Node
    bridge: Bridge
    client: Client

    def nodes_of(self, path: str) -> list[Node]:
        return self.cluster_nodes if path == "cluster" else [self.single_node]


def make_workload(client: Client, args: argparse.Namespace) -> list[Workload]:
    with open(client.path / BIG_TARGET, "wb") as out:
        for _ in range(args.big_mib):
            out.write(os.urandom(MIB))
    (client.path / SMALL_TARGET).mkdir()
    for i in range(args.small):
        (client.path / SMALL_TARGET / f"f{i:05d}").write_bytes(os.urandom(SMALL_SIZE))
    client.annex("add", "--quiet", BIG_TARGET, SMALL_TARGET, timeout=COMMAND_TIMEOUT)
    client.git("commit", "-q", "-m", "bench workload")
    return [
        Workload("big", BIG_TARGET, 1, args.big_mib * MIB),
        Workload("small", SMALL_TARGET, args.small, args.small * SMALL_SIZE),
    ]


def build(root: Path, args: argparse.Namespace, stack: ExitStack) -> tuple[Rig, list[Workload]]:
    if not GIT_ANNEX_BINARY.exists():
        raise BenchError(f"no git-annex binary at {GIT_ANNEX_BINARY} (pip install -e '.[test]')")
    env = AnnexEnv.create(root / "env")
    # The daemon and the client-side relay import this checkout's torbridge.
    env.env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    net = NodeNet(env, root / "tbnode")
    proxy = AnnexRepo.create(env, root / "proxy", "proxy")

    def node(name: str) -> Node:
        made = make_node("p2p", name, env, net, proxy, root / "nodes")
        assert made.server is not None
        stack.callback(made.server.stop)
        return made

    cluster_nodes = [node(f"c{i}") for i in range(1, args.nodes + 1)]
    single_node = node("solo")
    init_cluster(proxy, cluster_nodes)
    # limits={}: the daemon's own defaults, not the short ones of the tests.
    bridge = Bridge(
        env,
        proxy.path,
        root / "bridge",
        [Expose("hub", ".", 5000), Expose("cl", CLUSTER, 5001), Expose("solo", "solo", 5002)],
        limits={},
    )
    stack.callback(bridge.close)
    bridge.start()
    stack.callback(bridge.stop)
    client = Client.create(env, root / "client", "client")
    for endpoint in ENDPOINTS.values():
        client.link(bridge.add_token(f"bench-{endpoint}", "rw", endpoint=endpoint).line, endpoint)
    # As tests/nodes/clusters.py: the client learns cluster.log, so it counts
    # the nodes a SUCCESS-PLUS names as copies in the cluster.
    client.annex("pull", "--no-content", "cl")
    workloads = make_workload(client, args)
    return Rig(env, proxy, cluster_nodes, single_node, bridge, client), workloads


# ---------------------------------------------------------------- measuring


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def proc_cpu_secs(pid: int) -> tuple[float, float]:
    """(utime + stime of the process, of its reaped children); zeros if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def helpers_cpu(pid: int) -> float:
    """CPU of everything ``pid`` started: reaped, and still running (such as
    git-annex's long-lived `git cat-file --batch` or `whereis --batch`)."""
    total = proc_cpu_secs(pid)[1]
    for child, _cmd in descendants(pid):
        total += sum(proc_cpu_secs(child))
    return total


def cpu_parts(rig: Rig, path: str) -> dict[str, float]:
    """CPU seconds so far of each part of the data path (see Results.cpu)."""
    pid = rig.bridge.proc.pid if rig.bridge.proc is not None else 0
    own = proc_cpu_secs(pid)[0]
    children = helpers_cpu(pid)
    nodes = 0.0
    for node in rig.nodes_of(path):
        if node.server is not None and node.server.proc is not None:
            nodes += proc_cpu_secs(node.server.proc.pid)[0] + helpers_cpu(node.server.proc.pid)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "daemon": own,
        "relays": children,
        "nodes": nodes,
        "client": usage.ru_utime + usage.ru_stime,
    }


def reset_peak_rss(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def annex_json(repo: AnnexRepo, args: Sequence[str], expect: int) -> float:
    """`git annex ARGS --json`: every file must succeed; returns seconds."""
    start = time.perf_counter()
    try:
        result = repo.annex(*args, "--json", timeout=COMMAND_TIMEOUT)
    except CommandError as e:
        raise BenchError(f"`git annex {' '.join(args)}` failed:\n{e}") from None
    elapsed = time.perf_counter() - start
    ok = sum(
        1
        for line in result.stdout.splitlines()
        if line.strip() and json.loads(line).get("success") is True
    )
    if ok != expect:
        raise BenchError(
            f"`git annex {' '.join(args)}` handled {ok} files, expected {expect}:\n"
            + result.describe()[-4000:]
        )
    return elapsed


def node_keys(rig: Rig, workload: Workload) -> set[str]:
    out = rig.client.annex("find", "--format=${key}\\n", workload.target).stdout
    return {line for line in out.splitlines() if line}


def check_nodes(nodes: Sequence[Node], keys: set[str], present: bool) -> None:
    for node in nodes:
        have = node.objects() & keys
        if present and have != keys:
            raise BenchError(f"{node.name} got {len(have)} of {len(keys)} objects")
        if not present and have:
            raise BenchError(f"{node.name} still has {len(have)} objects after the drop")


def measure(rig: Rig, path: str, workload: Workload, keys: set[str], results: Results) -> None:
    """One timed copy --to; then checks the nodes and empties them through the bridge."""
    remote = ENDPOINTS[path]
    pid = rig.bridge.proc.pid if rig.bridge.proc is not None else 0
    results.rss_resettable &= reset_peak_rss(pid)
    before = cpu_parts(rig, path)
    secs = annex_json(rig.client, ["copy", "--to", remote, workload.target], workload.files)
    results.rss_kib.setdefault((path, workload.name), []).append(proc_status_kib(pid, "VmHWM"))
    time.sleep(REAP_WAIT)  # the session's helpers are reaped (and counted) once it ends
    after = cpu_parts(rig, path)
    results.seconds.setdefault((path, workload.name), []).append(secs)
    cpu = results.cpu.setdefault((path, workload.name), {})
    for part, value in after.items():
        cpu.setdefault(part, []).append(value - before[part])
    nodes = rig.nodes_of(path)
    check_nodes(nodes, keys, present=True)
    annex_json(rig.client, ["drop", "--from", remote, "--force", workload.target], workload.files)
    check_nodes(nodes, keys, present=False)


def run_rounds(rig: Rig, workloads: Sequence[Workload], rounds: int) -> Results:
    results = Results()
    pid = rig.bridge.proc.pid if rig.bridge.proc is not None else 0
    results.rss_idle_kib = proc_status_kib(pid, "VmHWM")
    keys = {w.name: node_keys(rig, w) for w in workloads}
    for rnd in range(rounds):
        order = list(PATHS) if rnd % 2 == 0 else list(reversed(PATHS))
        for workload in workloads:
            for path in order:
                print(f"  round {rnd + 1}/{rounds}: {path:7} {workload.label}", flush=True)
                measure(rig, path, workload, keys[workload.name], results)
    return results


# ---------------------------------------------------------------- reporting


def ratio(results: Results, workload: str) -> float | None:
    """cluster throughput / single throughput (the same bytes in both)."""
    cluster = results.median("cluster", workload)
    single = results.median("single", workload)
    if not cluster or not single:
        return None
    return single / cluster


def total_cpu(results: Results, path: str, workload: str) -> float:
    parts = results.cpu.get((path, workload), {})
    return sum(statistics.median(values) for values in parts.values())


def cpu_ratio(results: Results, workload: str) -> float | None:
    """CPU seconds of the cluster path over the single node's, for the same bytes."""
    single = total_cpu(results, "single", workload)
    return total_cpu(results, "cluster", workload) / single if single else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "nan" if value is None else f"{value:.{digits}f}"


def report(results: Results, workloads: Sequence[Workload], nodes: int) -> None:
    print()
    print(
        f"{'path':8} {'workload':22} {'seconds':>9} {'rate':>13} {'spread':>7}"
        f" {'VmHWM KiB':>10}   CPU s: daemon relays nodes client (median)"
    )
    for workload in workloads:
        for path in PATHS:
            secs = results.median(path, workload.name)
            if secs is None:
                continue
            if workload.name == "big":
                rate = f"{workload.size / MIB / secs:.1f} MiB/s"
            else:
                rate = f"{workload.files / secs:.1f} files/s"
            spread = results.spread(path, workload.name)
            spread_text = "-" if spread is None else f"{spread * 100:.0f}%"
            parts = results.cpu[(path, workload.name)]
            cpu = " ".join(
                f"{statistics.median(parts[p]):6.2f}"
                for p in ("daemon", "relays", "nodes", "client")
            )
            rss = max(results.rss_kib[(path, workload.name)])
            print(
                f"{path:8} {workload.label:22} {secs:9.3f} {rate:>13} {spread_text:>7}"
                f" {rss:10d}   {cpu}"
            )
    print()
    print(f"cluster ({nodes} nodes) / single node, throughput (medians; target >= 0.8):")
    for workload in workloads:
        print(f"  {workload.name:5}  {fmt(ratio(results, workload.name))}")
    print("CPU seconds of the whole data path (daemon + relays + nodes + client), medians:")
    for workload in workloads:
        totals = {p: total_cpu(results, p, workload.name) for p in PATHS}
        busy = {p: totals[p] / (results.median(p, workload.name) or 1.0) for p in PATHS}
        print(
            f"  {workload.name:5}  cluster {totals['cluster']:.1f} s, single"
            f" {totals['single']:.1f} s: x{fmt(cpu_ratio(results, workload.name), 2)};"
            f" cores busy on average: cluster {busy['cluster']:.2f},"
            f" single {busy['single']:.2f} (of {os.cpu_count()})"
        )
    note = "" if results.rss_resettable else " (peak since start: clear_refs unavailable)"
    peaks = {key: max(v) for key, v in results.rss_kib.items()}
    print(
        f"torbridge daemon VmHWM{note}: idle {results.rss_idle_kib} KiB, "
        + ", ".join(f"{p} {w} {peaks.get((p, w))} KiB" for w in WORKLOADS for p in PATHS)
    )
    first = {key: v[0] for key, v in results.rss_kib.items()}
    last = {key: v[-1] for key, v in results.rss_kib.items()}
    drift = max((last[k] - first[k] for k in first), default=0)
    print(f"  largest growth of a run's peak from round 1 to the last: {drift} KiB")
    print()
    print(
        "RESULT "
        + " ".join(f"{w}_ratio={fmt(ratio(results, w))}" for w in WORKLOADS)
        + " "
        + " ".join(f"{w}_cpu_ratio={fmt(cpu_ratio(results, w), 2)}" for w in WORKLOADS)
        + " "
        + " ".join(
            f"{p}_{w}_mibs={fmt(w_size / MIB / s if (s := results.median(p, w)) else None, 1)}"
            for w, w_size in ((wl.name, wl.size) for wl in workloads)
            for p in PATHS
        )
        + f" rss_idle_kib={results.rss_idle_kib}"
        + "".join(f" rss_{p}_{w}_kib={peaks.get((p, w))}" for p in PATHS for w in WORKLOADS)
    )


# ---------------------------------------------------------------- main


def check_disk(root: Path, args: argparse.Namespace) -> None:
    # The client's copy, every cluster node's and the single node's.
    need = (args.nodes + 2) * (args.big_mib * MIB + 2 * args.small * SMALL_SIZE) + 512 * MIB
    free = shutil.disk_usage(root).free
    if free < need:
        raise BenchError(
            f"{root} has {free // MIB} MiB free, the workload needs about {need // MIB} MiB"
            " (use a smaller --big-mib or point TMPDIR elsewhere)"
        )


def bench(root: Path, args: argparse.Namespace) -> None:
    check_disk(root, args)
    print(
        f"{os.cpu_count()} CPUs; load {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
        f" big file {args.big_mib} MiB, {args.small} small files, {args.rounds} round(s),"
        f" {args.nodes} cluster nodes"
    )
    print(f"temp dir {root}")
    print("setting up nodes, cluster, daemon and client...", flush=True)
    with ExitStack() as stack:
        rig, workloads = build(root, args, stack)
        version = rig.env.run(["git", "annex", "version", "--raw"]).stdout.strip()
        print(f"git-annex {version}; measuring...", flush=True)
        results = run_rounds(rig, workloads, args.rounds)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(results, workloads, args.nodes)


def remove_tree(root: Path) -> None:
    """rmtree that also works as non-root: git-annex makes object dirs read-only."""
    for dirpath, _dirnames, _filenames in os.walk(root):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="tb-bcl-"))
    try:
        with sigterm_as_interrupt():
            bench(root, args)
    except (BenchError, CommandError, AssertionError) as exc:
        print(f"bench_cluster: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_cluster: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
