"""How hard the load tests push: the CI profile (default) and the long one.

Select with the environment variable ``TORBRIDGE_LOAD``:

- unset or ``ci``: finishes in about 3 minutes on 2 cores.
  200 concurrent sessions, all doing their requests at the same moment; a
  flood of 2000 unauthenticated connections, at most 300 open at once,
  against ``max_unauthenticated = 32``; 20 authenticated sessions and a
  stock client during the flood.
- ``long``: 1000 concurrent sessions (all connected from the first request
  to the last), of which at most 100 do their requests at the same moment;
  a flood of 20000 connections, at most 500 open at once; 50 authenticated
  sessions during the flood. Expect 15-25 minutes and ~5 GiB of RAM (one
  ``git-annex-shell`` per session, ~5 MiB PSS each).

``test_combined.py`` runs the sessions of test 1 and the flood of test 2 at
the same time (200 sessions and 2000 connections in CI: ~30 s).

Why not 1000 requests at the same moment: every ``git-annex-shell`` serving
a GET or PUT takes git-annex's keys database lock (``.git/annex/keysdb.lck``)
in turn. 1000 of them at once on 2 cores (``bench/bench_load.py --sessions
1000``) left ~970 blocked in ``fcntl`` for over 10 minutes, and their
helpers used ~30 CPU minutes: that measures git-annex, not torbridge.

Run: ``TORBRIDGE_LOAD=long python -m pytest tests/load -s`` (``-s`` shows the
figures each test prints: wall time, p50/p99 latency, the daemon's RSS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    sessions: int  # test 1: concurrent authenticated sessions
    mix_at_once: int  # test 1: of those, at most this many run their requests at once
    flood_total: int  # test 2: unauthenticated connections in all
    flood_concurrency: int  # test 2: at most this many open at once
    flood_sessions: int  # test 2: authenticated sessions during the flood
    time_limit: float  # seconds any one load phase may take


CI = Profile(
    "ci",
    sessions=200,
    mix_at_once=200,
    flood_total=2000,
    flood_concurrency=300,
    flood_sessions=20,
    time_limit=180.0,
)
LONG = Profile(
    "long",
    sessions=1000,
    mix_at_once=100,
    flood_total=20000,
    flood_concurrency=500,
    flood_sessions=50,
    time_limit=1200.0,
)


def current() -> Profile:
    name = os.environ.get("TORBRIDGE_LOAD", "ci").strip().lower() or "ci"
    if name == "long":
        return LONG
    if name == "ci":
        return CI
    raise ValueError(f"TORBRIDGE_LOAD={name!r}: expected 'ci' or 'long'")


PROFILE = current()
