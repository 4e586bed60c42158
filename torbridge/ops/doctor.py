"""``torbridge doctor``: check a host before (or after) starting the service.

Every check is independent: one that fails (or crashes) does not stop the
others, and each failure says what to do about it. Checks that need something
an earlier check found broken (the config, the repository) are reported as
skipped, with the reason, instead of failing a second time for the same cause.

Run it as the service user (``sudo -u torbridge torbridge doctor``): access
checks answer for whoever runs them, and root can read everything.
"""

from __future__ import annotations

import functools
import grp
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from torbridge.annex.host import MIN_GIT_ANNEX, StartupError, check_git_annex, repository_uuid, run
from torbridge.annex.remotes import (
    RemoteError,
    TorAddress,
    parse_p2p_address,
    parse_remote_log,
    proxied_remote,
    read_annex_log,
    read_remotes,
    read_token,
)
from torbridge.config import (
    OWN_REPOSITORY,
    UNIX_PATH_MAX,
    Config,
    ConfigError,
    Expose,
    load_config,
)
from torbridge.protocol.permissions import GitAccess
from torbridge.tokens import FILE_NAME as TOKENS_FILE
from torbridge.tokens import TokenError, TokenStore
from torbridge.tor.onion import (
    KEY_FILE,
    MIN_TOR_POW,
    ControlAuthFailed,
    ControlSpec,
    ControlUnreachable,
    TorError,
    TorTooOld,
    connect,
    torrc_onion,
)

Severity = Literal["error", "warning"]

UNIT_NAME = "torbridge.service"
YES = ("true", "yes", "on", "1")  # git-annex's yes for a remote.log setting
UNIT_PATHS: tuple[Path, ...] = (
    Path("/etc/systemd/system") / UNIT_NAME,
    Path("/lib/systemd/system") / UNIT_NAME,
    Path("/usr/lib/systemd/system") / UNIT_NAME,
)
# What the shipped unit's RuntimeDirectory= and StateDirectory= create at start.
SYSTEMD_MADE_DIRS: dict[Path, str] = {
    Path("/run/torbridge"): "RuntimeDirectory=torbridge",
    Path("/var/lib/torbridge"): "StateDirectory=torbridge",
}
TOR_GROUP = "debian-tor"  # Debian's system tor runs as debian-tor
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    """One line of the report.

    ``ok`` is False for failures and for skipped checks; ``severity`` says
    whether a failure stops the service ("error") or only matters in some
    setups ("warning"). ``fix`` says what to do when not ok.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    severity: Severity = "error"
    skipped: bool = False

    @property
    def failed(self) -> bool:
        """A real failure (not a skip) that stops torbridge from serving."""
        return not self.ok and not self.skipped and self.severity == "error"


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def _fail(name: str, detail: str, fix: str, severity: Severity = "error") -> Check:
    return Check(name, False, detail, fix, severity)


def _skip(name: str, reason: str) -> Check:
    return Check(name, False, reason, None, "error", skipped=True)


# --- the report --------------------------------------------------------------------


def format_report(checks: Iterable[Check]) -> str:
    """One line per check: ``ok   name: detail``, ``FAIL name: detail — fix: ...``.

    Warnings are ``WARN``, skipped checks ``skip``; every prefix is four
    characters wide so the names line up.
    """
    lines = []
    for c in checks:
        if c.ok:
            tag = "ok  "
        elif c.skipped:
            tag = "skip"
        elif c.severity == "warning":
            tag = "WARN"
        else:
            tag = "FAIL"
        line = f"{tag} {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f" — fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def exit_status(checks: Iterable[Check]) -> int:
    """1 if any error-level check failed, else 0 (warnings do not count)."""
    return 1 if any(c.failed for c in checks) else 0


# --- running the checks ---------------------------------------------------------------


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
    """The Onionbalance instance (and frontend) checks of torbridge/balance.py."""
    from torbridge.balance import doctor_checks

    try:
        found = doctor_checks(config)
    except Exception as e:
        return [_fail("balance", f"the check itself failed: {type(e).__name__}: {e}",
                      "fix what the error names, or report it as a torbridge bug")]
    return [
        _ok("balance", what) if ok else _fail("balance", what, fix)
        for ok, what, fix in found
    ]


# --- git-annex and the repository ---------------------------------------------------------


def _check_git_annex() -> Check:
    try:
        version = check_git_annex()
    except StartupError as e:
        return _fail(
            "git-annex",
            str(e),
            f"install git-annex {MIN_GIT_ANNEX} or newer (Debian backports, or"
            " `pip install git-annex`) where the service's PATH finds it",
        )
    where = _which("git-annex")
    return _ok("git-annex", f"{version} ({where})")


def _which(program: str) -> str:
    return shutil.which(program) or program


def _git(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["git", *args], cwd=repository)


def _check_repository(repository: Path) -> Check:
    name = "repository"
    if not repository.exists():
        return _fail(
            name,
            f"{repository} does not exist",
            f"create it (`git init {repository} && git -C {repository} annex init`), or set"
            " `repository` in the config",
        )
    if not repository.is_dir():
        return _fail(name, f"{repository} is not a directory", "set `repository` in the config")
    if not os.access(repository, os.R_OK | os.X_OK):
        return _fail(
            name,
            f"{repository} is not readable by uid {os.geteuid()}",
            f"give the torbridge user access to it (e.g. `chown -R torbridge: {repository}`)",
        )
    result = _git(repository, "rev-parse", "--git-dir")
    if result.returncode != 0:
        if "dubious ownership" in result.stderr:
            return _fail(
                name,
                f"git refuses {repository}: it belongs to another user (dubious ownership)",
                "run doctor as the repository's owner, the torbridge user"
                " (`sudo -u torbridge torbridge doctor`)",
            )
        return _fail(
            name,
            f"{repository} is not a git repository",
            f"`git init {repository} && git -C {repository} annex init`",
        )
    try:
        uuid = repository_uuid(repository)
    except StartupError as e:
        return _fail(name, str(e), f"run `git annex init` in {repository}")
    return _ok(name, f"{repository} (git-annex uuid {uuid})")


def _check_expose(config: Config, expose: Expose) -> Check:
    name = f"expose {expose.name}"
    repo = config.repository
    if expose.remote == OWN_REPOSITORY:
        return _ok(name, f"port {expose.port}: the proxy's own repository")
    remote = read_remotes(repo).get(expose.remote)
    if remote is None:
        return _fail(
            name,
            f"the repository has no remote named {expose.remote!r}",
            f"link it (`git -C {repo} annex p2p --link --name {expose.remote}`, or `git remote"
            " add`), or correct `remote` in this [[expose]]",
        )
    if not remote.proxy:
        return _fail(
            name,
            f"remote {expose.remote!r} is not proxied",
            f"`git -C {repo} config remote.{expose.remote}.annex-proxy true`",
        )
    if not remote.uuid:
        return _fail(
            name,
            f"remote {expose.remote!r} has no annex-uuid",
            f"`git -C {repo} annex sync {expose.remote}` (or link it again) so git-annex"
            " learns its UUID",
        )
    try:
        proxied_remote(repo, expose.remote)  # whatever else the daemon insists on
        address = parse_p2p_address(remote.url or "")
    except RemoteError as e:
        return _fail(
            name,
            str(e),
            f"link the remote again: `git -C {repo} annex p2p --link --name {expose.remote}`",
        )
    if address is None:
        published = parse_remote_log(read_annex_log(repo, "remote.log")).get(remote.uuid)
        if published is not None and published.get("autoenable", "").lower() in YES:
            return _fail(
                name,
                f"remote.log publishes autoenable=true for {expose.remote!r}: a client that"
                " clones this repository and runs `git annex init` enables it itself and"
                " reaches its storage directly, not through the bridge",
                f"`git -C {repo} annex enableremote {expose.remote} autoenable=false` (with any"
                " setting it asks for, such as directory=)",
                severity="warning",
            )
        return _ok(
            name,
            f"port {expose.port}: remote {expose.remote} (uuid {remote.uuid}),"
            " through git-annex-shell"
            + (
                "; a special remote in remote.log: clients that merge the git-annex branch"
                " verify it once (token add prints how)"
                if published is not None
                else ""
            ),
        )
    try:
        read_token(repo, address)
    except RemoteError as e:
        return _fail(
            name,
            str(e),
            f"link it on the proxy so git-annex stores its token: `git -C {repo} annex p2p"
            f" --link --name {expose.remote}`",
        )
    return _ok(
        name,
        f"port {expose.port}: remote {expose.remote} (uuid {remote.uuid}) at {address},"
        " token present",
    )


# --- tor ----------------------------------------------------------------------------------


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
            return (controller.get_info("consensus/valid-after"),
                    controller.get_info("consensus/valid-until"))
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


# --- directories and files ------------------------------------------------------------------


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def _missing_dir(name: str, path: Path, create_mode: str) -> Check:
    """A check for a directory that does not exist yet: can the daemon create it?"""
    made_by = SYSTEMD_MADE_DIRS.get(path)
    if made_by is not None:
        return _ok(name, f"{path} does not exist yet; systemd creates it ({made_by}) at start")
    ancestor = _nearest_existing(path)
    fix = f"create it: `install -d -o torbridge -m {create_mode} {path}`"
    if not ancestor.is_dir():
        return _fail(name, f"{path} cannot be created: {ancestor} is not a directory", fix)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return _fail(
            name, f"{path} cannot be created: {ancestor} is not writable by uid {os.geteuid()}", fix
        )
    return _ok(name, f"{path} does not exist yet; torbridge creates it at start")


def _check_socket_dir(config: Config) -> Check:
    name = "socket_dir"
    path = config.socket_dir
    paths = [config.socket_path(expose) for expose in config.expose]
    too_long = [str(p) for p in paths if len(os.fsencode(p)) > UNIX_PATH_MAX]
    if too_long:
        return _fail(
            name,
            f"socket path {too_long[0]} is longer than {UNIX_PATH_MAX} bytes",
            "choose a shorter socket_dir (such as /run/torbridge) or shorter endpoint names",
        )
    if not os.path.lexists(path):
        return _missing_dir(name, path, "0750")
    if not path.is_dir():
        return _fail(name, f"{path} is not a directory", "remove it, or choose another socket_dir")
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        return _fail(
            name,
            f"{path} is world-writable (mode {_mode(st)}): anyone could replace the sockets",
            f"`chmod o-w {path}` (2750, group {TOR_GROUP}, lets tor in and nobody else)",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(
            name,
            f"{path} is not writable by uid {os.geteuid()}",
            f"`chown torbridge {path}`, or choose another socket_dir",
        )
    return _ok(name, f"{path} (mode {_mode(st)}) is writable")


def _check_tor_access(config: Config) -> Check | None:
    """Can Debian's tor (group debian-tor) reach the endpoint sockets? A warning only."""
    name = "tor socket access"
    try:
        tor_gid = grp.getgrnam(TOR_GROUP).gr_gid
    except KeyError:
        return None  # not Debian's tor: nothing we can tell
    path = config.socket_dir
    if not path.is_dir():
        return _ok(name, f"{path} does not exist yet; check again once the service runs")
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    # A socket's group is the directory's if it is setgid, else the daemon's own.
    socket_gid = st.st_gid if mode & stat.S_ISGID else os.getegid()
    dir_ok = bool(mode & stat.S_IXOTH) or (st.st_gid == tor_gid and bool(mode & stat.S_IXGRP))
    rw = stat.S_IRGRP | stat.S_IWGRP
    socket_ok = (config.socket_mode & 0o006) == 0o006 or (
        socket_gid == tor_gid and config.socket_mode & rw == rw
    )
    if dir_ok and socket_ok:
        return _ok(name, f"the {TOR_GROUP} group can reach the sockets in {path}")
    return _fail(
        name,
        f"tor (group {TOR_GROUP}) cannot reach the sockets in {path}"
        f" (directory mode {_mode(st)}, group {st.st_gid}; socket_mode {config.socket_mode:04o})",
        f'`chgrp {TOR_GROUP} {path} && chmod 2750 {path}` with socket_mode "0660" (the'
        " shipped unit does this at start); matters only if tor runs as Debian's system tor",
        severity="warning",
    )


def _check_state_dir(path: Path) -> Check:
    name = "state_dir"
    if not os.path.lexists(path):
        return _missing_dir(name, path, "0700")
    if not path.is_dir():
        return _fail(name, f"{path} is not a directory", "remove it, or choose another state_dir")
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        return _fail(
            name,
            f"{path} has mode {_mode(st)}: others can look at the tokens and the onion key",
            f"`chmod 0700 {path}`",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(
            name, f"{path} is not writable by uid {os.geteuid()}", f"`chown -R torbridge: {path}`"
        )
    key = path / KEY_FILE
    if key.exists() and stat.S_IMODE(key.stat().st_mode) & 0o077:
        return _fail(
            name,
            f"the onion service key {key} has mode {_mode(key.stat())}",
            f"`chmod 0600 {key}`",
        )
    return _ok(name, f"{path} (mode {_mode(st)})")


def _check_tokens(state_dir: Path, own_endpoints: Sequence[str] = ()) -> Check:
    name = "tokens"
    path = state_dir / TOKENS_FILE
    if not os.path.lexists(path):
        return _ok(name, f"no tokens yet ({path}); make one with `torbridge token add NAME`")
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        return _fail(name, f"{path} has mode {_mode(st)}", f"`chmod 0600 {path}`")
    try:
        tokens = TokenStore(state_dir).list()
    except TokenError as e:
        return _fail(
            name,
            str(e),
            f"restore {path} from a backup, or move it away and issue the tokens again",
        )
    # What each token may do to the proxy's git; rewrite ones by name.
    levels = [info.git_access(own_endpoints) for info in tokens]
    counts = ", ".join(f"{levels.count(level)} {level.label}" for level in GitAccess)
    rewriters = [info.name for info, level in zip(tokens, levels, strict=True)
                 if level is GitAccess.REWRITE]
    may_rewrite = f"; may rewrite git history: {', '.join(rewriters)}" if rewriters else ""
    return _ok(
        name, f"{len(tokens)} token(s) in {path} (mode {_mode(st)}); git {counts}{may_rewrite}"
    )


# --- systemd ----------------------------------------------------------------------------


def _check_unit(unit_paths: Sequence[Path]) -> Check:
    name = "systemd unit"
    for path in unit_paths:
        if path.is_file():
            return _ok(name, f"{path}")
    return _fail(
        name,
        f"{UNIT_NAME} is not installed",
        f"copy systemd/{UNIT_NAME} to /etc/systemd/system/ and `systemctl daemon-reload`"
        " (only matters for running torbridge as a service)",
        severity="warning",
    )
