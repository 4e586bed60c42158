"""Load helpers: many raw P2P sessions and a pre-auth flood against one daemon.

Used by tests/load and by ``bench/bench_load.py`` and ``bench/bench_idle.py``.
The daemon (:class:`~tests.harness.bridge.Bridge`, with a ``[limits]``
table, its RSS, ``torbridge status --json`` and metrics) and the trio client
(:class:`~tests.harness.session.AsyncSession`) are the harness's; this
module adds what load needs on top:

- :func:`run_mix`: one authenticated session doing the mixed sequence
  (VERSION 4, CHECKPRESENT present + absent, GET, PUT, close), timing each
  request into a :class:`Stats`.
- :func:`flood`: a bounded flood of unauthenticated connections (idle,
  garbage, a partial AUTH that stalls, a 40000-byte line).
- :class:`RssSampler`, :class:`Obj` and :func:`seed_proxy`.

Safety: unix sockets only; every loop is bounded in count and in time; a
connection is never left open past the deadline its caller gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from tests.harness.annex import AnnexRepo
from tests.harness.bridge import Bridge, proc_status_kib
from tests.harness.session import AsyncSession, SessionClosed

MIB = 1024 * 1024


class RssSampler:
    """Samples a process's VmRSS every ``interval`` s while its ``run`` task lives."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0

    def sample(self) -> None:
        rss = proc_status_kib(self.pid).get("VmRSS", 0)
        self.peak_kib = max(self.peak_kib, rss)
        self.samples += 1

    async def run(self, limit: float = 3600.0) -> None:
        """Until cancelled (or ``limit`` s, whatever comes first)."""
        with trio.move_on_after(limit):
            while True:
                self.sample()
                await trio.sleep(self.interval)


# --- objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """An annexed object: its SHA256E key and its bytes."""

    key: str
    content: bytes

    @classmethod
    def of(cls, content: bytes, ext: str = ".bin") -> Obj:
        digest = hashlib.sha256(content).hexdigest()
        return cls(f"SHA256E-s{len(content)}--{digest}{ext}", content)

    @classmethod
    def random(cls, rng: random.Random, low: int = 64, high: int = 4096) -> Obj:
        return cls.of(rng.randbytes(rng.randint(low, high)))


def seed_proxy(repo: AnnexRepo, count: int, rng: random.Random) -> list[Obj]:
    """``count`` small files annexed (and committed) in the proxy's repository."""
    objs = [Obj.random(rng) for _ in range(count)]
    repo.add_files({f"seed/{i:04d}.bin": o.content for i, o in enumerate(objs)}, "seed")
    found = repo.annex("find", "--format=${key}\\n", "seed").stdout.split()
    assert sorted(found) == sorted(o.key for o in objs), "key computed here != git-annex's"
    return objs


def absent_keys(repo: AnnexRepo, keys: Sequence[str], timeout: float = 120.0) -> list[str]:
    """The keys whose content ``repo`` does not have (one batch process)."""
    if not keys:
        return []
    result = repo.annex(
        "contentlocation", "--batch", input="".join(k + "\n" for k in keys), timeout=timeout
    )
    lines = result.stdout.split("\n")
    assert len(lines) >= len(keys), result.describe()
    return [k for k, loc in zip(keys, lines, strict=False) if not loc.strip()]


# --- statistics ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Stats:
    """Per-request latencies (seconds) by operation, and errors."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sessions_ok: int = 0
    connect_retries: int = 0
    stored: list[str] = field(default_factory=list)  # keys the daemon said SUCCESS to PUT
    # GET bodies compared with their object, and PUT bodies (the tests
    # compare those in the repository afterwards).
    verified_bytes: int = 0
    open_now: int = 0
    peak_open: int = 0  # sessions connected at the same time, at most

    def opened(self) -> None:
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)

    def closed(self) -> None:
        self.open_now -= 1

    def add(self, op: str, seconds: float) -> None:
        self.latencies.setdefault(op, []).append(seconds)

    def all(self, ops: Iterable[str] | None = None) -> list[float]:
        wanted = set(ops) if ops is not None else None
        return [
            v for op, vs in self.latencies.items() if wanted is None or op in wanted for v in vs
        ]

    @property
    def requests(self) -> int:
        """Requests of the mix done (AUTH and VERSION not counted)."""
        return len(self.all(REQUEST_OPS))

    @property
    def exchanges(self) -> int:
        """Every timed exchange, AUTH and VERSION included."""
        return len(self.all())

    def p(self, q: float, ops: Iterable[str] | None = None) -> float:
        return percentile(self.all(ops), q)

    def table(self, title: str) -> str:
        rows = [
            f"{title}: {self.sessions_ok} sessions ok, {len(self.errors)} errors, "
            f"{self.requests} requests, at most {self.peak_open} sessions open at once, "
            f"{self.connect_retries} connect retries (backlog full), "
            f"{self.verified_bytes} bytes of GET/PUT bodies verified"
        ]
        for op in [*REQUEST_OPS, *sorted(set(self.latencies) - set(REQUEST_OPS))]:
            vs = self.latencies.get(op)
            if vs:
                rows.append(
                    f"  {op:<14} n={len(vs):<5} p50={percentile(vs, 50) * 1000:8.1f} ms"
                    f"  p99={percentile(vs, 99) * 1000:8.1f} ms"
                    f"  max={max(vs) * 1000:8.1f} ms"
                )
        vs = self.all(REQUEST_OPS)
        if vs:
            rows.append(
                f"  {'all requests':<14} n={len(vs):<5} "
                f"p50={percentile(vs, 50) * 1000:8.1f} ms"
                f"  p99={percentile(vs, 99) * 1000:8.1f} ms"
            )
        for e in self.errors[:10]:
            rows.append(f"  error: {e}")
        if len(self.errors) > 10:
            rows.append(f"  ... {len(self.errors) - 10} more errors")
        return "\n".join(rows)


# The requests of the mix (AUTH and VERSION are timed too, under their names,
# but "per-request latency" means these: VERSION also spawns the peer process).
REQUEST_OPS = ("checkpresent", "checkabsent", "get", "put")


@dataclass(frozen=True)
class Target:
    """Where and as whom the sessions connect."""

    socket: Path
    token: str
    server_uuid: str


class Gate:
    """Holds sessions until ``parties`` have arrived (a failed one arrives too)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = trio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()

    async def wait(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.event.wait()


async def run_mix(
    target: Target,
    present: Obj,
    absent_key: str,
    fresh: Obj,
    stats: Stats,
    *,
    name: str = "session",
    gate: Gate | None = None,
    end_gate: Gate | None = None,
    gate_timeout: float = 120.0,
    connect_limiter: trio.CapacityLimiter | None = None,
    work_limiter: trio.CapacityLimiter | None = None,
    reply_timeout: float = 120.0,
) -> bool:
    """One authenticated session doing the mix; True if every step went as expected.

    With a ``gate`` the session waits after VERSION until every session of the
    gate is established, and with an ``end_gate`` it stays open after its mix
    until every session is done: so all of them are open at the same time.
    ``work_limiter`` bounds how many sessions do their mix at once (the others
    stay connected, idle); ``connect_limiter`` how many connect and AUTH at once.
    """
    arrived = arrived_end = False
    session: AsyncSession | None = None
    op = "connect"
    try:
        async with connect_limiter or contextlib.nullcontext():
            # "auth" is connect + AUTH + AUTH-SUCCESS (the wait for the limiter,
            # on this side, is not counted).
            start = time.monotonic()
            session = await AsyncSession.open(
                target.socket, stats=stats, reply_timeout=reply_timeout
            )
            stats.opened()
            op = "auth"
            await session.auth(target.token, target.server_uuid)
            stats.add("auth", time.monotonic() - start)
        op = "version"
        t = time.monotonic()
        await session.version()
        stats.add("version", time.monotonic() - t)
        if gate is not None:
            arrived = True
            gate.arrive()
            await gate.wait(gate_timeout)
        s = session
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("checkpresent", lambda: s.checkpresent(present.key, True)),
            ("checkabsent", lambda: s.checkpresent(absent_key, False)),
            ("get", lambda: s.get(present)),
            ("put", lambda: s.put(fresh)),
        )
        async with work_limiter or contextlib.nullcontext():
            for op, step in steps:  # op names the step in an error
                t = time.monotonic()
                await step()
                stats.add(op, time.monotonic() - t)
        stats.stored.append(fresh.key)
        stats.verified_bytes += len(present.content) + len(fresh.content)
        stats.sessions_ok += 1
        if end_gate is not None:
            arrived_end = True
            end_gate.arrive()
            await end_gate.wait(gate_timeout)
        return True
    except (OSError, EOFError, AssertionError, trio.TooSlowError) as e:
        stats.errors.append(f"{name}: {op}: {type(e).__name__}: {e}")
        return False
    finally:
        if gate is not None and not arrived:
            gate.arrive()
        if end_gate is not None and not arrived_end:
            end_gate.arrive()
        if session is not None:
            stats.closed()
            await session.aclose()


def start_mixes(
    nursery: trio.Nursery,
    n: int,
    target: Target,
    seeds: Sequence[Obj],
    absent: Sequence[str],
    fresh: Sequence[Obj],
    stats: Stats,
    *,
    gate: Gate,
    end_gate: Gate,
    time_limit: float,
    connect_limiter: trio.CapacityLimiter,
    work_limiter: trio.CapacityLimiter,
) -> None:
    """Start ``n`` sessions doing the mix in ``nursery``, session i on seed
    and absent key i (round robin) and its own fresh object, all open at the
    same time (``gate``, ``end_gate``)."""
    for i in range(n):
        nursery.start_soon(
            partial(
                run_mix,
                target,
                seeds[i % len(seeds)],
                absent[i % len(absent)],
                fresh[i],
                stats,
                name=f"session {i}",
                gate=gate,
                end_gate=end_gate,
                gate_timeout=time_limit,
                connect_limiter=connect_limiter,
                work_limiter=work_limiter,
                reply_timeout=time_limit / 2,
            )
        )


# --- the flood -------------------------------------------------------------------------

FLOOD_KINDS = ("idle", "garbage", "partial-auth", "long-line")
LONG_LINE = 40_000


@dataclass
class FloodStats:
    started: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    # seconds from connect to the daemon's close, by kind (refusals included)
    close_times: dict[str, list[float]] = field(default_factory=dict)
    peak_open: int = 0
    open_now: int = 0
    elapsed: float = 0.0
    # set once ``busy_at`` connections are open at the same time
    busy_at: int = 1
    busy: trio.Event = field(default_factory=trio.Event)

    def summary(self) -> str:
        parts = [
            f"{self.started} connections in {self.elapsed:.1f}s, "
            f"at most {self.peak_open} open at once; outcomes {dict(self.outcomes)}"
        ]
        for kind, ts in sorted(self.close_times.items()):
            parts.append(
                f"  {kind:<12} closed by the daemon after p50={percentile(ts, 50):.2f}s"
                f" max={max(ts):.2f}s (n={len(ts)})"
            )
        return "\n".join(parts)


async def _flood_one(
    path: Path, kind: str, hold: float, rng: random.Random, stats: FloodStats
) -> None:
    stats.open_now += 1
    stats.peak_open = max(stats.peak_open, stats.open_now)
    if stats.open_now >= stats.busy_at:
        stats.busy.set()
    try:
        start = time.monotonic()
        try:
            session = await AsyncSession.open(path, seconds=hold)
        except (OSError, TimeoutError):
            stats.outcomes["connect-failed"] += 1
            return
        try:
            try:
                if kind == "garbage":
                    await session.send(rng.randbytes(rng.randint(1, 200)) + b"\n")
                elif kind == "partial-auth":
                    await session.send(f"AUTH {session.client_uuid} 0123abc".encode())
                elif kind == "long-line":
                    await session.send(b"A" * LONG_LINE)
            except SessionClosed:
                pass  # refused (or dropped) while sending
            closed = await session.wait_closed(hold)
        finally:
            await session.aclose()
        if closed:
            stats.outcomes[f"{kind}: closed by the daemon"] += 1
            stats.close_times.setdefault(kind, []).append(time.monotonic() - start)
        else:
            stats.outcomes[f"{kind}: still open after {hold:.0f}s"] += 1
    finally:
        stats.open_now -= 1


async def flood(
    path: Path,
    total: int,
    concurrency: int,
    hold: float,
    stats: FloodStats,
    *,
    rate: float | None = None,
    seed: int = 1,
    kinds: Sequence[str] = FLOOD_KINDS,
    time_limit: float = 600.0,
) -> None:
    """``total`` unauthenticated connections, at most ``concurrency`` open at once.

    Each is of one of ``kinds`` (round robin) and waits at most ``hold`` s for
    the daemon to close it. With ``rate``, new connections start at most that
    many per second. The whole flood stops after ``time_limit`` s.
    """
    rng = random.Random(seed)
    limiter = trio.Semaphore(concurrency)
    start = time.monotonic()
    with trio.move_on_after(time_limit):
        async with trio.open_nursery() as nursery:
            for i in range(total):
                if rate:
                    await trio.sleep_until(
                        trio.current_time() + max(0.0, start + i / rate - time.monotonic())
                    )
                await limiter.acquire()
                stats.started += 1

                async def one(kind: str = kinds[i % len(kinds)]) -> None:
                    try:
                        await _flood_one(path, kind, hold, rng, stats)
                    finally:
                        limiter.release()

                nursery.start_soon(one)
    stats.elapsed = time.monotonic() - start


async def until_evicting(bridge: Bridge, stats: FloodStats, cap: int) -> None:
    """Wait (15 s at most) until a flood holds every pre-auth slot and the
    daemon has begun evicting: what comes next meets the flood at its worst."""
    with trio.move_on_after(15):
        await stats.busy.wait()
        for _ in range(150):
            metrics = await trio.to_thread.run_sync(bridge.metrics)
            if metrics.get("torbridge_connections_refused_total", 0) >= cap:
                break
            await trio.sleep(0.1)


def raise_nofile(want: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (never above the hard one)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def is_backlog_full(e: OSError) -> bool:
    return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
