#!/usr/bin/env python3
"""Load benchmark: N concurrent P2P sessions against one torbridge daemon.

Asks: how many requests per second does one daemon serve when N clients
are connected at once, how long does each request take, and how much
memory does the daemon need for it?

What it does, all on this machine (unix sockets, a temp dir with its own
HOME, removed at the end together with the daemon):

1. creates a proxy repository with ``--seed`` small annexed files and
   starts ``torbridge serve`` on it (endpoint ``hub``, ``remote = "."``,
   so every session is relayed to its own ``git-annex-shell p2pstdio``),
   with ``max_sessions``, ``max_sessions_per_token`` and
   ``max_unauthenticated`` raised above N so that the caps are not what is
   measured (``--pre-auth-cap`` sets the
   latter, e.g. to see the flood refused);
2. opens N sessions (at most ``--connects-at-once`` in the AUTH phase at a
   time), each: ``AUTH``, ``VERSION 4``, then waits until all N are open,
   then ``CHECKPRESENT`` of a present and of an absent key, ``GET`` of a
   small present object (bytes checked, ``VALID``, ``SUCCESS``) and ``PUT``
   of a fresh one (``PUT-FROM 0``, ``DATA``, ``VALID``, ``SUCCESS``), then
   waits until all N are done, close. ``--mix-at-once K`` lets at most K
   sessions do their requests at the same moment (the others stay
   connected): every ``git-annex-shell`` takes git-annex's keys database
   lock for a GET or PUT, and 1000 at once on 2 cores queue for it for many
   minutes (try ``--sessions 1000`` with and without ``--mix-at-once 100``);
3. optionally (``--flood K``) runs a flood of K unauthenticated connections
   at the same time (idle / garbage / partial AUTH / a 40000-byte line, at
   most ``--flood-concurrency`` open at once);
4. checks that every PUT object is in the proxy repository (and with
   ``--fsck`` runs ``git annex fsck`` there).

Output: per-request latency percentiles (p50/p90/p99/max) by operation;
throughput = the mix's requests (CHECKPRESENT x2, GET, PUT per session)
per second of wall time from the first connect to the last close (and the
same with AUTH and VERSION counted); the daemon's peak VmRSS (sampled every
0.1 s) and VmHWM; the CPU seconds the daemon used; the peak number, summed
PSS (``/proc/PID/smaps_rollup``) and total CPU time of its
``git-annex-shell`` helpers. The last line is for
scripts::

    RESULT sessions=200 errors=0 wall_s=24.7 req_per_s=32.4 p50_ms=540.9 p99_ms=13599.1
      rss_peak_kib=34200 hwm_kib=34300 ...

Run from the repository root (it imports the test harness,
``tests/harness/``)::

    python -m bench.bench_load                          # N=200
    python -m bench.bench_load --sessions 1000 --mix-at-once 100   # ~5 GiB of RAM
    python -m bench.bench_load --sessions 200 --flood 2000 --pre-auth-cap 32

Needs git, git-annex >= 10.20261026 (``pip install -e '.[test]'``) and
torbridge installed (``torbridge`` on PATH), like the e2e tests. Figures on a
2-core shared machine are noisy: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo
from tests.harness.bridge import SESSION_HELPERS, Bridge
from tests.harness.load import (
    REQUEST_OPS,
    FloodStats,
    Gate,
    Obj,
    RssSampler,
    Stats,
    Target,
    absent_keys,
    flood,
    percentile,
    raise_nofile,
    seed_proxy,
    start_mixes,
)
from tests.harness.process import descendants


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime of a process, the same of its waited-for children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages divided among their users), KiB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class HelperSampler:
    """Peak count and summed PSS of the daemon's session helpers (every second)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_count = 0
        self.peak_rss_kib = 0

    def sample(self) -> None:
        helpers = [
            pid for pid, cmd in descendants(self.pid) if any(w in cmd for w in SESSION_HELPERS)
        ]
        rss = sum(pss_kib(pid) for pid in helpers)
        self.peak_count = max(self.peak_count, len(helpers))
        self.peak_rss_kib = max(self.peak_rss_kib, rss)

    async def run(self, limit: float = 3600.0) -> None:
        with trio.move_on_after(limit):
            while True:
                await trio.to_thread.run_sync(self.sample)
                await trio.sleep(1.0)


def row(op: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"  {op:<14} {len(ms):>6} {percentile(ms, 50):>9.1f} {percentile(ms, 90):>9.1f}"
        f" {percentile(ms, 99):>9.1f} {max(ms):>9.1f}"
    )


async def bench(args: argparse.Namespace, work: Path) -> int:
    n = args.sessions
    rng = random.Random(args.seed_rng)
    env = AnnexEnv.create(work / "env")
    proxy = AnnexRepo.create(env, work / "proxy", "proxy")
    print(f"seeding the proxy repository with {args.seed} objects ...", flush=True)
    seeds = seed_proxy(proxy, args.seed, rng)
    cap = args.pre_auth_cap or n + args.connects_at_once + 64
    limits: dict[str, float] = {
        "max_sessions": n + 10,
        "max_sessions_per_token": n + 10,
        "max_unauthenticated": cap,
        "peer_timeout": args.time_limit,  # git-annex-shell may queue for its locks
    }
    if args.auth_timeout:
        limits["auth_timeout"] = args.auth_timeout
    bridge = Bridge(env, proxy.path, work / "bridge", limits=limits)
    try:
        bridge.start()
        token = bridge.add_token("bench", "rw")
        target = Target(token.socket, token.token, proxy.uuid)
        fresh = [Obj.random(rng, args.min_size, args.max_size) for _ in range(n)]
        absent = [Obj.random(rng).key for _ in range(8)]
        idle = bridge.proc_status()
        cpu0, children0 = cpu_seconds(bridge.pid)

        stats = Stats()
        fstats = FloodStats()
        gate, end_gate = Gate(n), Gate(n)
        limiter = trio.CapacityLimiter(args.connects_at_once)
        mixing = trio.CapacityLimiter(args.mix_at_once or n)
        rss = RssSampler(bridge.pid)
        helpers = HelperSampler(bridge.pid)
        print(
            f"{n} sessions{f' and a flood of {args.flood}' if args.flood else ''} ...", flush=True
        )
        start = time.monotonic()
        with trio.fail_after(args.time_limit):
            async with trio.open_nursery() as outer:
                outer.start_soon(rss.run)
                outer.start_soon(helpers.run)
                async with trio.open_nursery() as nursery:
                    if args.flood:
                        nursery.start_soon(
                            lambda: flood(
                                token.socket,
                                args.flood,
                                args.flood_concurrency,
                                (args.auth_timeout or 10.0) + 10.0,
                                fstats,
                                time_limit=args.time_limit,
                            )
                        )
                    start_mixes(
                        nursery,
                        n,
                        target,
                        seeds,
                        absent,
                        fresh,
                        stats,
                        gate=gate,
                        end_gate=end_gate,
                        time_limit=args.time_limit,
                        connect_limiter=limiter,
                        work_limiter=mixing,
                    )
                outer.cancel_scope.cancel()
        wall = time.monotonic() - start
        rss.sample()
        cpu = cpu_seconds(bridge.pid)[0] - cpu0
        after = bridge.proc_status()
        totals = bridge.totals()

        missing = absent_keys(proxy, stats.stored)
        if args.fsck:
            print("git annex fsck in the proxy repository ...", flush=True)
            proxy.fsck_content(timeout=1800)
        left = bridge.wait_idle(60)
        children_cpu = cpu_seconds(bridge.pid)[1] - children0  # the helpers have been reaped
        bridge.stop(timeout=60)
    finally:
        bridge.close()

    print()
    print(
        f"torbridge load bench: {n} concurrent sessions "
        f"({args.mix_at_once or n} in requests at once), objects {args.min_size}.."
        f"{args.max_size} B, git-annex {GIT_ANNEX_BINARY.parent.name}"
    )
    print(f"  {'operation':<14} {'n':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for op in (*REQUEST_OPS, "auth", "version"):
        if stats.latencies.get(op):
            print(row(op, stats.latencies[op]))
    reqs = stats.all(REQUEST_OPS)
    if reqs:
        print(row("all requests", reqs))
    print(
        f"sessions ok {stats.sessions_ok}/{n}, errors {len(stats.errors)}, "
        f"at most {stats.peak_open} open at once, "
        f"connect retries (backlog full) {stats.connect_retries}"
    )
    for e in stats.errors[:10]:
        print(f"  error: {e}")
    print(
        f"wall {wall:.1f}s; throughput {stats.requests / wall:.1f} requests/s "
        f"({stats.exchanges / wall:.1f}/s with AUTH and VERSION), "
        f"{stats.sessions_ok / wall:.1f} sessions/s"
    )
    print(
        f"daemon: VmRSS idle {idle.get('VmRSS', 0) / 1024:.1f} MiB, peak "
        f"{rss.peak_kib / 1024:.1f} MiB (sampled), VmHWM {after.get('VmHWM', 0) / 1024:.1f} MiB;"
        f" CPU {cpu:.1f}s ({cpu / wall * 100:.0f}% of one core)"
    )
    print(
        f"session helpers (git-annex-shell): at most {helpers.peak_count} at once, "
        f"summed PSS peak {helpers.peak_rss_kib / 1024:.0f} MiB, "
        f"CPU {children_cpu:.1f}s in all (machine: {os.cpu_count()} cores)"
    )
    print(f"daemon totals: {totals}")
    if args.flood:
        print(f"flood: {fstats.summary()}")
    if missing:
        print(f"PUT objects missing from the proxy repository: {len(missing)}")
    if left:
        print(f"session helpers still running 60 s after the end: {len(left)}")
    p50 = percentile(reqs, 50) * 1000 if reqs else float("nan")
    p99 = percentile(reqs, 99) * 1000 if reqs else float("nan")
    print(
        f"RESULT sessions={n} errors={len(stats.errors)} wall_s={wall:.1f} "
        f"req_per_s={stats.requests / wall:.1f} p50_ms={p50:.1f} p99_ms={p99:.1f} "
        f"rss_peak_kib={rss.peak_kib} hwm_kib={after.get('VmHWM', 0)} "
        f"daemon_cpu_s={cpu:.1f} helpers_peak={helpers.peak_count} "
        f"helpers_cpu_s={children_cpu:.1f} helpers_pss_kib={helpers.peak_rss_kib} "
        f"refused={totals.get('connections_refused_total', 0)}"
    )
    return 1 if stats.errors or missing or left else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sessions", "-n", type=int, default=200, help="concurrent sessions (default 200)"
    )
    parser.add_argument("--seed", type=int, default=16, help="objects in the proxy (16)")
    parser.add_argument("--min-size", type=int, default=64, help="smallest object, bytes")
    parser.add_argument("--max-size", type=int, default=4096, help="largest object, bytes")
    parser.add_argument(
        "--mix-at-once",
        type=int,
        default=0,
        help="at most this many sessions in requests at once "
        "(default: all N; the others stay connected)",
    )
    parser.add_argument(
        "--connects-at-once",
        type=int,
        default=64,
        help="sessions in the AUTH phase at once, from the bench's side (64)",
    )
    parser.add_argument(
        "--flood",
        type=int,
        default=0,
        help="also run this many unauthenticated connections (0: none)",
    )
    parser.add_argument(
        "--flood-concurrency",
        type=int,
        default=300,
        help="at most this many flood connections open at once (300)",
    )
    parser.add_argument(
        "--pre-auth-cap",
        type=int,
        default=0,
        help="max_unauthenticated (default: above N, not measured)",
    )
    parser.add_argument(
        "--auth-timeout",
        type=float,
        default=0.0,
        help="auth_timeout in seconds (default: the daemon's)",
    )
    parser.add_argument(
        "--fsck", action="store_true", help="git annex fsck the proxy repository afterwards"
    )
    parser.add_argument(
        "--time-limit", type=float, default=1800.0, help="seconds the load phase may take (1800)"
    )
    parser.add_argument("--seed-rng", type=int, default=1, help="random seed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    if not GIT_ANNEX_BINARY.exists():
        print(
            f"git-annex binary not found at {GIT_ANNEX_BINARY}: pip install git-annex",
            file=sys.stderr,
        )
        return 2
    if args.sessions < 1 or args.min_size < 1 or args.max_size < args.min_size:
        parser.error("need --sessions >= 1 and 1 <= --min-size <= --max-size")
    raise_nofile(4 * (args.sessions + args.flood_concurrency) + 1024)
    work = Path(tempfile.mkdtemp(prefix="tb-bench-load-"))
    try:
        return trio.run(bench, args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
