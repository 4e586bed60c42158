"""N authenticated raw-protocol sessions at once against one daemon (test 1).

Every session does the mix of ``tests.harness.load.run_mix``: VERSION 4, CHECKPRESENT of
a present and of an absent key, GET of a small present object (bytes checked,
VALID, SUCCESS), PUT of a fresh object, close. The sessions wait for each
other after VERSION, so all N ``git-annex-shell p2pstdio`` peers are open at
the same time, and stay open until all are done. N is ``PROFILE.sessions``
(200 in CI, all doing their requests at once; 1000 with
``TORBRIDGE_LOAD=long``, at most 100 in requests at once: see ``profiles.py``).
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
    Gate,
    Obj,
    RssSampler,
    Stats,
    Target,
    absent_keys,
    seed_proxy,
    start_mixes,
)
from tests.harness.profiles import PROFILE

pytestmark = pytest.mark.annex

SEED_OBJECTS = 16
CONNECTS_AT_ONCE = 64  # connections in the AUTH phase at once, from this side


async def test_concurrent_sessions(
    make_load_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo
) -> None:
    n = PROFILE.sessions
    rng = random.Random(20261026)
    seeds = seed_proxy(proxy_repo, SEED_OBJECTS, rng)
    # No cap is what this test measures.
    bridge = make_load_bridge(
        {
            "max_sessions": n + 10,
            "max_sessions_per_token": n + 10,
            "max_unauthenticated": n + 64,
            "peer_timeout": PROFILE.time_limit,  # git-annex-shell may queue for its locks
        }
    )
    bridge.start()
    token = bridge.add_token("load", "rw")
    target = Target(token.socket, token.token, proxy_repo.uuid)
    fresh = [Obj.random(rng) for _ in range(n)]
    absent = [Obj.random(rng).key for _ in range(8)]
    rss_idle = bridge.rss_kib()

    stats = Stats()
    gate, end_gate = Gate(n), Gate(n)
    limiter = trio.CapacityLimiter(CONNECTS_AT_ONCE)
    work = trio.CapacityLimiter(PROFILE.mix_at_once)
    sampler = RssSampler(bridge.pid)
    start = time.monotonic()
    with trio.fail_after(PROFILE.time_limit):
        async with trio.open_nursery() as outer:
            outer.start_soon(sampler.run)
            async with trio.open_nursery() as nursery:
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
                    time_limit=PROFILE.time_limit,
                    connect_limiter=limiter,
                    work_limiter=work,
                )
            outer.cancel_scope.cancel()
    wall = time.monotonic() - start
    sampler.sample()

    print()
    print(
        stats.table(
            f"{n} concurrent sessions, at most {PROFILE.mix_at_once} in requests "
            f"at once ({PROFILE.name} profile)"
        )
    )
    print(
        f"wall time {wall:.1f}s, {stats.requests / wall:.0f} requests/s "
        f"({stats.exchanges / wall:.0f}/s with AUTH and VERSION); "
        f"daemon RSS idle {rss_idle / 1024:.1f} MiB, peak {sampler.peak_kib / 1024:.1f} MiB"
    )

    assert not stats.errors, stats.table("errors")
    assert stats.sessions_ok == n
    assert stats.peak_open == n, f"only {stats.peak_open} sessions were open at once"
    missing = absent_keys(proxy_repo, [o.key for o in fresh])
    assert not missing, f"{len(missing)} PUT objects not in the proxy repository: {missing[:5]}"
    for obj in rng.sample(fresh, 5):
        assert proxy_repo.key_content(obj.key) == obj.content
    proxy_repo.fsck_content(timeout=300)
    totals = bridge.totals()
    assert totals.get("sessions_total", 0) == n, totals
    assert totals.get("sessions_failed_total", 0) == 0, totals
    assert sampler.peak_kib < 200 * MIB // 1024, f"daemon RSS {sampler.peak_kib} KiB"
    bridge.assert_alive()
