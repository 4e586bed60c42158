"""A pre-auth flood while real clients work (test 2).

The daemon runs with ``max_unauthenticated = 32``. First, unloaded, a
baseline: ``PROFILE.flood_sessions`` raw sessions doing the mix of
``tests.harness.load.run_mix`` at once, and a stock client doing ``git annex copy --to``,
``drop`` and ``get --from`` of a few files. Then the same again while a flood
of ``PROFILE.flood_total`` unauthenticated connections (at most
``PROFILE.flood_concurrency`` open at once) idles, sends garbage, sends a
partial AUTH and stalls, or sends a 40000-byte line.

Asserted: every authenticated session and every stock command succeeds under
the flood; p99 per-request latency under load <= 20 x baseline p99 + 2 s;
``connections_refused_total`` (``torbridge status --json`` and the metrics
socket agree) grew; the daemon's VmRSS stays under 200 MiB; every flood
connection is closed by the daemon within auth_timeout (+ linger and drain);
afterwards the proxy repository passes ``git annex fsck``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.load import (
    FloodStats,
    Obj,
    RssSampler,
    Stats,
    Target,
    absent_keys,
    flood,
    run_mix,
    seed_proxy,
    until_evicting,
)
from tests.harness.process import CommandError
from tests.harness.profiles import PROFILE

pytestmark = pytest.mark.annex

PRE_AUTH_CAP = 32
AUTH_TIMEOUT = 3.0
# A flood connection is closed by auth_timeout at the latest, then the daemon
# lingers (1 s after an ERROR) and drains for up to 2 s (session.py).
FLOOD_HOLD = AUTH_TIMEOUT + 1.0 + 2.0 + 5.0
FLOOD_SECONDS = 25.0  # the flood is paced to last about this long (CI profile)
STOCK_FILES = 4
RSS_LIMIT_KIB = 200 * 1024


@dataclass
class StockTimes:
    """Seconds each stock client command took; errors as text."""

    times: dict[str, float]
    errors: list[str]

    def __str__(self) -> str:
        parts = [f"{op} {t:.2f}s" for op, t in self.times.items()]
        return ", ".join(parts) + (f"; errors: {self.errors}" if self.errors else "")


def stock_round(client: Client, files: dict[str, bytes]) -> StockTimes:
    """copy --to hub, drop (the hub as proof), get --from hub: a real client's work."""
    names = sorted(files)
    times: dict[str, float] = {}
    errors: list[str] = []
    for op, args in (
        ("copy", ["copy", "--to", "hub", "--", *names]),
        ("drop", ["drop", "--", *names]),
        ("get", ["get", "--from", "hub", "--", *names]),
    ):
        start = time.monotonic()
        try:
            client.annex(*args, timeout=PROFILE.time_limit)
        except CommandError as e:
            errors.append(f"git annex {op}: {str(e)[-1500:]}")
            break
        times[op] = time.monotonic() - start
    else:
        for name, content in files.items():
            if client.read(name) != content:
                errors.append(f"{name}: wrong content after get")
    return StockTimes(times, errors)


async def mix_round(
    target: Target, seeds: list[Obj], fresh: list[Obj], absent: str, label: str
) -> Stats:
    stats = Stats()
    async with trio.open_nursery() as nursery:
        for i, obj in enumerate(fresh):
            nursery.start_soon(
                partial(
                    run_mix, target, seeds[i % len(seeds)], absent, obj, stats, name=f"{label} {i}"
                )
            )
    return stats


async def test_flood_with_clients(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, client: Client
) -> None:
    rng = random.Random(4711)
    n = PROFILE.flood_sessions
    bridge = make_load_bridge(
        {
            "max_unauthenticated": PRE_AUTH_CAP,
            "auth_timeout": AUTH_TIMEOUT,
            "max_sessions_per_token": 2 * n + 8,
        }
    )
    seeds = seed_proxy(proxy_repo, 8, rng)
    bridge.start()
    token = bridge.add_token("load", "rw")
    target = Target(token.socket, token.token, proxy_repo.uuid)
    client.link(bridge.add_token("stock", "rw").line, "hub")
    stock_files = {
        f"{phase}/{i}.bin": rng.randbytes(rng.randint(1000, 200_000))
        for phase in ("base", "load")
        for i in range(STOCK_FILES)
    }
    client.add_files(stock_files)
    absent = Obj.random(rng).key
    fresh = [Obj.random(rng) for _ in range(2 * n)]

    # --- the baseline, unloaded -------------------------------------------------------
    base = await mix_round(target, seeds, fresh[:n], absent, "baseline")
    base_stock = stock_round(
        client, {k: v for k, v in stock_files.items() if k.startswith("base/")}
    )
    refused_before = bridge.totals().get("connections_refused_total", 0)
    rss_before = bridge.rss_kib()

    # --- the same under the flood -----------------------------------------------------
    fstats = FloodStats(busy_at=PRE_AUTH_CAP)
    sampler = RssSampler(bridge.pid)
    loaded = Stats()
    load_stock: StockTimes | None = None
    duration = FLOOD_SECONDS * PROFILE.flood_total / 2000
    start = time.monotonic()
    with trio.fail_after(PROFILE.time_limit):
        async with trio.open_nursery() as outer:
            outer.start_soon(sampler.run)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: flood(
                        token.socket,
                        PROFILE.flood_total,
                        PROFILE.flood_concurrency,
                        FLOOD_HOLD,
                        fstats,
                        rate=PROFILE.flood_total / duration,
                        seed=rng.randrange(1 << 30),
                        time_limit=PROFILE.time_limit,
                    )
                )
                await until_evicting(bridge, fstats, PRE_AUTH_CAP)
                loaded_start = time.monotonic()

                async def clients() -> None:
                    nonlocal loaded, load_stock
                    async with trio.open_nursery() as inner:

                        async def mix() -> None:
                            nonlocal loaded
                            loaded = await mix_round(target, seeds, fresh[n:], absent, "loaded")

                        async def stock() -> None:
                            nonlocal load_stock
                            load_stock = await trio.to_thread.run_sync(
                                stock_round,
                                client,
                                {k: v for k, v in stock_files.items() if k.startswith("load/")},
                            )

                        inner.start_soon(mix)
                        inner.start_soon(stock)

                nursery.start_soon(clients)
            outer.cancel_scope.cancel()
    flood_wall = time.monotonic() - start
    loaded_wall = time.monotonic() - loaded_start
    sampler.sample()
    status_totals = bridge.totals()
    metrics = bridge.metrics()

    base_p99 = base.p(99, ("checkpresent", "checkabsent", "get", "put"))
    load_p99 = loaded.p(99, ("checkpresent", "checkabsent", "get", "put"))
    print()
    print(base.table(f"baseline: {n} sessions, unloaded"))
    print(loaded.table(f"under the flood: {n} sessions"))
    print(f"stock client unloaded: {base_stock}")
    print(f"stock client under the flood: {load_stock}")
    print(f"flood: {fstats.summary()}")
    print(
        f"flood phase {flood_wall:.1f}s (clients started after "
        f"{loaded_start - start:.1f}s, ran to the end {loaded_wall:.1f}s)"
    )
    print(
        f"connections_refused_total {refused_before} -> "
        f"{status_totals.get('connections_refused_total', 0)} (metrics: "
        f"{metrics.get('torbridge_connections_refused_total')}); "
        f"auth_failures_total {status_totals.get('auth_failures_total', 0)}"
    )
    print(
        f"daemon VmRSS before {rss_before / 1024:.1f} MiB, peak under the flood "
        f"{sampler.peak_kib / 1024:.1f} MiB ({sampler.samples} samples)"
    )
    print(
        f"request p99: baseline {base_p99 * 1000:.0f} ms, under the flood "
        f"{load_p99 * 1000:.0f} ms (bound {(20 * base_p99 + 2) * 1000:.0f} ms)"
    )

    bridge.assert_alive()
    assert fstats.started == PROFILE.flood_total, fstats.summary()
    assert not base.errors and base.sessions_ok == n, base.table("baseline")
    assert not base_stock.errors, base_stock

    # Every check below is made, and all failures are reported together.
    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    # The flood went over the cap and was evicted, and both views agree.
    refused = status_totals.get("connections_refused_total", 0)
    check(refused > refused_before, f"connections_refused_total did not grow: {status_totals}")
    check(
        metrics.get("torbridge_connections_refused_total", -1) >= refused,
        f"metrics {metrics.get('torbridge_connections_refused_total')} < status {refused}",
    )
    check(sampler.peak_kib < RSS_LIMIT_KIB, f"daemon VmRSS peaked at {sampler.peak_kib} KiB")
    # Every flood connection was closed by the daemon; none had to give up waiting.
    lingering = {k: v for k, v in fstats.outcomes.items() if "still open" in k}
    check(not lingering, f"flood connections the daemon kept open: {lingering}")
    # The real clients under the flood.
    check(
        load_stock is not None and not load_stock.errors,
        f"stock client under the flood: {load_stock}",
    )
    check(not loaded.errors and loaded.sessions_ok == n, loaded.table("under the flood"))
    check(
        not load_p99 > 20 * base_p99 + 2.0,  # (nan when nothing got through: no verdict)
        f"p99 under the flood {load_p99:.2f}s > 20 x {base_p99:.2f}s + 2s",
    )

    # Afterwards: all the pre-auth slots are free again (a cap's worth of
    # connections authenticates at once), and the repository is sound.
    await trio.sleep(1.0)
    after = await mix_round(
        target, seeds, [Obj.random(rng) for _ in range(PRE_AUTH_CAP)], absent, "after"
    )
    check(not after.errors, after.table("after the flood"))
    missing = absent_keys(proxy_repo, base.stored + loaded.stored + after.stored)
    check(not missing, f"PUT objects missing from the proxy repository: {missing[:5]}")
    proxy_repo.fsck_content(timeout=300)
    assert not problems, "\n".join(problems)
