"""The 200 concurrent sessions and the pre-auth flood at the same time (test 3).

Issue 7: "a pre-auth flood (thousands of idle or garbage connections) running
at the same time must not starve authenticated sessions". The daemon runs
with ``max_unauthenticated = 32`` and ``auth_timeout = 3``. The flood of
``test_flood.py`` (``PROFILE.flood_total`` connections, at most
``PROFILE.flood_concurrency`` open at once) fills the pre-auth slots first;
then the ``PROFILE.sessions`` authenticated sessions of
``test_concurrent_sessions.py`` connect through it and do their mix, all
open at the same time, while the flood goes on.

Asserted: every session authenticates and does its mix, with no error (a
session evicted before AUTH, or starved, would be one); the daemon closes
every flood connection itself, within auth_timeout plus its linger and
drain (``FLOOD_HOLD``); its VmRSS stays under 200 MiB; every PUT object is
in the proxy repository, which passes ``git annex fsck``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import trio

from tests.harness.annex import AnnexRepo
from tests.harness.bridge import Bridge
from tests.harness.load import (
    MIB,
    FloodStats,
    Gate,
    Obj,
    RssSampler,
    Stats,
    Target,
    absent_keys,
    flood,
    seed_proxy,
    start_mixes,
    until_evicting,
)
from tests.harness.profiles import PROFILE
from tests.load.test_flood import AUTH_TIMEOUT, FLOOD_HOLD, FLOOD_SECONDS, PRE_AUTH_CAP

pytestmark = pytest.mark.annex

SEED_OBJECTS = 16
CONNECTS_AT_ONCE = 64
RSS_LIMIT_KIB = 200 * MIB // 1024


async def test_sessions_and_flood_at_once(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    n = PROFILE.sessions
    rng = random.Random(7_200_2000)
    seeds = seed_proxy(proxy_repo, SEED_OBJECTS, rng)
    bridge = make_load_bridge(
        {
            "max_sessions": n + 10,
            "max_sessions_per_token": n + 10,
            "max_unauthenticated": PRE_AUTH_CAP,
            "auth_timeout": AUTH_TIMEOUT,
            "peer_timeout": PROFILE.time_limit,  # git-annex-shell may queue for its locks
        }
    )
    bridge.start()
    token = bridge.add_token("load", "rw")
    target = Target(token.socket, token.token, proxy_repo.uuid)
    fresh = [Obj.random(rng) for _ in range(n)]
    absent = [Obj.random(rng).key for _ in range(8)]
    rss_idle = bridge.rss_kib()

    fstats = FloodStats(busy_at=PRE_AUTH_CAP)
    stats = Stats()
    gate, end_gate = Gate(n), Gate(n)
    limiter = trio.CapacityLimiter(CONNECTS_AT_ONCE)
    work = trio.CapacityLimiter(PROFILE.mix_at_once)
    sampler = RssSampler(bridge.pid)
    duration = FLOOD_SECONDS * PROFILE.flood_total / 2000
    start = time.monotonic()
    sessions_start = sessions_end = start
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
                sessions_start = time.monotonic()

                async def sessions() -> None:
                    nonlocal sessions_end
                    async with trio.open_nursery() as inner:
                        start_mixes(
                            inner,
                            n,
                            target,
                            seeds,
                            absent,
                            fresh,
                            stats,
                            gate=gate,
                            end_gate=end_gate,
                            time_limit=PROFILE.time_limit,
                            connect_limiter=limiter,
                            work_limiter=work,
                        )
                    sessions_end = time.monotonic()

                nursery.start_soon(sessions)
            outer.cancel_scope.cancel()
    wall = time.monotonic() - start
    sampler.sample()
    totals = bridge.totals()
    flood_during = fstats.started  # (the flood goes on while the sessions work)

    print()
    print(
        stats.table(
            f"{n} sessions under a flood of {PROFILE.flood_total} pre-auth "
            f"connections ({PROFILE.name} profile)"
        )
    )
    print(f"flood: {fstats.summary()}")
    print(
        f"sessions ran {sessions_end - sessions_start:.1f}s, from {sessions_start - start:.1f}s"
        f" into the flood; whole test {wall:.1f}s"
    )
    print(
        f"connections_refused_total {totals.get('connections_refused_total', 0)}, "
        f"sessions_total {totals.get('sessions_total', 0)}, "
        f"sessions_failed_total {totals.get('sessions_failed_total', 0)}"
    )
    print(
        f"daemon VmRSS idle {rss_idle / 1024:.1f} MiB, peak {sampler.peak_kib / 1024:.1f} MiB "
        f"({sampler.samples} samples)"
    )

    bridge.assert_alive()
    assert fstats.started == flood_during == PROFILE.flood_total, fstats.summary()
    # The sessions were not starved: every one got in and did its whole mix.
    assert not stats.errors, stats.table("errors")
    assert stats.sessions_ok == n
    assert stats.peak_open == n, f"only {stats.peak_open} sessions were open at once"
    assert totals.get("sessions_failed_total", 0) == 0, totals
    # The flood was over the cap the whole time, and the daemon closed every
    # one of its connections itself, by auth_timeout (+ linger and drain).
    assert totals.get("connections_refused_total", 0) >= PRE_AUTH_CAP, totals
    lingering = {k: v for k, v in fstats.outcomes.items() if "still open" in k}
    assert not lingering, f"flood connections the daemon kept past {FLOOD_HOLD:.0f}s: {lingering}"
    assert sampler.peak_kib < RSS_LIMIT_KIB, f"daemon VmRSS peaked at {sampler.peak_kib} KiB"
    missing = absent_keys(proxy_repo, [o.key for o in fresh])
    assert not missing, f"{len(missing)} PUT objects not in the proxy repository: {missing[:5]}"
    proxy_repo.fsck_content(timeout=300)
