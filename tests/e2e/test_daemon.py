"""The daemon's life cycle and its command line: start, stop, errors, tokens on disk."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.process import Result
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex


def assert_one_line_error(result: Result) -> str:
    assert result.returncode != 0, f"expected a failure:\n{result.describe()}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, (
        f"want one clear line on stderr:\n{result.describe()}"
    )
    return lines[0]


# --- stopping ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_with_open_sessions(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, sig: signal.Signals
) -> None:
    """A signal stops the daemon promptly even with sessions open; sockets go.
    (SIGTERM first waits for requests in flight: the stalled PUT here holds it
    for [limits] drain_timeout, 1 s.)"""
    bridge = make_bridge()
    bridge.config_path.write_text(bridge.config_text() + "\n[limits]\ndrain_timeout = 1\n")
    bridge.start()
    address = bridge.add_token("t", "rw")
    idle = RawSession(address.socket)
    idle.auth(address.token, proxy_repo.uuid)
    assert idle.version(4) == "VERSION 4"
    unauthenticated = RawSession(address.socket)
    unauthenticated.send_raw(b"AUTH 1234")  # a partial line
    mid_put = RawSession(address.socket)
    mid_put.auth(address.token, proxy_repo.uuid)
    assert mid_put.version(4) == "VERSION 4"
    mid_put.send_line("PUT  SHA256E-s100--" + "a" * 64)
    mid_put.expect("PUT-FROM 0")
    mid_put.send_raw(b"DATA 100\n" + b"x" * 10)
    try:
        bridge.stop(timeout=15, sig=sig)  # asserts exit 0 and that the socket is gone
        for s in (idle, unauthenticated, mid_put):
            assert s.is_closed(timeout=5), "a session outlived the daemon"
    finally:
        for s in (idle, unauthenticated, mid_put):
            s.close()
    assert not proxy_repo.has_key("SHA256E-s100--" + "a" * 64)
    proxy_repo.fsck_content()


def test_restart_serves_again(bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """Tokens survive a restart; the same linked client works after it."""
    rw_client.add_files({"one.txt": b"one\n", "two.txt": b"two\n"})
    rw_client.annex("copy", "--to", "hub", "one.txt")
    bridge.stop()
    bridge.start()
    rw_client.annex("copy", "--to", "hub", "two.txt")
    assert proxy_repo.key_content(rw_client.key("two.txt")) == b"two\n"


# --- start-up errors ---------------------------------------------------------------------


def config_text(repository: Path, state: Path, sockets: Path, extra: str = "") -> str:
    return (
        f'repository = "{repository}"\nstate_dir = "{state}"\nsocket_dir = "{sockets}"\n'
        f'{extra}\n[[expose]]\nname = "hub"\nremote = "."\nport = 5000\n'
    )


CASES: dict[str, Callable[[Path, Path, Path, Path], str]] = {
    "missing repository": lambda repo, st, so, tmp: config_text(tmp / "nowhere", st, so),
    "not a git-annex repository": lambda repo, st, so, tmp: config_text(tmp, st, so),
    "invalid TOML": lambda repo, st, so, tmp: config_text(repo, st, so) + "[[expose\n",
    "no endpoint": lambda repo, st, so, tmp: (
        f'repository = "{repo}"\nstate_dir = "{st}"\nsocket_dir = "{so}"\n'
    ),
    "unknown key": lambda repo, st, so, tmp: config_text(repo, st, so, "idle_timout = 5"),
    "bad port": lambda repo, st, so, tmp: config_text(repo, st, so).replace(
        "port = 5000", 'port = "x"'
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_is_one_line(
    annex_env: AnnexEnv, proxy_repo: AnnexRepo, tmp_path: Path, case: str
) -> None:
    sockets = tmp_path / "s"
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    cfg = tmp_path / "bad.toml"
    cfg.write_text(CASES[case](proxy_repo.path, tmp_path / "state", sockets, plain_dir))
    result = annex_env.run(
        ["torbridge", "--config", str(cfg), "serve"], tmp_path, check=False, timeout=30
    )
    assert_one_line_error(result)
    assert not (sockets / "hub.sock").exists()


def test_missing_config_file(annex_env: AnnexEnv, tmp_path: Path) -> None:
    result = annex_env.run(
        ["torbridge", "--config", str(tmp_path / "none.toml"), "serve"],
        tmp_path,
        check=False,
        timeout=30,
    )
    assert_one_line_error(result)


def test_socket_in_use(bridge: Bridge, annex_env: AnnexEnv, proxy_repo: AnnexRepo) -> None:
    """A second daemon on the same sockets fails and leaves the first one alone."""
    address = bridge.add_token("t", "ro")
    second = annex_env.run(
        ["torbridge", "--config", str(bridge.config_path), "serve"],
        bridge.workdir,
        check=False,
        timeout=30,
    )
    assert_one_line_error(second)
    assert bridge.socket_path().exists(), "the failed second daemon removed the live socket"
    bridge.assert_alive()
    with RawSession(address.socket) as s:
        s.auth(address.token, proxy_repo.uuid)


def test_stale_socket_file(make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo) -> None:
    """A socket left by a killed daemon (nobody listening) does not block a start."""
    b = make_bridge()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(b.socket_path()))
    stale.close()
    assert b.socket_path().exists()
    b.start()
    address = b.add_token("t")
    with RawSession(address.socket) as s:
        s.auth(address.token, proxy_repo.uuid)


# --- tokens ------------------------------------------------------------------------------


def test_tokens_not_stored_in_clear(bridge: Bridge) -> None:
    tokens = [
        bridge.add_token(f"t{i}", mode).token for i, mode in enumerate(["rw", "ro", "append"])
    ]
    for path in [p for p in bridge.state_dir.rglob("*") if p.is_file()]:
        data = path.read_bytes().lower()
        for token in tokens:
            assert token.lower().encode() not in data, f"token in clear in {path}"


def test_token_list_and_revoke(bridge: Bridge, proxy_repo: AnnexRepo) -> None:
    a = bridge.add_token("alpha", "rw")
    b = bridge.add_token("beta", "append")
    listing = bridge.list_tokens()
    assert "alpha" in listing and "beta" in listing and "append" in listing, listing
    assert a.token not in listing and b.token not in listing, "list shows secrets"
    bridge.revoke("alpha")
    assert "alpha" not in bridge.list_tokens()
    with RawSession(a.socket) as s:
        assert s.auth(a.token) == "AUTH-FAILURE"
    with RawSession(b.socket) as s:
        s.auth(b.token, proxy_repo.uuid)
    # Two tokens are different secrets even for one name's successor.
    c = bridge.add_token("alpha", "rw")
    assert c.token != a.token
    with RawSession(c.socket) as s:
        s.auth(c.token, proxy_repo.uuid)


def test_two_endpoints(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, make_client: Callable[[str], Client]
) -> None:
    """One address line per endpoint; each socket serves the proxy's repository."""
    b = make_bridge(exposes=[Expose("hub", ".", 5000), Expose("mirror", ".", 5001)])
    b.start()
    lines = b.add_token_lines("both", "rw")
    assert {a.socket for a in lines} == {b.socket_path("hub"), b.socket_path("mirror")}
    assert len({a.token for a in lines}) == 1
    for address in lines:
        with RawSession(address.socket) as s:
            s.auth(address.token, proxy_repo.uuid)
    client = make_client("client")
    client.link(b.add_token("c", "rw", endpoint="mirror").line, "mirror")
    client.add_files({"via mirror.txt": b"mirror\n"})
    client.annex("copy", "--to", "mirror", ".")
    assert proxy_repo.key_content(client.key("via mirror.txt")) == b"mirror\n"


def test_idle_unauthenticated_connection_is_harmless(bridge: Bridge, proxy_repo: AnnexRepo) -> None:
    """A peer that connects and says nothing does not block others."""
    address = bridge.add_token("t")
    silent = [RawSession(address.socket) for _ in range(5)]
    try:
        with RawSession(address.socket) as s:
            s.auth(address.token, proxy_repo.uuid)
            assert s.version(4) == "VERSION 4"
    finally:
        for s in silent:
            s.close()
    bridge.assert_alive()


# --- the transport program -------------------------------------------------------------


def test_transport_program(
    bridge: Bridge, annex_env: AnnexEnv, proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """``git-annex-p2p-torbridge ADDR`` relays stdio to the socket; exit 0 when done."""
    address = bridge.add_token("t", "ro")
    request = f"AUTH {proxy_repo.uuid} {address.token}\nVERSION 4\n".encode()
    expected = f"AUTH-SUCCESS {proxy_repo.uuid}\nVERSION 4\n"
    # stdin/stdout are pipes (as git-annex makes them).
    piped = annex_env.run(
        ["git-annex-p2p-torbridge", str(address.socket)], tmp_path, input=request, timeout=30
    )
    assert piped.stdout == expected, piped.describe()
    # stdin/stdout are regular files: the bytes are copied.
    (tmp_path / "in").write_bytes(request)
    with open(tmp_path / "in", "rb") as stdin, open(tmp_path / "out", "wb") as stdout:
        proc = subprocess.run(
            ["git-annex-p2p-torbridge", str(address.socket)],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=annex_env.env,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").read_text() == expected


def test_transport_program_no_daemon(annex_env: AnnexEnv, tmp_path: Path) -> None:
    result = annex_env.run(
        ["git-annex-p2p-torbridge", str(tmp_path / "none.sock")],
        tmp_path,
        input=b"AUTH x y\n",
        check=False,
        timeout=30,
    )
    assert_one_line_error(result)


def test_stop_during_transfers(bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """SIGTERM while a git fetch and a content download are running: exit 0, promptly."""
    blob = os.urandom(12 * 1024 * 1024).hex().encode()
    proxy_repo.commit_git_file("big.txt", blob, "big commit")
    proxy_repo.add_files({"big.bin": os.urandom(64 * 1024 * 1024)})
    rw_client.git("fetch", "hub", timeout=60)
    rw_client.git("merge", "-q", "hub/main", timeout=60)
    proxy_repo.commit_git_file("big2.txt", blob[::-1], "another big commit")

    procs = [
        subprocess.Popen(
            cmd,
            cwd=rw_client.path,
            env=rw_client.env.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for cmd in (["git", "fetch", "hub"], ["git", "annex", "get", "--from", "hub", "."])
    ]
    try:
        deadline = time.monotonic() + 30
        running: list[str] = []
        while time.monotonic() < deadline:
            running = bridge.session_processes()
            if any("upload-pack" in c for c in running) and any("p2pstdio" in c for c in running):
                break
            time.sleep(0.01)
        assert running, "no transfer was under way when the daemon was stopped"
        bridge.stop(timeout=15)  # asserts exit 0 and that the socket is gone
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    proxy_repo.fsck_content()
