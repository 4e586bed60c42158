"""Running the Onionbalance frontend (onionbalance 0.2.4, the ``balance`` extra).

``run_frontend`` runs Onionbalance's own v3 manager in this process on a
directory made by ``torbridge balance frontend``, driving the tor at
``control`` (cookie or no authentication, as Onionbalance does).

With ``testnet=True`` (a private test network only, see docs/scale-out.md)
three things of Onionbalance 0.2.4 are adjusted in-process first:

* the time-period length, the shared-random phase and the SRV-run start
  come from the live consensus's voting interval (fresh-until minus
  valid-after, as tor's get_voting_interval() does); its ``--is-testnet``
  mode assumes a 20 s interval, and our network votes every 10 s;
* the scheduler: 1 s instead of 45 s before the first fetch and after the
  first publication, fetches every 3 s, publication checks every second,
  instance descriptors too old after 20 s, frontend descriptors renewed
  every 5 s;
* the pause after each NEWNYM (5 s, fixed in the code) is cut to 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torbridge.ops.balance import CONFIG_FILE, BalanceError

PINNED = "0.2.4"  # the version the Tor tier proves (pyproject's balance extra)


@dataclass(frozen=True)
class TestnetTimings:
    """Onionbalance's scheduler on a private network (seconds)."""

    __test__ = False

    initial_delay: float = 1.0
    fetch_every: float = 3.0
    publish_every: float = 1.0
    too_old: float = 20.0
    frontend_lifetime: float = 5.0
    newnym_sleep: float = 0.5


def _import_onionbalance() -> Any:
    try:
        import onionbalance
        from onionbalance.hs_v3 import manager
    except ImportError:
        raise BalanceError(
            "onionbalance is not installed: pip install 'torbridge[balance]'"
        ) from None
    version = getattr(onionbalance, "__version__", "?")
    if version != PINNED:
        logging.getLogger("torbridge.balance").warning(
            "onionbalance %s: torbridge is tested with %s", version, PINNED
        )
    return manager


def _voting_interval(consensus: Any) -> int:
    return int((consensus.fresh_until - consensus.valid_after).total_seconds())


def patch_for_testnet(timings: TestnetTimings) -> None:
    """The in-process adjustments of the module docstring (testnets only)."""
    import stem.util  # type: ignore[import-untyped]
    from onionbalance.common import instance as ob_instance
    from onionbalance.hs_v3 import consensus as ob_consensus
    from onionbalance.hs_v3 import params

    params.INITIAL_CALLBACK_DELAY = timings.initial_delay
    params.FETCH_DESCRIPTOR_FREQUENCY_TESTNET = timings.fetch_every
    params.PUBLISH_DESCRIPTOR_CHECK_FREQUENCY_TESTNET = timings.publish_every
    params.INSTANCE_DESCRIPTOR_TOO_OLD_TESTNET = timings.too_old
    params.FRONTEND_DESCRIPTOR_LIFETIME_TESTNET = timings.frontend_lifetime

    # The only sleep in that module is the one after NEWNYM.
    real_sleep = time.sleep
    ob_instance.time = types.SimpleNamespace(
        sleep=lambda seconds: real_sleep(min(seconds, timings.newnym_sleep))
    )

    consensus_class = ob_consensus.Consensus

    def time_period_length(self: Any) -> int:  # minutes, as Onionbalance counts them
        return (24 * _voting_interval(self.consensus)) // 60

    def srv_phase_duration(self: Any) -> int:  # minutes
        return (12 * _voting_interval(self.consensus)) // 60

    def current_srv_run_start(self: Any) -> int:
        assert self.is_live()
        interval = _voting_interval(self.consensus)
        round_start = int(stem.util.datetime_to_unix(self.consensus.valid_after))
        return round_start - ((round_start // interval) % 24) * interval

    def previous_srv_run_start(self: Any) -> int:
        return int(self.get_start_time_of_current_srv_run() - 24 * _voting_interval(self.consensus))

    consensus_class.get_time_period_length = time_period_length
    consensus_class._get_srv_phase_duration = srv_phase_duration
    consensus_class.get_start_time_of_current_srv_run = current_srv_run_start
    consensus_class.get_start_time_of_previous_srv_run = previous_srv_run_start


def _die_with_parent() -> None:
    """Under a test harness: stop when the process that started us does."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_frontend(
    directory: Path,
    control: str,
    *,
    testnet: bool = False,
    timings: TestnetTimings | None = None,
    verbosity: str = "info",
) -> int:
    """Run Onionbalance on ``directory``'s config.yaml until it is stopped."""
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise BalanceError(
            f"{config} not found: torbridge balance frontend --dir {directory} LINE..."
        )
    host, _, port = control.rpartition(":")
    if not host or not port.isdigit():
        raise BalanceError(f'--control {control!r}: expected "HOST:PORT"')
    manager = _import_onionbalance()
    if testnet:
        _die_with_parent()
        patch_for_testnet(timings or TestnetTimings())
    os.chdir(directory)  # the key is named relative to config.yaml
    args = argparse.Namespace(
        ip=host,
        port=int(port),
        socket=None,
        config=str(config),
        verbosity=verbosity,
        is_testnet=testnet,
        hs_version="v3",
    )
    return int(manager.main(args) or 0)
