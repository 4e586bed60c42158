#!/usr/bin/env python3
"""Idle-session bench: what many connected, quiet clients cost one daemon.

Asks (issue 14): with thousands of authenticated clients connected and
idle, half of them waiting for change notifications, how much memory do
the daemon and its children hold, how long does one push's CHANGED take
to reach every watcher, and do transfers that start among them all work?

Two phases, each with its own daemon on the same proxy repository, in one
run, all on this machine (unix sockets, a temp dir with its own HOME):

- ``baseline``: the old behaviour. Every session starts its
  ``git-annex-shell`` and keeps it: AUTH, VERSION, CHECKPRESENT (before
  issue 14, VERSION itself started the shell), with ``peer_idle`` longer
  than the run. At a smaller N (``--baseline-sessions``), since N shells of
  10-20 MiB each may not fit in memory.
- ``idle``: the new behaviour, ``--sessions`` clients: AUTH, VERSION (answered
  without a shell), then quiet; ``--watchers`` of them send NOTIFYCHANGE, as
  a remotedaemon does. ``peer_idle`` = ``--peer-idle`` seconds.

Each phase then:

1. waits until the sessions are settled (every shell up in the baseline;
   none left in the idle phase) and measures the daemon's VmRSS, the
   summed RSS and PSS of all its descendants (the shells and their git
   children), and the daemon's open descriptors;
2. pushes one commit with a stock client (``git push`` through the bridge)
   and times when each watcher's ``CHANGED`` arrives, from the end of the
   push (and from its start);
3. lets ``--transfers`` of the quiet sessions transfer at once, on their
   own connections (GET of a seeded object, bytes checked; PUT of a fresh
   one; CHECKPRESENT of it), while the stock client does ``git annex copy
   --to`` and ``get --from`` of ``--client-files`` files; every transfer
   must succeed and every PUT object be in the proxy afterwards;
4. measures the memory again once the transfers are over (and, in the
   idle phase, their shells stopped again).

Output: a table per phase and the per-session cost (total memory over
the daemon's own before any session, divided by N), the ratio idle /
baseline, and a ``RESULT`` line. Run from the repository root (it imports
``tests/harness/``)::

    python -m bench.bench_idle                                  # 2000 (1000 watching) vs 200
    python -m bench.bench_idle --sessions 200 --watchers 100 --baseline-sessions 50 --transfers 10

Descriptors: the bench raises its own soft RLIMIT_NOFILE (the daemon it
starts inherits it); the daemon needs about one per session plus four per
running shell (systemd/torbridge.service sets LimitNOFILE=16384).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, proc_status_kib
from tests.harness.load import Obj, absent_keys, percentile, raise_nofile, seed_proxy
from tests.harness.process import descendants
from tests.harness.session import AsyncSession

WAIT = 600.0  # seconds any one step may take on a loaded machine


def kib_of(pid: int, field_name: str, path: str = "status") -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Memory:
    daemon_rss_kib: int
    children: int
    shells: int
    children_rss_kib: int
    children_pss_kib: int
    daemon_fds: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        kids = descendants(pid)
        shells = sum(1 for _p, cmd in kids if "p2pstdio" in cmd)
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = -1
        return cls(
            daemon_rss_kib=proc_status_kib(pid).get("VmRSS", 0),
            children=len(kids),
            shells=shells,
            children_rss_kib=sum(kib_of(p, "VmRSS") for p, _c in kids),
            children_pss_kib=sum(kib_of(p, "Pss", "smaps_rollup") for p, _c in kids),
            daemon_fds=fds,
        )

    @property
    def total_rss_kib(self) -> int:
        return self.daemon_rss_kib + self.children_rss_kib

    @property
    def total_pss_kib(self) -> int:
        return self.daemon_rss_kib + self.children_pss_kib

    def line(self) -> str:
        return (
            f"daemon VmRSS {self.daemon_rss_kib / 1024:.1f} MiB, {self.children} children "
            f"({self.shells} git-annex-shell) RSS {self.children_rss_kib / 1024:.1f} MiB "
            f"/ PSS {self.children_pss_kib / 1024:.1f} MiB; total RSS "
            f"{self.total_rss_kib / 1024:.1f} MiB; daemon fds {self.daemon_fds}"
        )


@dataclass
class Phase:
    label: str
    sessions: int
    watchers: int
    start_with_request: bool
    peer_idle: float
    before: Memory | None = None
    settled: Memory | None = None
    after: Memory | None = None
    peak: Memory | None = None  # the highest total PSS sampled during the transfers
    connect_s: float = 0.0
    # Per push round: its duration, when the median and the last watcher heard
    # CHANGED (seconds from the push's start), how many heard it.
    push_s: list[float] = field(default_factory=list)
    last_changed_s: list[float] = field(default_factory=list)
    median_changed_s: list[float] = field(default_factory=list)
    heard: list[int] = field(default_factory=list)
    transfers_ok: int = 0
    transfers: int = 0
    client_ok: bool = False
    errors: list[str] = field(default_factory=list)
    peak_shells: int = 0

    @property
    def per_session_kib(self) -> float:
        assert self.settled is not None and self.before is not None
        return (self.settled.total_rss_kib - self.before.total_rss_kib) / self.sessions

    @property
    def per_session_pss_kib(self) -> float:
        assert self.settled is not None and self.before is not None
        return (self.settled.total_pss_kib - self.before.total_pss_kib) / self.sessions


async def wait_until(what: str, probe: Callable[[], bool]) -> None:
    """Until ``probe()`` (run in a thread) is true; at most WAIT seconds."""
    with trio.move_on_after(WAIT):
        while True:
            if await trio.to_thread.run_sync(probe):
                return
            await trio.sleep(0.5)
    raise TimeoutError(f"still waiting after {WAIT}s: {what}")


async def open_session(
    phase: Phase, target: tuple[Path, str, str], seed: Obj, limiter: trio.CapacityLimiter
) -> AsyncSession:
    path, token, uuid = target
    async with limiter:
        s = await AsyncSession.open(path, seconds=WAIT, reply_timeout=WAIT)
        await s.auth(token, uuid)
        await s.version()
        if phase.start_with_request:
            await s.checkpresent(seed.key, True)
    return s


async def transfer(s: AsyncSession, seed: Obj, fresh: Obj, phase: Phase) -> None:
    try:
        await s.get(seed)
        await s.put(fresh)
        await s.checkpresent(fresh.key, True)
        phase.transfers_ok += 1
    except Exception as e:  # every failure is reported, none stops the others
        phase.errors.append(f"transfer: {type(e).__name__}: {e}")


async def push_round(
    phase: Phase, client: Client, watchers: list[AsyncSession], round_: int
) -> None:
    """One ``git push`` through the bridge; when does each watcher hear CHANGED?"""
    commit = client.commit_git_file("push.txt", f"{phase.label} {round_}\n".encode(), "push")
    arrivals: list[float] = []

    async def hear(s: AsyncSession) -> None:
        try:
            await s.expect(f"CHANGED {commit}", WAIT)
            arrivals.append(time.monotonic())
        except Exception as e:
            phase.errors.append(f"watcher: {type(e).__name__}: {e}")

    branch = f"HEAD:refs/heads/bench-{phase.label}"
    async with trio.open_nursery() as nursery:
        for s in watchers:
            nursery.start_soon(hear, s)
        await trio.sleep(1.0)  # every reader waiting
        t0 = time.monotonic()
        await trio.to_thread.run_sync(lambda: client.git("push", "hub", branch, timeout=WAIT))
        t1 = time.monotonic()
    phase.heard.append(len(arrivals))
    phase.push_s.append(t1 - t0)
    phase.last_changed_s.append(max(arrivals, default=float("nan")) - t0)
    phase.median_changed_s.append(
        percentile([a - t0 for a in arrivals], 50) if arrivals else float("nan")
    )
    print(
        f"[{phase.label}] push {round_ + 1}: {t1 - t0:.2f}s; CHANGED at {len(arrivals)}/"
        f"{phase.watchers} watchers, the last {phase.last_changed_s[-1]:.2f}s after it began",
        flush=True,
    )


async def run_phase(
    args: argparse.Namespace,
    phase: Phase,
    work: Path,
    env: AnnexEnv,
    proxy: AnnexRepo,
    seeds: list[Obj],
    rng: random.Random,
) -> None:
    n = phase.sessions
    cap = n + args.transfers + 64
    limits: dict[str, float] = {
        "max_sessions": cap,
        "max_sessions_per_token": cap,
        "max_unauthenticated": 256,
        "idle_timeout": 86400,
        "peer_timeout": WAIT,
        "peer_idle": phase.peer_idle,
    }
    bridge = Bridge(env, proxy.path, work / phase.label, limits=limits)
    client = Client.create(env, work / f"client-{phase.label}", f"client-{phase.label}")
    sessions: list[AsyncSession] = []
    try:
        bridge.start()
        token = bridge.add_token("bench", "rw")
        client.link(bridge.add_token("client", "rw").line, "hub")
        client.add_files({f"c{i:03d}.bin": rng.randbytes(4096) for i in range(args.client_files)})
        pid = bridge.pid
        # One session first: the daemon learns git-annex-shell's version from it.
        warm = await AsyncSession.open(token.socket, reply_timeout=WAIT)
        await warm.auth(token.token, proxy.uuid)
        await warm.version()
        await warm.checkpresent(seeds[0].key, True)
        await warm.aclose()
        await wait_until("the warm-up shell's end", lambda: Memory.of(pid).shells == 0)
        phase.before = Memory.of(pid)
        print(f"[{phase.label}] before: {phase.before.line()}", flush=True)

        target = (token.socket, token.token, proxy.uuid)
        limiter = trio.CapacityLimiter(args.connects_at_once)
        start = time.monotonic()
        slots: list[AsyncSession | None] = [None] * n

        async def one(i: int) -> None:
            slots[i] = await open_session(phase, target, seeds[i % len(seeds)], limiter)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        sessions = [s for s in slots if s is not None]
        phase.connect_s = time.monotonic() - start
        watchers, quiet = sessions[: phase.watchers], sessions[phase.watchers :]
        for s in watchers:
            await s.send_line("NOTIFYCHANGE")
        print(f"[{phase.label}] {n} sessions open in {phase.connect_s:.1f}s", flush=True)
        if phase.start_with_request:
            await wait_until(f"{n} shells", lambda: Memory.of(pid).shells >= n)
        else:
            await wait_until("no shell", lambda: Memory.of(pid).shells == 0)
        await wait_until(
            f"{phase.watchers} watching sessions",
            lambda: (
                sum(1 for s in bridge.sessions() if s["request"] == "NOTIFYCHANGE")
                == phase.watchers
            ),
        )
        phase.settled = Memory.of(pid)
        print(f"[{phase.label}] settled: {phase.settled.line()}", flush=True)

        # Pushes, one at a time; every watcher must hear of each.
        for round_ in range(args.pushes):
            if round_:
                for s in watchers:
                    await s.send_line("NOTIFYCHANGE")
                await wait_until(
                    "the watchers to wait again",
                    lambda: (
                        sum(1 for s in bridge.sessions() if s["request"] == "NOTIFYCHANGE")
                        == phase.watchers
                    ),
                )
            await push_round(phase, client, watchers, round_)

        # Transfers on quiet connections, and a stock client beside them.
        chosen = quiet[: args.transfers]
        phase.transfers = len(chosen)
        fresh = [Obj.random(rng, 4096, 65536) for _ in chosen]
        names = [f"c{i:03d}.bin" for i in range(args.client_files)]

        def stock_client() -> None:
            try:
                client.annex("copy", "--to", "hub", *names, timeout=WAIT)
                client.annex("drop", *names, timeout=WAIT)
                client.annex("get", "--from", "hub", *names, timeout=WAIT)
                phase.client_ok = True
            except AssertionError as e:
                phase.errors.append(f"stock client: {e}")

        async def sample_shells() -> None:
            while True:
                now = await trio.to_thread.run_sync(lambda: Memory.of(pid))
                phase.peak_shells = max(phase.peak_shells, now.shells)
                if phase.peak is None or now.total_pss_kib > phase.peak.total_pss_kib:
                    phase.peak = now
                await trio.sleep(0.5)

        async with trio.open_nursery() as outer:
            outer.start_soon(sample_shells)
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(chosen):
                    nursery.start_soon(transfer, s, seeds[i % len(seeds)], fresh[i], phase)
                nursery.start_soon(trio.to_thread.run_sync, stock_client)
            outer.cancel_scope.cancel()
        missing = absent_keys(proxy, [f.key for f in fresh])
        if missing:
            phase.errors.append(f"{len(missing)} PUT objects missing from the proxy")
        if not phase.start_with_request:
            await wait_until("the transfers' shells to stop", lambda: Memory.of(pid).shells == 0)
        phase.after = Memory.of(pid)
        print(f"[{phase.label}] after the transfers: {phase.after.line()}", flush=True)
    finally:
        for s in sessions:
            await s.aclose()
        with contextlib.suppress(AssertionError):
            bridge.wait_idle(120)
        with contextlib.suppress(AssertionError):
            bridge.stop(timeout=120)
        bridge.close()


def report(phases: list[Phase]) -> int:
    print()
    print(
        f"torbridge idle-session bench, git-annex {GIT_ANNEX_BINARY.parent.name}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    for p in phases:
        assert p.settled is not None and p.before is not None and p.after is not None
        print(
            f"{p.label}: {p.sessions} sessions ({p.watchers} watching), peer_idle "
            f"{p.peer_idle:g}s, opened in {p.connect_s:.1f}s"
        )
        print(f"  before sessions: {p.before.line()}")
        print(f"  connected, idle: {p.settled.line()}")
        print(f"  after transfers: {p.after.line()}")
        print(
            f"  per session: {p.per_session_kib:.0f} KiB RSS "
            f"({p.per_session_pss_kib:.0f} KiB counting shared pages once)"
        )
        if p.last_changed_s:
            lasts = sorted(x * 1000 for x in p.last_changed_s)
            print(
                f"  {len(lasts)} pushes: CHANGED reached all {p.watchers} watchers "
                f"{percentile(lasts, 50):.0f} ms after git push began (median; min "
                f"{lasts[0]:.0f}, max {lasts[-1]:.0f}); median watcher "
                f"{percentile([x * 1000 for x in p.median_changed_s], 50):.0f} ms; the push "
                f"itself {percentile([x * 1000 for x in p.push_s], 50):.0f} ms; heard {p.heard}"
            )
        if p.peak is not None:
            active = (p.peak.total_pss_kib - p.settled.total_pss_kib) / max(p.transfers, 1)
            print(
                f"  during transfers (peak PSS sample): {p.peak.line()}; "
                f"{active / 1024:.1f} MiB PSS more per transferring session"
            )
        print(
            f"  transfers ok {p.transfers_ok}/{p.transfers} (at most {p.peak_shells} shells "
            f"at once), stock client copy+get {'ok' if p.client_ok else 'FAILED'}"
        )
        for e in p.errors[:10]:
            print(f"  error: {e}")
    new, old = phases[-1], phases[0]
    ratio = new.per_session_kib / old.per_session_kib if old.per_session_kib else float("nan")
    old_pss = old.per_session_pss_kib
    pss_ratio = new.per_session_pss_kib / old_pss if old_pss else float("nan")
    print(f"per-session memory, {new.label} / {old.label}: RSS {ratio:.4f}, PSS {pss_ratio:.4f}")
    last = percentile(new.last_changed_s, 50) if new.last_changed_s else float("nan")
    assert new.settled is not None
    print(
        f"RESULT sessions={new.sessions} watchers={new.watchers} "
        f"total_rss_kib={new.settled.total_rss_kib} daemon_rss_kib={new.settled.daemon_rss_kib} "
        f"per_session_kib={new.per_session_kib:.0f} "
        f"baseline_sessions={old.sessions} baseline_per_session_kib={old.per_session_kib:.0f} "
        f"ratio={ratio:.4f} pss_ratio={pss_ratio:.4f} changed_all_ms={last * 1000:.0f} "
        f"transfers_ok={new.transfers_ok}/{new.transfers} "
        f"errors={sum(len(p.errors) for p in phases)}"
    )
    ok = all(
        not p.errors
        and p.transfers_ok == p.transfers
        and p.client_ok
        and all(h == p.watchers for h in p.heard)
        for p in phases
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sessions", "-n", type=int, default=2000)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument(
        "--baseline-sessions",
        type=int,
        default=200,
        help="sessions of the baseline phase (0: skip it)",
    )
    parser.add_argument("--transfers", type=int, default=50)
    parser.add_argument(
        "--client-files",
        type=int,
        default=20,
        help="4 KiB files the stock client copies and gets back",
    )
    parser.add_argument("--peer-idle", type=float, default=5.0)
    parser.add_argument("--pushes", type=int, default=5, help="push rounds timed (5)")
    parser.add_argument("--connects-at-once", type=int, default=32)
    parser.add_argument("--seed", type=int, default=16, help="objects in the proxy")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    if not GIT_ANNEX_BINARY.exists():
        print(f"git-annex binary not found at {GIT_ANNEX_BINARY}", file=sys.stderr)
        return 2
    if not 0 <= args.watchers <= args.sessions or args.transfers > args.sessions - args.watchers:
        parser.error("need watchers <= sessions and transfers <= sessions - watchers")
    raise_nofile(3 * args.sessions + 6 * max(args.baseline_sessions, args.transfers) + 1024)
    work = Path(tempfile.mkdtemp(prefix="tb-bench-idle-"))

    async def run() -> int:
        rng = random.Random(1)
        env = AnnexEnv.create(work / "env")
        proxy = AnnexRepo.create(env, work / "proxy", "proxy")
        seeds = seed_proxy(proxy, args.seed, rng)
        phases: list[Phase] = []
        if args.baseline_sessions:
            phases.append(
                Phase(
                    "baseline",
                    args.baseline_sessions,
                    args.baseline_sessions // 2,
                    True,
                    10 * 86400,
                )
            )
        phases.append(Phase("idle", args.sessions, args.watchers, False, args.peer_idle))
        for p in phases:
            await run_phase(args, p, work, env, proxy, seeds, rng)
        return report(phases)

    try:
        return trio.run(run)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
