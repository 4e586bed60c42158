"""``torbridge doctor``: check a host before (or after) starting the service.

Every check is independent: one that fails (or crashes) does not stop the
others, and each failure says what to do about it. Checks that need something
an earlier check found broken (the config, the repository) are reported as
skipped, with the reason, instead of failing a second time for the same cause.

Run it as the service user (``sudo -u torbridge torbridge doctor``): access
checks answer for whoever runs them, and root can read everything.

The checks live by area: annex.py (git-annex, the repository, each
endpoint), tor.py, files.py (socket_dir, state_dir, tokens), systemd.py;
report.py is the report they make.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torbridge.config import OWN_REPOSITORY, Config, ConfigError, load_config
from torbridge.ops.doctor.annex import _check_expose, _check_git_annex, _check_repository
from torbridge.ops.doctor.files import (
    _check_socket_dir,
    _check_state_dir,
    _check_tokens,
    _check_tor_access,
)
from torbridge.ops.doctor.report import Check, _fail, _ok, _skip, exit_status, format_report
from torbridge.ops.doctor.systemd import UNIT_PATHS, _check_unit
from torbridge.ops.doctor.tor import (
    _check_socks,
    _check_tor_clock,
    _check_tor_control,
    _check_tor_features,
    _check_torrc_onion,
)
from torbridge.tor.onion import ControlSpec

__all__ = ["Check", "doctor", "exit_status", "format_report", "run_checks"]

DEFAULT_TIMEOUT = 5.0


def run_checks(
    config_path: Path,
    *,
    unit_paths: Sequence[Path] = UNIT_PATHS,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Check]:
    """Every check, in report order. Never raises: a crashing check is a FAIL line.

    *timeout* bounds each network check (tor's control port, the SOCKS port).
    """
    checks: list[Check] = []
    config: Config | None = None
    try:
        config = load_config(config_path)
    except ConfigError as e:
        checks.append(
            _fail(
                "config",
                str(e),
                f"correct {config_path}, or write one with `torbridge init REPOSITORY`",
            )
        )
    else:
        checks.append(
            _ok("config", f"{config.path} ({len(config.expose)} endpoint(s))"),
        )
    _add(checks, "git-annex", _check_git_annex)
    if config is None:
        checks.append(
            _skip(
                "repository, endpoints, tor, socket_dir, state_dir",
                "they need the config, which did not load",
            )
        )
    else:
        checks += _config_checks(config, timeout)
    _add(checks, "systemd unit", functools.partial(_check_unit, unit_paths))
    return checks


def doctor(config_path: Path, *, print_: Callable[[str], Any] = print) -> int:
    """Run every check, print the report, and return the exit status."""
    checks = run_checks(config_path)
    print_(format_report(checks).rstrip("\n"))
    return exit_status(checks)


def _add(checks: list[Check], name: str, check: Callable[[], Check | None]) -> Check | None:
    """Run *check* and append its line (None: nothing to check here).

    An unexpected exception becomes the check's FAIL line, not a crash.
    """
    try:
        result = check()
    except Exception as e:
        result = _fail(
            name,
            f"the check itself failed: {type(e).__name__}: {e}",
            "fix what the error names, or report it as a torbridge bug",
        )
    if result is not None:
        checks.append(result)
    return result


def _config_checks(config: Config, timeout: float) -> list[Check]:
    checks: list[Check] = []
    repo = _add(checks, "repository", functools.partial(_check_repository, config.repository))
    repo_ok = repo is not None and repo.ok
    for expose in config.expose:
        name = f"expose {expose.name}"
        if repo_ok:
            _add(checks, name, functools.partial(_check_expose, config, expose))
        else:
            checks.append(_skip(name, "the repository check failed"))
    if config.tor.control is not None:
        spec = ControlSpec(config.tor.control, config.tor.password)
        _add(checks, "tor control", functools.partial(_check_tor_control, spec, timeout))
    if config.tor.control is not None:
        spec = ControlSpec(config.tor.control, config.tor.password)
        _add(checks, "tor features", functools.partial(_check_tor_features, config, spec, timeout))
        _add(checks, "tor clock", functools.partial(_check_tor_clock, spec, timeout))
    if config.tor.onion == "torrc":
        _add(checks, "tor onion", functools.partial(_check_torrc_onion, config))
    if repo_ok:
        _add(checks, "tor socks", functools.partial(_check_socks, config, timeout))
    elif any(expose.remote != OWN_REPOSITORY for expose in config.expose):
        checks.append(_skip("tor socks", "the repository check failed"))
    _add(checks, "socket_dir", functools.partial(_check_socket_dir, config))
    if config.tor.enabled:
        _add(checks, "tor socket access", functools.partial(_check_tor_access, config))
    _add(checks, "state_dir", functools.partial(_check_state_dir, config.state_dir))
    if config.balance is not None:
        checks += _balance_checks(config)
    own = [x.name for x in config.expose if x.remote == OWN_REPOSITORY]
    _add(checks, "tokens", functools.partial(_check_tokens, config.state_dir, own))
    return checks


def _balance_checks(config: Config) -> list[Check]:
    """The Onionbalance instance (and frontend) checks of torbridge/ops/balance.py."""
    from torbridge.ops.balance import doctor_checks

    try:
        found = doctor_checks(config)
    except Exception as e:
        return [
            _fail(
                "balance",
                f"the check itself failed: {type(e).__name__}: {e}",
                "fix what the error names, or report it as a torbridge bug",
            )
        ]
    return [_ok("balance", what) if ok else _fail("balance", what, fix) for ok, what, fix in found]
