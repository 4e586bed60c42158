"""Hostile and broken peers: bad tokens, oversized lines, garbage, cut connections.

Each test checks the wire behaviour of the contract and then that the daemon
is still alive, still serves a fresh valid session, and that nothing in the
proxy repository is corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Address, Bridge, Expose
from tests.harness.session import RawSession, SessionClosed

pytestmark = pytest.mark.annex


@pytest.fixture
def token(bridge: Bridge) -> Address:
    return bridge.add_token("raw", "rw")


def assert_serves(bridge: Bridge, token: Address, proxy: AnnexRepo) -> None:
    """The daemon is alive and a fresh session authenticates and answers."""
    bridge.assert_alive(grace=0.2)
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy.uuid)
        assert s.version(4) == "VERSION 4"
        s.send_line("CHECKPRESENT SHA256E-s1--" + "0" * 64)
        s.expect("FAILURE")


# --- authentication ----------------------------------------------------------------


def test_wrong_token_fails_and_closes(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo
) -> None:
    with RawSession(token.socket) as s:
        s.send_line(f"AUTH {s.client_uuid} {'0' * 128}")
        assert s.read_line() == "AUTH-FAILURE"
        t0 = time.monotonic()
        s.assert_closed(timeout=8)
        delay = time.monotonic() - t0
    assert 0.3 <= delay <= 5, f"closed {delay:.2f}s after AUTH-FAILURE (want ~1 s)"
    assert_serves(bridge, token, proxy_repo)


MALFORMED_AUTH = [
    "AUTH",
    "AUTH x",
    "AUTH  ",
    "AUTH x -",
    "AUTH x tok%en",
    "AUTH x  y",
    "auth x 0123",
]


def test_malformed_auth_is_refused(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    for line in [*MALFORMED_AUTH, f"AUTH {token.token}", f"AUTH x {token.token} extra"]:
        with RawSession(token.socket) as s:
            s.send_line(line)
            try:
                reply = s.read_line(timeout=3)
            except (SessionClosed, TimeoutError):
                reply = "(no answer)"
            assert not reply.startswith("AUTH-SUCCESS"), f"{line!r} got {reply!r}"
        bridge.assert_alive()
    assert_serves(bridge, token, proxy_repo)


def test_commands_before_auth_are_not_served(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_files({"secret.txt": b"secret\n"})
    key = proxy_repo.key("secret.txt")
    for line in [f"CHECKPRESENT {key}", f"GET 0  {key}", "CONNECT git-upload-pack", "VERSION 4"]:
        with RawSession(token.socket) as s:
            s.send_line(line)
            got = b""
            with contextlib.suppress(SessionClosed, TimeoutError):
                got = s.read_line(timeout=3).encode()
            got += s.pending(wait=0.3)
            assert got == b"" or got.startswith(b"ERROR") or got.startswith(b"AUTH-FAILURE"), (
                f"{line!r} before AUTH was answered {got[:200]!r}"
            )
            assert b"secret" not in got
    assert_serves(bridge, token, proxy_repo)


def test_wrong_token_link_fails(bridge: Bridge, token: Address, client: Client) -> None:
    bad = Address.parse(f"p2p-annex::torbridge:{token.socket}:{'ab' * 64}")
    result = client.link(bad.line, "hub", check=False)
    assert result.returncode != 0, result.describe()
    assert "hub" not in client.git("remote").stdout.split()


def test_revoked_token(
    bridge: Bridge, make_client: Callable[[str], Client], proxy_repo: AnnexRepo
) -> None:
    client = make_client("alice")
    old = bridge.add_token("alice", "rw")
    client.link(old.line, "hub")
    client.add_files({"before.txt": b"before revoke\n", "after.txt": b"after revoke\n"})
    client.annex("copy", "--to", "hub", "before.txt")
    assert proxy_repo.has_key(client.key("before.txt"))

    assert "alice" in bridge.list_tokens()

    bridge.revoke("alice")
    # The running daemon refuses the revoked token at once: raw, copy, fetch, link.
    with RawSession(old.socket) as s:
        assert s.auth(old.token) == "AUTH-FAILURE"
    copy = client.annex("copy", "--to", "hub", "after.txt", check=False, timeout=60)
    assert copy.returncode != 0, copy.describe()
    assert not proxy_repo.has_key(client.key("after.txt"))
    other = make_client("mallory")
    assert other.link(old.line, "hub", check=False).returncode != 0

    # A fresh token works (linked anew: that rewrites the stored token for the address).
    new = bridge.add_token("alice2", "rw")
    client.link(new.line, "hub2")
    client.annex("copy", "--to", "hub2", "after.txt")
    assert proxy_repo.key_content(client.key("after.txt")) == b"after revoke\n"
    proxy_repo.fsck_content()


# --- framing and garbage ------------------------------------------------------------


def test_line_length_limit_is_exact(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    """32768 bytes (newline excluded) is still a line; one byte more is not."""
    limit = 32768
    with RawSession(token.socket) as s:  # before AUTH: a (wrong) token that long
        line = f"AUTH {s.client_uuid} ".encode()
        s.send_line(line + b"a" * (limit - len(line)))
        assert s.read_line() == "AUTH-FAILURE"
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_line(b"FROBNICATE " + b"x" * (limit - 11))
        s.expect("ERROR unknown command")
        assert s.version(4) == "VERSION 4"
        s.send_raw(b"FROBNICATE " + b"x" * (limit - 10) + b"\n", may_close=True)
        s.assert_closed(timeout=5)
        assert b"ERROR unknown command" not in s.pending()
    assert_serves(bridge, token, proxy_repo)


@pytest.mark.parametrize("newline", [True, False], ids=["with-newline", "no-newline"])
def test_overlong_line_before_auth(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, newline: bool
) -> None:
    with RawSession(token.socket) as s:
        data = b"AUTH " + b"x" * 40000 + (b"\n" if newline else b"")
        s.send_raw(data, may_close=True)
        s.assert_closed(timeout=5)
        assert b"AUTH-SUCCESS" not in s.pending()
    assert_serves(bridge, token, proxy_repo)


def test_overlong_line_after_auth(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_raw(b"CHECKPRESENT " + b"k" * 40000, may_close=True)
        s.assert_closed(timeout=5)
    assert_serves(bridge, token, proxy_repo)


GARBAGE = {
    "all-bytes": bytes(range(256)) + b"\n",
    "invalid-utf8": b"\xff\xfe\xfd garbage \x00\x01\x02\n",
    "blank-lines": b"\r\n\r\n\n\n",
    "nul-flood": b"\x00" * 5000,
    "binary-flood": os.urandom(20000),
}


def test_garbage_before_auth(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    """Whatever the daemon does with garbage (ERROR, close), it never serves it."""
    for name, payload in GARBAGE.items():
        with RawSession(token.socket) as s:
            s.send_raw(payload, may_close=True)
            s.is_closed(timeout=1.0)
            got = s.pending()
            for line in got.splitlines():
                assert line.startswith((b"ERROR", b"AUTH-FAILURE")), (
                    f"{name}: answered {got[:300]!r}"
                )
        bridge.assert_alive()
    assert_serves(bridge, token, proxy_repo)


def test_garbage_after_auth_is_unknown_command(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo
) -> None:
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_line(b"\xff\xfe\xfd\x01 garbage \xc3\x28")
        s.expect("ERROR unknown command")
        s.send_line("CHECKPRESENT not-a-key")
        s.expect("ERROR unknown command")
        s.send_line("GET x y z")
        s.expect("ERROR unknown command")
        s.send_line("CONNECT git-upload-archive")
        s.expect("ERROR unknown command")
        s.send_line("PUT  ../../etc/passwd")
        s.expect("ERROR unknown command")
        assert s.version(4) == "VERSION 4"
    assert_serves(bridge, token, proxy_repo)


def test_unknown_command_then_session_continues(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_files({"f.txt": b"present\n"})
    key = proxy_repo.key("f.txt")
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_line("FROBNICATE the widgets")
        s.expect("ERROR unknown command")
        s.send_line("")
        s.expect("ERROR unknown command")
        assert s.version(4) == "VERSION 4"
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")


def test_notifychange_served_on_own_endpoint_protocol_error_on_a_node(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """The proxy's own repository answers CHANGED; a proxied remote (like a
    cluster) answers ERROR protocol error and ends, as git-annex's proxy."""
    directory = tmp_path / "special"
    directory.mkdir()
    node_uuid = proxy_repo.add_proxied_special_remote(
        "sr", "type=directory", f"directory={directory}"
    )
    bridge = make_bridge(exposes=[Expose("hub", ".", 5000), Expose("sr", "sr", 5001)])
    bridge.start()
    own = bridge.add_token("own", "rw", endpoint="hub")
    node = bridge.add_token("node", "rw", endpoint="sr")
    for version in (4, 0):  # 0: as git-annex's remotedaemon sends it, with no VERSION
        with RawSession(node.socket) as s:
            s.auth(node.token, node_uuid)
            if version:
                assert s.version(version) == f"VERSION {version}"
            s.send_line("NOTIFYCHANGE")
            s.expect("ERROR protocol error")
            s.assert_closed(timeout=5)
        with RawSession(own.socket) as s:
            s.auth(own.token, proxy_repo.uuid)
            if version:
                assert s.version(version) == f"VERSION {version}"
            s.send_line("NOTIFYCHANGE")
            commit = proxy_repo.commit_git_file(f"v{version}.txt", b"changed\n", "a change")
            s.expect(f"CHANGED {commit}", timeout=60)
            s.send_line("CHECKPRESENT SHA256E-s1--" + "0" * 64)  # the session goes on
            s.expect("FAILURE")
    assert_serves(bridge, own, proxy_repo)


def test_version_0_session(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    """No VERSION: v0, as git-remote-p2p-annex speaks it. No VALID after DATA."""
    content = b"version zero\n"
    proxy_repo.add_files({"v0.txt": content})
    key = proxy_repo.key("v0.txt")
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")
        s.send_line("CHECKPRESENT SHA256E-s3--" + "1" * 64)
        s.expect("FAILURE")
        s.send_line(f"GET 0 v0.txt {key}")
        assert s.read_data() == content
        s.send_line("SUCCESS")
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")  # not VALID: no v1 messages in a v0 session


def test_connect_storm(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    """Many peers that connect and vanish (at once, mid-line, mid-AUTH)."""
    for i in range(30):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(token.socket))
        if i % 3 == 1:
            s.sendall(b"AUTH 1234")
        elif i % 3 == 2:
            s.sendall(f"AUTH {'0' * 36} {token.token}\nVERSION 4\nGET 0  ".encode())
        s.close()
    assert_serves(bridge, token, proxy_repo)


# --- cut transfers ---------------------------------------------------------------------

PART_SIZE = 1024 * 1024


@pytest.fixture
def upload(client: Client) -> tuple[Client, str, bytes]:
    """A client with a 1 MiB annexed file that the proxy does not have."""
    content = os.urandom(PART_SIZE)
    client.add_files({"upload.bin": content})
    return client, client.key("upload.bin"), content


def cut_put(token: Address, proxy: AnnexRepo, key: str, content: bytes) -> int:
    """PUT, send DATA n and only half of the bytes, close. Returns the half."""
    half = len(content) // 2
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy.uuid)
        assert s.version(4) == "VERSION 4"
        s.send_line(f"PUT  {key}")
        s.expect("PUT-FROM 0")
        s.send_raw(b"DATA %d\n" % len(content) + content[:half])
        time.sleep(0.2)
        s.sock.shutdown(socket.SHUT_WR)
    return half


def wait_partial(proxy: AnnexRepo, key: str, size: int, timeout: float = 10) -> int:
    """Wait for the proxy's partial file of ``key`` to reach ``size``; its last size."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        sizes = [v for k, v in proxy.tmp_files().items() if key in k]
        seen = max(sizes, default=-1)
        if seen == size:
            time.sleep(0.5)  # let the server side of the cut session finish
            return seen
        time.sleep(0.1)
    return seen


def test_put_cut_mid_data_then_real_copy(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, upload: tuple[Client, str, bytes]
) -> None:
    client, key, content = upload
    client.link(token.line, "hub")
    cut_put(token, proxy_repo, key, content)
    assert_serves(bridge, token, proxy_repo)
    assert not proxy_repo.has_key(key)
    proxy_repo.fsck_content()

    client.annex("copy", "--to", "hub", "upload.bin", timeout=60)
    assert proxy_repo.key_content(key) == content
    proxy_repo.fsck_content()
    client.annex("fsck", "--from", "hub", "upload.bin")


def test_put_cut_mid_data_resumes(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, upload: tuple[Client, str, bytes]
) -> None:
    """The partial upload is kept: the next PUT answers PUT-FROM <what arrived>."""
    _client, key, content = upload
    half = cut_put(token, proxy_repo, key, content)
    seen = wait_partial(proxy_repo, key, half)
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        assert s.version(4) == "VERSION 4"
        s.send_line(f"PUT  {key}")
        reply = s.read_line()
        assert reply == f"PUT-FROM {half}", (
            f"resume offset: got {reply!r}, want PUT-FROM {half} "
            f"(partial file in the proxy: {seen} bytes)"
        )
        s.send_data(content[half:])
        s.send_line("VALID")
        s.expect("SUCCESS", timeout=30)
    assert proxy_repo.key_content(key) == content
    proxy_repo.fsck_content()


def test_get_cut_mid_body(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, client: Client
) -> None:
    content = os.urandom(8 * 1024 * 1024)  # far more than the socket buffers hold
    proxy_repo.add_files({"download.bin": content})
    key = proxy_repo.key("download.bin")
    for _ in range(2):
        with RawSession(token.socket) as s:
            s.auth(token.token, proxy_repo.uuid)
            assert s.version(4) == "VERSION 4"
            s.send_line(f"GET 0  {key}")
            s.expect(f"DATA {len(content)}")
            assert s.read_exact(64 * 1024) == content[: 64 * 1024]
        # closed here with most of the body unread
    assert_serves(bridge, token, proxy_repo)

    # A complete GET on a new session is intact.
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        assert s.version(4) == "VERSION 4"
        s.send_line(f"GET 0  {key}")
        assert s.read_data(timeout=60) == content
        s.expect("VALID")
        s.send_line("SUCCESS")
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")
    assert proxy_repo.key_content(key) == content
    proxy_repo.fsck_content()

    # And so is one with the real client.
    client.link(token.line, "hub")
    client.git("pull", "hub", "main", timeout=60)
    client.git("fetch", "hub", timeout=60)  # hub/git-annex: where the content is
    client.annex("get", "--from", "hub", "download.bin", timeout=60)
    assert client.read("download.bin") == content


# --- real clients that die mid-way -------------------------------------------------------


def start(client: Client, *args: str) -> subprocess.Popen[bytes]:
    """A client command in the background, in its own process group."""
    return subprocess.Popen(
        list(args),
        cwd=client.path,
        env=client.env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def test_real_copy_killed_midway_resumes(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    """Kill ``git annex copy`` mid-upload; the next copy resumes from the partial file."""
    size = 64 * 1024 * 1024
    content = os.urandom(size)
    rw_client.add_files({"big.bin": content})
    key = rw_client.key("big.bin")
    partial = proxy_repo.path / ".git" / "annex" / "tmp" / key

    proc = start(rw_client, "git", "annex", "copy", "--to", "hub", "big.bin")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_size > 0:
                    os.killpg(proc.pid, signal.SIGSTOP)  # freeze client and transport
                    break
            time.sleep(0.001)
    finally:
        kill_group(proc)
    got = partial.stat().st_size if partial.exists() else 0
    assert 0 < got < size, f"could not catch the upload mid-way (partial: {got} bytes)"
    assert bridge.wait_idle(15) == [], "the cut session's helpers did not exit"
    assert not proxy_repo.has_key(key)

    again = rw_client.annex("copy", "--to", "hub", "big.bin", "--debug", timeout=120)
    offsets = [int(m) for m in re.findall(r"P2P < PUT-FROM (\d+)", again.output)]
    assert offsets and offsets[0] > 0, f"did not resume: PUT-FROM {offsets}"
    assert hashlib.sha256(proxy_repo.key_content(key)).digest() == hashlib.sha256(content).digest()
    proxy_repo.fsck_content()


def test_real_fetch_killed_midway(bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """Kill ``git fetch`` during CONNECT; git's server side must go away, the daemon stays."""
    blob = os.urandom(12 * 1024 * 1024).hex().encode()  # ~24 MiB of loose git object
    sha = proxy_repo.commit_git_file("big.txt", blob, "big commit")
    proc = start(rw_client, "git", "fetch", "hub")
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any("upload-pack" in cmd for cmd in bridge.session_processes()):
                time.sleep(0.2)
                break
            time.sleep(0.01)
    finally:
        kill_group(proc)
    assert bridge.wait_idle(15) == [], "git upload-pack outlived the cut connection"
    bridge.assert_alive(grace=1.0)

    rw_client.git("fetch", "hub", timeout=120)
    assert rw_client.git("rev-parse", "hub/main").stdout.strip() == sha
    assert rw_client.git("show", "hub/main:big.txt").stdout_bytes == blob
    rw_client.git("fsck", "--no-dangling", "--no-progress")


def test_real_push_killed_midway(bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """Kill ``git push`` during CONNECT: no half-updated branch, the daemon stays."""
    blob = os.urandom(12 * 1024 * 1024).hex().encode()
    sha = rw_client.commit_git_file("big.txt", blob, "big commit")
    proc = start(rw_client, "git", "push", "hub", "main:synced/main")
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any("receive-pack" in cmd for cmd in bridge.session_processes()):
                time.sleep(0.3)
                break
            time.sleep(0.01)
    finally:
        kill_group(proc)
    assert bridge.wait_idle(15) == [], "git receive-pack outlived the cut connection"
    bridge.assert_alive(grace=1.0)
    pushed = proxy_repo.git("rev-parse", "--verify", "-q", "synced/main", check=False)
    assert not pushed.ok or pushed.stdout.strip() == sha, "branch points at garbage"
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")

    rw_client.git("push", "hub", "main:synced/main", timeout=120)
    assert proxy_repo.git("rev-parse", "synced/main").stdout.strip() == sha
    assert proxy_repo.git("show", "synced/main:big.txt").stdout_bytes == blob


def test_real_get_killed_midway_resumes(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    """Kill ``git annex get`` mid-download; the daemon stays, the next get resumes."""
    size = 64 * 1024 * 1024
    content = os.urandom(size)
    proxy_repo.add_files({"big.bin": content})
    rw_client.git("pull", "hub", "main", timeout=60)
    rw_client.git("fetch", "hub", timeout=60)
    key = rw_client.key("big.bin")
    partial = rw_client.path / ".git" / "annex" / "tmp" / key

    proc = start(rw_client, "git", "annex", "get", "--from", "hub", "big.bin")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_size > 0:
                    os.killpg(proc.pid, signal.SIGSTOP)
                    break
            time.sleep(0.001)
    finally:
        kill_group(proc)
    got = partial.stat().st_size if partial.exists() else 0
    assert 0 < got < size, f"could not catch the download mid-way (partial: {got} bytes)"
    assert bridge.wait_idle(15) == [], "the cut session's helpers did not exit"
    bridge.assert_alive(grace=1.0)

    again = rw_client.annex("get", "--from", "hub", "big.bin", "--debug", timeout=120)
    offsets = [int(m) for m in re.findall(r"P2P > GET (\d+) ", again.output)]
    assert offsets and offsets[0] > 0, f"did not resume: GET {offsets}"
    assert hashlib.sha256(rw_client.read("big.bin")).digest() == hashlib.sha256(content).digest()
    proxy_repo.fsck_content()


def test_keys_that_look_like_paths_stay_inside(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """Keys naming other places: refused, or stored inside ``.git/annex`` and nowhere else."""
    target = tmp_path / "escaped"
    up = os.path.relpath(target, proxy_repo.path / ".git" / "annex" / "objects" / "aa" / "bb")
    before = sorted(p.name for p in tmp_path.iterdir())
    for key in [
        f"WORM-s5-m0--{up}",
        f"WORM-s5-m0--{target}",
        "WORM-s5-m0--..",
        f"WORM-s5-m0--{'../' * 20}tmp",
    ]:
        with RawSession(token.socket) as s:
            s.auth(token.token, proxy_repo.uuid)
            assert s.version(4) == "VERSION 4"
            s.send_line(f"PUT  {key}")
            reply = s.read_line()
            if reply == "ERROR unknown command":
                continue  # strict key validation: fine
            assert reply == "PUT-FROM 0", f"{key!r}: {reply!r}"
            s.send_data(b"hello")
            s.send_line("VALID")
            s.expect("SUCCESS")
        stored = proxy_repo.content_path(key)
        assert stored is not None
        assert stored.resolve().is_relative_to((proxy_repo.path / ".git" / "annex").resolve())
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    proxy_repo.fsck_content()
