"""Doctor checks of tor: its control port, version, clock, onion service and SOCKS port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from torbridge.annex.remotes import RemoteError, TorAddress, parse_p2p_address, read_remotes
from torbridge.config import Config
from torbridge.ops.doctor.report import Check, _fail, _ok, _skip
from torbridge.ops.doctor.systemd import TOR_GROUP
from torbridge.tor.onion import (
    MIN_TOR_POW,
    ControlAuthFailed,
    ControlSpec,
    ControlUnreachable,
    TorError,
    TorTooOld,
    connect,
    torrc_onion,
)


def _call_with_timeout(function: Callable[[], Any], timeout: float) -> Any:
    """*function*'s result or exception; TimeoutError if it takes longer than *timeout*.

    The call runs in a daemon thread: a tor that never answers cannot hang
    doctor, nor keep the process alive when it exits.
    """
    outcome: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(function())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name="doctor-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if errors:
        raise errors[0]
    return outcome[0]


def _check_tor_control(spec: ControlSpec, timeout: float) -> Check:
    name = "tor control"
    try:
        controller = _call_with_timeout(lambda: connect(spec), timeout)
    except TimeoutError:
        return _fail(
            name,
            f"no answer from {spec.address} within {timeout:g}s",
            "check that tor is running and that [tor] control names its control port",
        )
    except ControlUnreachable as e:
        return _fail(
            name,
            str(e),
            "start tor (`systemctl start tor`); Debian's tor listens on"
            ' [tor] control = "unix:/run/tor/control"',
        )
    except ControlAuthFailed as e:
        return _fail(
            name,
            str(e),
            f"add the torbridge user to the {TOR_GROUP} group (cookie authentication),"
            " or set [tor] password to tor's HashedControlPassword",
        )
    except TorTooOld as e:
        return _fail(name, str(e), "upgrade tor")
    except TorError as e:
        return _fail(name, str(e), "check tor's log (`journalctl -u tor@default`)")
    try:
        version = controller.get_version()
    finally:
        controller.close()
    return _ok(name, f"{spec.address}: authenticated, tor {version}")


# The tor each configured feature needs (ADD_ONION keywords, torrc options).
MIN_TOR_CLIENT_AUTH = (0, 4, 6, 1)  # ADD_ONION ClientAuthV3 / V3Auth
MIN_TOR_TORRC_POW = (0, 4, 8, 1)  # HiddenServicePoWDefensesEnabled
MIN_TOR_METRICS = (0, 4, 7, 1)  # MetricsPort with onion service metrics
CLOCK_SLACK = 3600.0  # seconds a clock may be off before tor's consensus looks wrong


def _version_tuple(version: Any) -> tuple[int, int, int, int]:
    return (version.major, version.minor, version.micro, version.patch or 0)


def tor_feature_problems(config: Config, version: tuple[int, int, int, int]) -> list[str]:
    """The configured features this tor version is too old for."""
    tor = config.tor
    wanted: list[tuple[str, tuple[int, ...]]] = []
    if tor.pow_defenses:
        wanted.append(
            ("pow_defenses", MIN_TOR_POW if tor.onion == "ephemeral" else MIN_TOR_TORRC_POW)
        )
    if tor.client_auth and tor.onion == "ephemeral":
        wanted.append(("client_auth", MIN_TOR_CLIENT_AUTH))
    if tor.metrics_port is not None:
        wanted.append(("metrics_port", MIN_TOR_METRICS))
    return [
        f"[tor] {key} needs tor {'.'.join(map(str, need))} or newer"
        for key, need in wanted
        if version < need
    ]


def _check_tor_features(config: Config, spec: ControlSpec, timeout: float) -> Check | None:
    name = "tor features"
    try:
        controller = _call_with_timeout(lambda: connect(spec), timeout)
    except (TimeoutError, TorError):
        return None  # "tor control" says why
    try:
        version = controller.get_version()
    finally:
        controller.close()
    problems = tor_feature_problems(config, _version_tuple(version))
    if problems:
        return _fail(
            name,
            f"tor {version}: " + "; ".join(problems),
            "upgrade tor (Debian: the Tor Project's repository, deb.torproject.org), or turn"
            " the feature off",
            severity="warning",
        )
    return _ok(name, f"tor {version} has every configured feature")


def clock_problem(now: float, valid_after: float, valid_until: float) -> str | None:
    """Whether ``now`` is far outside the consensus's validity (a clock far off)."""
    if now < valid_after - CLOCK_SLACK:
        minutes = (valid_after - now) / 60
        return f"this host's clock is {minutes:.0f} minutes behind the Tor network's"
    if now > valid_until + CLOCK_SLACK:
        minutes = (now - valid_until) / 60
        return f"this host's clock is {minutes:.0f} minutes ahead of the Tor network's"
    return None


def _check_tor_clock(spec: ControlSpec, timeout: float) -> Check | None:
    name = "tor clock"

    def read() -> tuple[str, str]:
        controller = connect(spec)
        try:
            return (
                controller.get_info("consensus/valid-after"),
                controller.get_info("consensus/valid-until"),
            )
        finally:
            controller.close()

    try:
        after, until = _call_with_timeout(read, timeout)
    except (TimeoutError, TorError):
        return None
    except Exception:
        return _skip(name, "tor has no consensus yet")
    problem = clock_problem(time.time(), _utc_seconds(after), _utc_seconds(until))
    if problem:
        return _fail(
            name,
            f"{problem} (consensus valid {after} to {until} UTC)",
            "set the clock right (`timedatectl set-ntp true`): onion descriptors and"
            " circuits fail with a clock far off",
            severity="warning",
        )
    return _ok(name, f"within the consensus's validity ({after} to {until} UTC)")


def _utc_seconds(text: str) -> float:
    return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def _check_torrc_onion(config: Config) -> Check:
    name = "tor onion"
    assert config.tor.hidden_service_dir is not None
    try:
        onion = torrc_onion(config.tor.hidden_service_dir)
    except TorError as e:
        return _fail(
            name,
            str(e),
            "install the snippet (`torbridge onion-snippet > /etc/tor/torrc.d/torbridge.conf`),"
            " reload tor, and let the torbridge user read the hostname file",
        )
    return _ok(name, f"{onion} (from {config.tor.hidden_service_dir})")


def _tor_annex_remotes(config: Config) -> list[str]:
    remotes = read_remotes(config.repository)
    found = []
    for expose in config.expose:
        remote = remotes.get(expose.remote)
        if remote is None or not remote.url:
            continue
        try:
            address = parse_p2p_address(remote.url)
        except RemoteError:
            continue  # the expose check reports it
        if isinstance(address, TorAddress):
            found.append(expose.remote)
    return found


def _check_socks(config: Config, timeout: float) -> Check | None:
    remotes = _tor_annex_remotes(config)
    if not remotes:
        return None  # no tor-annex remote is exposed: tor's SOCKS port is not needed
    name = "tor socks"
    socks = config.tor.socks
    try:
        _probe(socks, timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        return _fail(
            name,
            f"cannot connect to tor's SOCKS port {socks} ({reason}), needed for the tor-annex"
            f" remote(s) {', '.join(remotes)}",
            'start tor, or set [tor] socks to its SocksPort (Debian: "127.0.0.1:9050" or'
            ' "unix:/run/tor/socks")',
        )
    return _ok(name, f"{socks} accepts connections (for {', '.join(remotes)})")


def _probe(address: str, timeout: float) -> None:
    """Connect to a "HOST:PORT" or "unix:/path" stream socket and hang up; sends nothing."""
    if address.startswith("unix:"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address[len("unix:") :])
        return
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass
