"""`torbridge doctor`: each check, broken on purpose, says FAIL and how to fix it."""

from __future__ import annotations

import grp
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.ops import ONION, FakeTor, add_tor_remote, git
from torbridge.annex.host import MIN_GIT_ANNEX
from torbridge.ops import doctor
from torbridge.ops.doctor import Check, exit_status, format_report, run_checks
from torbridge.protocol.permissions import GitAccess
from torbridge.tokens import TokenStore
from torbridge.tor.onion import KEY_FILE

pytestmark = pytest.mark.annex

TOR_GROUP = "debian-tor"


def _tor_gid() -> int | None:
    try:
        return grp.getgrnam(TOR_GROUP).gr_gid
    except KeyError:
        return None


def _toml(value: str | Path | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Host:
    """A proxy host in a temp dir: repository, dirs, config, unit file."""

    root: Path
    repo: Path
    state_dir: Path
    socket_dir: Path
    unit: Path
    expose: list[tuple[str, str, int]] = field(default_factory=lambda: [("hub", ".", 5000)])
    tor: dict[str, str | bool] = field(default_factory=dict)
    socket_mode: str = "0660"

    @property
    def config_path(self) -> Path:
        return self.root / "torbridge.toml"

    def write(self) -> Path:
        lines = [
            f"repository = {_toml(self.repo)}",
            f"state_dir = {_toml(self.state_dir)}",
            f"socket_dir = {_toml(self.socket_dir)}",
            f"socket_mode = {_toml(self.socket_mode)}",
        ]
        for name, remote, port in self.expose:
            lines += ["[[expose]]", f"name = {_toml(name)}", f"remote = {_toml(remote)}"]
            lines.append(f"port = {port}")
        lines.append("[tor]")
        lines += [f"{key} = {_toml(value)}" for key, value in self.tor.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def run(self, timeout: float = 3.0) -> list[Check]:
        self.write()
        return run_checks(self.config_path, unit_paths=[self.unit], timeout=timeout)


def line(checks: list[Check], name: str) -> str:
    """The report line of the check called *name* (exactly one must exist)."""
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, format_report(checks)
    return format_report(found).rstrip("\n")


def names(checks: list[Check]) -> list[str]:
    return [c.name for c in checks]


@pytest.fixture
def host(make_repo: Callable[[str], Path], tmp_path: Path) -> Host:
    repo = make_repo("hub")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_dir.chmod(0o700)
    socket_dir = tmp_path / "sock"
    socket_dir.mkdir()
    socket_dir.chmod(0o750)
    unit = tmp_path / "torbridge.service"
    unit.write_text("[Service]\n")
    h = Host(tmp_path, repo, state_dir, socket_dir, unit)
    # Never the machine's 127.0.0.1:9050: a socket path nobody listens on.
    h.tor["socks"] = f"unix:{tmp_path / 'no-socks'}"
    return h


@pytest.fixture
def socks_listener(tmp_path: Path) -> Iterator[str]:
    """A stream socket that accepts connections (the backlog does) and does nothing."""
    path = tmp_path / "socks"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(4)
        yield f"unix:{path}"


def tor_ready_socket_dir(path: Path) -> None:
    """As the shipped unit leaves /run/torbridge: group debian-tor, setgid, 2750."""
    gid = _tor_gid()
    if gid is not None:
        os.chown(path, -1, gid)
    path.chmod(0o2750)


# --- all good ---------------------------------------------------------------------------


def test_all_good(host: Host, fake_tor: Callable[..., FakeTor], socks_listener: str) -> None:
    if os.geteuid() != 0 and _tor_gid() is not None and _tor_gid() not in os.getgroups():
        pytest.skip(f"needs root or membership in {TOR_GROUP} to set up the socket dir")
    add_tor_remote(host.repo, "peer")
    host.expose.append(("peer", "peer", 5001))
    tor = fake_tor(version="0.4.9.11", consensus_at=time.time() - 600)
    host.tor.update(control=tor.address, socks=socks_listener)
    tor_ready_socket_dir(host.socket_dir)
    TokenStore(host.state_dir).add("alice")

    checks = host.run()

    report = format_report(checks)
    assert all(c.ok for c in checks), report
    assert exit_status(checks) == 0
    assert all(row.startswith("ok   ") for row in report.splitlines()), report
    expected = ["config", "git-annex", "repository", "expose hub", "expose peer", "tor control"]
    expected += ["tor features", "tor clock", "tor socks", "socket_dir"]
    expected += ["tor socket access"] if _tor_gid() is not None else []
    expected += ["state_dir", "tokens", "systemd unit"]
    assert names(checks) == expected
    assert f"tor-annex::{ONION}:5000, token present" in line(checks, "expose peer")
    assert "authenticated, tor 0.4.9.11" in line(checks, "tor control")
    assert "1 token(s)" in line(checks, "tokens")


def test_tor_too_old_for_a_configured_feature(host: Host, fake_tor: Callable[..., FakeTor]) -> None:
    host.tor.update(control=fake_tor(version="0.4.5.16").address, client_auth=True)
    checks = host.run()
    found = next(c for c in checks if c.name == "tor features")
    assert not found.ok and found.severity == "warning", format_report(checks)
    assert found.detail == (
        "tor 0.4.5.16: [tor] pow_defenses needs tor 0.4.9.2 or newer;"
        " [tor] client_auth needs tor 0.4.6.1 or newer"
    ), found.detail
    assert "upgrade tor" in (found.fix or "")


def test_clock_far_off(host: Host, fake_tor: Callable[..., FakeTor]) -> None:
    host.tor.update(control=fake_tor(version="0.4.9.11", consensus_at=time.time() + 86400).address)
    checks = host.run()
    found = next(c for c in checks if c.name == "tor clock")
    assert not found.ok and found.severity == "warning", format_report(checks)
    assert "minutes behind the Tor network's" in found.detail, found.detail
    assert "timedatectl" in (found.fix or "")


# --- config --------------------------------------------------------------------------------


def test_config_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    checks = run_checks(path, unit_paths=[tmp_path / "unit"])
    assert line(checks, "config") == (
        f"FAIL config: {path}: config file not found"
        f" — fix: correct {path}, or write one with `torbridge init REPOSITORY`"
    )
    # The checks that do not need the config still run; the others say why they did not.
    assert line(checks, "git-annex").startswith("ok   git-annex: ")
    skipped = [c for c in checks if c.skipped]
    assert len(skipped) == 1
    assert format_report(skipped) == (
        "skip repository, endpoints, tor, socket_dir, state_dir:"
        " they need the config, which did not load\n"
    )
    assert "systemd unit" in names(checks)
    assert exit_status(checks) == 1


def test_config_invalid(tmp_path: Path) -> None:
    path = tmp_path / "torbridge.toml"
    path.write_text("repository = 5\n")
    checks = run_checks(path, unit_paths=[])
    assert line(checks, "config").startswith(
        f'FAIL config: {path}: key "repository": expected a string, got integer — fix: '
    )
    assert exit_status(checks) == 1


# --- git-annex -------------------------------------------------------------------------------


def _fake_bin(tmp_path: Path, version: str | None) -> Path:
    """A PATH with the real git and, if *version*, a git-annex that says it is that."""
    import shutil

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    real_git = shutil.which("git")
    assert real_git is not None
    (bin_dir / "git").symlink_to(real_git)
    if version is not None:
        for program in ("git-annex", "git-annex-shell"):
            script = bin_dir / program
            script.write_text(f"#!/bin/sh\necho {version}\n")
            script.chmod(0o755)
    return bin_dir


def test_git_annex_too_old(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.write()
    monkeypatch.setenv("PATH", str(_fake_bin(host.root, "8.20210223")))
    checks = host.run()
    assert line(checks, "git-annex") == (
        f"FAIL git-annex: git-annex 8.20210223 is too old: {MIN_GIT_ANNEX} or newer needed"
        f" — fix: install git-annex {MIN_GIT_ANNEX} or newer (Debian backports, or"
        " `pip install git-annex`) where the service's PATH finds it"
    )
    assert line(checks, "repository").startswith("ok   repository: ")  # independent
    assert exit_status(checks) == 1


def test_git_annex_missing(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(_fake_bin(host.root, None)))
    checks = host.run()
    assert line(checks, "git-annex").startswith(
        "FAIL git-annex: git-annex not found on PATH: install git-annex"
    )
    assert "— fix: install git-annex" in line(checks, "git-annex")


# --- the repository ----------------------------------------------------------------------------


def test_repository_missing(host: Host) -> None:
    host.repo = host.root / "not-there"
    host.expose.append(("peer", "peer", 5001))
    checks = host.run()
    assert line(checks, "repository") == (
        f"FAIL repository: {host.repo} does not exist — fix: create it (`git init {host.repo}"
        f" && git -C {host.repo} annex init`), or set `repository` in the config"
    )
    assert line(checks, "expose hub") == "skip expose hub: the repository check failed"
    assert line(checks, "expose peer") == "skip expose peer: the repository check failed"
    assert line(checks, "tor socks") == "skip tor socks: the repository check failed"
    assert line(checks, "state_dir").startswith("ok   ")  # independent of the repository
    assert exit_status(checks) == 1


def test_repository_not_git_annex(host: Host) -> None:
    host.repo = host.root / "plain"
    host.repo.mkdir()
    git(host.repo, "init", "-q")
    checks = host.run()
    assert line(checks, "repository") == (
        f"FAIL repository: {host.repo} is not a git-annex repository (no annex.uuid): run"
        f" `git annex init` — fix: run `git annex init` in {host.repo}"
    )


def test_repository_not_git(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.repo = host.root / "empty"
    host.repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(host.root))  # nor any repo above it
    checks = host.run()
    assert line(checks, "repository").startswith(
        f"FAIL repository: {host.repo} is not a git repository — fix: `git init {host.repo}"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the repository away")
def test_repository_of_another_user(host: Host) -> None:
    for path in [host.repo, *host.repo.rglob("*")]:
        os.lchown(path, 65534, 65534)
    checks = host.run()
    assert line(checks, "repository") == (
        f"FAIL repository: git refuses {host.repo}: it belongs to another user (dubious"
        " ownership) — fix: run doctor as the repository's owner, the torbridge user"
        " (`sudo -u torbridge torbridge doctor`)"
    )


# --- endpoints ------------------------------------------------------------------------------------


def _remote_missing(repo: Path) -> None:
    pass


def _remote_not_proxied(repo: Path) -> None:
    add_tor_remote(repo, "peer", proxy=False)


def _remote_without_uuid(repo: Path) -> None:
    git(repo, "remote", "add", "peer", f"tor-annex::{ONION}:5000")
    git(repo, "config", "remote.peer.annex-proxy", "true")


def _remote_bad_address(repo: Path) -> None:
    add_tor_remote(repo, "peer")
    git(repo, "config", "remote.peer.url", "tor-annex::not-an-onion:5000")


def _remote_without_token(repo: Path) -> None:
    add_tor_remote(repo, "peer", token=None)


@pytest.mark.parametrize(
    ("break_it", "detail", "fix"),
    [
        (
            _remote_missing,
            "the repository has no remote named 'peer'",
            "link it (`git -C {repo} annex p2p --link --name peer`, or `git remote add`), or"
            " correct `remote` in this [[expose]]",
        ),
        (
            _remote_not_proxied,
            "remote 'peer' is not proxied",
            "`git -C {repo} config remote.peer.annex-proxy true`",
        ),
        (
            _remote_without_uuid,
            "remote 'peer' has no annex-uuid",
            "`git -C {repo} annex sync peer` (or link it again) so git-annex learns its UUID",
        ),
        (
            _remote_bad_address,
            "'tor-annex::not-an-onion:5000' is not a valid tor-annex address",
            "link the remote again: `git -C {repo} annex p2p --link --name peer`",
        ),
        (
            _remote_without_token,
            f"no token for tor-annex::{ONION}:5000",
            "link it on the proxy so git-annex stores its token: `git -C {repo} annex p2p"
            " --link --name peer`",
        ),
    ],
    ids=["missing", "not-proxied", "no-uuid", "bad-address", "no-token"],
)
def test_expose_remote_broken(
    host: Host, break_it: Callable[[Path], None], detail: str, fix: str
) -> None:
    break_it(host.repo)
    host.expose.append(("peer", "peer", 5001))
    checks = host.run()
    row = line(checks, "expose peer")
    assert row.startswith(f"FAIL expose peer: {detail}"), row
    assert row.endswith(" — fix: " + fix.format(repo=host.repo)), row
    assert line(checks, "expose hub").startswith("ok   expose hub: port 5000")
    assert exit_status(checks) == 1


def test_expose_remote_through_git_annex_shell(host: Host, tmp_path: Path) -> None:
    git(host.repo, "remote", "add", "backup", str(tmp_path / "backup"))
    git(host.repo, "config", "remote.backup.annex-uuid", "11111111-2222-4333-8444-555555555555")
    git(host.repo, "config", "remote.backup.annex-proxy", "true")
    host.expose.append(("backup", "backup", 5001))
    checks = host.run()
    assert line(checks, "expose backup") == (
        "ok   expose backup: port 5001: remote backup"
        " (uuid 11111111-2222-4333-8444-555555555555), through git-annex-shell"
    )
    assert "tor socks" not in names(checks)  # no tor-annex remote: SOCKS is not needed


def test_expose_special_remote_published_in_remote_log(host: Host, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    git(
        host.repo,
        "annex",
        "initremote",
        "sr",
        "type=directory",
        f"directory={store}",
        "encryption=none",
        "autoenable=true",
    )
    git(host.repo, "config", "remote.sr.annex-proxy", "true")
    git(host.repo, "annex", "updateproxy")
    host.expose.append(("sr", "sr", 5001))
    checks = host.run()
    report = line(checks, "expose sr")
    assert report.startswith("WARN") or "warn" in report.lower(), report
    assert "autoenable=true" in report and "enableremote sr autoenable=false" in report, report
    assert exit_status(checks) == 0  # a warning only: the endpoint works
    git(
        host.repo,
        "annex",
        "enableremote",
        "sr",
        "autoenable=false",  # the fix it names
        f"directory={store}",
    )
    report = line(host.run(), "expose sr")
    assert report.startswith("ok   expose sr: port 5001: remote sr"), report
    assert "special remote in remote.log" in report and "verify it once" in report, report


# --- tor ----------------------------------------------------------------------------------------


def test_tor_control_unreachable(host: Host) -> None:
    host.tor["control"] = f"unix:{host.root / 'no-control'}"
    checks = host.run()
    row = line(checks, "tor control")
    assert row.startswith(
        f"FAIL tor control: cannot reach tor's control port {host.tor['control']}"
    )
    assert row.endswith(
        "— fix: start tor (`systemctl start tor`); Debian's tor listens on"
        ' [tor] control = "unix:/run/tor/control"'
    )


def test_tor_control_wants_a_password(host: Host, fake_tor: Callable[..., FakeTor]) -> None:
    host.tor["control"] = fake_tor("HASHEDPASSWORD").address
    checks = host.run()
    assert line(checks, "tor control") == (
        f"FAIL tor control: tor's control port {host.tor['control']} wants a password: set"
        " [tor] password — fix: add the torbridge user to the debian-tor group (cookie"
        " authentication), or set [tor] password to tor's HashedControlPassword"
    )


def test_tor_control_does_not_answer(host: Host, fake_tor: Callable[..., FakeTor]) -> None:
    host.tor["control"] = fake_tor("silent").address
    checks = host.run(timeout=0.5)
    assert line(checks, "tor control") == (
        f"FAIL tor control: no answer from {host.tor['control']} within 0.5s — fix: check that"
        " tor is running and that [tor] control names its control port"
    )


def test_torrc_onion_without_hostname(host: Host) -> None:
    hs_dir = host.root / "hs"
    hs_dir.mkdir()
    host.tor.update(onion="torrc", hidden_service_dir=str(hs_dir))
    checks = host.run()
    assert line(checks, "tor onion") == (
        f"FAIL tor onion: cannot read {hs_dir}/hostname: No such file or directory; is the"
        " torrc snippet installed and tor reloaded? — fix: install the snippet (`torbridge"
        " onion-snippet > /etc/tor/torrc.d/torbridge.conf`), reload tor, and let the"
        " torbridge user read the hostname file"
    )


def test_socks_unreachable(host: Host) -> None:
    add_tor_remote(host.repo, "peer")
    host.expose.append(("peer", "peer", 5001))
    checks = host.run()
    assert line(checks, "tor socks") == (
        f"FAIL tor socks: cannot connect to tor's SOCKS port {host.tor['socks']} (No such file"
        " or directory), needed for the tor-annex remote(s) peer — fix: start tor, or set"
        ' [tor] socks to its SocksPort (Debian: "127.0.0.1:9050" or "unix:/run/tor/socks")'
    )
    assert line(checks, "expose peer").startswith("ok   ")


def test_socks_reachable_over_tcp(host: Host) -> None:
    add_tor_remote(host.repo, "peer")
    host.expose.append(("peer", "peer", 5001))
    with socket.create_server(("127.0.0.1", 0)) as server:
        host.tor["socks"] = f"127.0.0.1:{server.getsockname()[1]}"
        checks = host.run()
    assert line(checks, "tor socks") == (
        f"ok   tor socks: {host.tor['socks']} accepts connections (for peer)"
    )


# --- directories and files -----------------------------------------------------------------------


def test_socket_dir_world_writable(host: Host) -> None:
    host.socket_dir.chmod(0o777)
    checks = host.run()
    assert line(checks, "socket_dir") == (
        f"FAIL socket_dir: {host.socket_dir} is world-writable (mode 0777): anyone could"
        f" replace the sockets — fix: `chmod o-w {host.socket_dir}` (2750, group debian-tor,"
        " lets tor in and nobody else)"
    )
    assert exit_status(checks) == 1


def test_socket_dir_cannot_be_created(host: Host) -> None:
    blocker = host.root / "a-file"
    blocker.write_text("")
    host.socket_dir = blocker / "sock"
    checks = host.run()
    assert line(checks, "socket_dir") == (
        f"FAIL socket_dir: {host.socket_dir} cannot be created: {blocker} is not a directory"
        f" — fix: create it: `install -d -o torbridge -m 0750 {host.socket_dir}`"
    )


def test_socket_dir_not_there_yet_is_fine(host: Host) -> None:
    host.socket_dir = host.root / "later" / "sock"
    checks = host.run()
    assert line(checks, "socket_dir") == (
        f"ok   socket_dir: {host.socket_dir} does not exist yet; torbridge creates it at start"
    )


def test_socket_path_too_long(host: Host) -> None:
    host.socket_dir = host.root / ("d" * 120)
    checks = host.run()
    row = line(checks, "socket_dir")
    assert row.startswith(f"FAIL socket_dir: socket path {host.socket_dir}/hub.sock is longer")
    assert row.endswith(
        "than 107 bytes — fix: choose a shorter socket_dir (such as /run/torbridge) or shorter"
        " endpoint names"
    )


@pytest.mark.skipif(_tor_gid() is None, reason=f"no {TOR_GROUP} group (Debian's tor)")
def test_tor_socket_access(host: Host) -> None:
    hs_dir = host.root / "hs"
    hs_dir.mkdir()
    (hs_dir / "hostname").write_text(ONION + "\n")
    host.tor.update(onion="torrc", hidden_service_dir=str(hs_dir))  # tor, without a control port
    os.chown(host.socket_dir, -1, 0 if _tor_gid() != 0 else 1)
    host.socket_dir.chmod(0o750)
    checks = host.run()
    row = line(checks, "tor socket access")
    assert row.startswith(
        f"WARN tor socket access: tor (group debian-tor) cannot reach the sockets in"
        f" {host.socket_dir} (directory mode 0750"
    )
    assert row.endswith(
        f"— fix: `chgrp debian-tor {host.socket_dir} && chmod 2750 {host.socket_dir}` with"
        ' socket_mode "0660" (the shipped unit does this at start); matters only if tor runs'
        " as Debian's system tor"
    )
    assert [c.severity for c in checks if c.name == "tor socket access"] == ["warning"]
    assert exit_status(checks) == 0  # a warning only

    if os.geteuid() != 0:
        return
    tor_ready_socket_dir(host.socket_dir)
    assert line(host.run(), "tor socket access") == (
        f"ok   tor socket access: the debian-tor group can reach the sockets in {host.socket_dir}"
    )


def test_state_dir_mode(host: Host) -> None:
    host.state_dir.chmod(0o755)
    checks = host.run()
    assert line(checks, "state_dir") == (
        f"FAIL state_dir: {host.state_dir} has mode 0755: others can look at the tokens and"
        f" the onion key — fix: `chmod 0700 {host.state_dir}`"
    )


def test_state_dir_onion_key_mode(host: Host) -> None:
    key = host.state_dir / KEY_FILE
    key.write_text("ED25519-V3:secret\n")
    key.chmod(0o644)
    checks = host.run()
    assert line(checks, "state_dir") == (
        f"FAIL state_dir: the onion service key {key} has mode 0644 — fix: `chmod 0600 {key}`"
    )


def test_tokens_mode(host: Host) -> None:
    TokenStore(host.state_dir).add("alice")
    path = host.state_dir / "tokens.json"
    path.chmod(0o644)
    checks = host.run()
    assert line(checks, "tokens") == (
        f"FAIL tokens: {path} has mode 0644 — fix: `chmod 0600 {path}`"
    )


def test_tokens_git_access_summary(host: Host) -> None:
    """The tokens line says what the tokens may do to the proxy's git (own endpoint: hub)."""
    store = TokenStore(host.state_dir)
    store.add("alice")  # write, by default
    store.add("nodeonly", "rw", ["peer"])  # read: not the proxy's own endpoint
    store.add("viewer", "ro")  # read
    store.add("admin", "rw", ["hub"], GitAccess.REWRITE)
    row = line(host.run(), "tokens")
    assert row.startswith("ok   tokens: 4 token(s) in "), row
    assert row.endswith("; git 0 none, 2 read, 1 write, 1 rewrite; may rewrite git history: admin")


def test_tokens_corrupt(host: Host) -> None:
    path = host.state_dir / "tokens.json"
    path.write_text("{")
    path.chmod(0o600)
    checks = host.run()
    row = line(checks, "tokens")
    assert row.startswith(f"FAIL tokens: token file {path} is not valid: ")
    assert row.endswith(
        f"— fix: restore {path} from a backup, or move it away and issue the tokens again"
    )


def test_no_tokens_yet_is_fine(host: Host) -> None:
    checks = host.run()
    assert line(checks, "tokens") == (
        f"ok   tokens: no tokens yet ({host.state_dir}/tokens.json); make one with"
        " `torbridge token add NAME`"
    )


# --- systemd --------------------------------------------------------------------------------------


def test_unit_not_installed_is_a_warning(host: Host) -> None:
    host.unit = host.root / "nowhere" / "torbridge.service"
    checks = host.run()
    assert line(checks, "systemd unit") == (
        "WARN systemd unit: torbridge.service is not installed — fix: copy"
        " systemd/torbridge.service to /etc/systemd/system/ and `systemctl daemon-reload`"
        " (only matters for running torbridge as a service)"
    )
    assert exit_status(checks) == 0, format_report(checks)


# --- the report itself ---------------------------------------------------------------


def test_a_crashing_check_is_a_fail_line(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path) -> Check:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(doctor, "_check_state_dir", boom)
    checks = host.run()
    assert line(checks, "state_dir") == (
        "FAIL state_dir: the check itself failed: RuntimeError: disk on fire — fix: fix what"
        " the error names, or report it as a torbridge bug"
    )
    assert line(checks, "tokens").startswith("ok   ")  # the next check still ran


def test_format_report_and_exit_status() -> None:
    checks = [
        Check("a", True, "fine"),
        Check("b", False, "broken", "mend it"),
        Check("c", False, "meh", "if you like", severity="warning"),
        Check("d", False, "not tried", skipped=True),
    ]
    assert format_report(checks) == (
        "ok   a: fine\n"
        "FAIL b: broken — fix: mend it\n"
        "WARN c: meh — fix: if you like\n"
        "skip d: not tried\n"
    )
    assert exit_status(checks) == 1
    assert exit_status(checks[2:]) == 0


def test_doctor_prints_the_report(tmp_path: Path) -> None:
    printed: list[str] = []
    status = doctor.doctor(tmp_path / "missing.toml", print_=printed.append)
    assert status == 1
    assert printed[0].startswith(f"FAIL config: {tmp_path / 'missing.toml'}: config file not found")
