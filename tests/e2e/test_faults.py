"""The bridge killed mid-transfer and restarted; the proxy's disk full; CONNECT faults.

After each: nothing stored that fails fsck, the client's transfer fails
cleanly, and the next session is served (and resumes where it can).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.process import descendants, wait_for

pytestmark = pytest.mark.annex

BIG = 120 * 1024 * 1024


def _copy_in_background(client: Client, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["git", "annex", "copy", "--to", "hub", name],
        cwd=client.path,
        env=client.env.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_partial(repo: AnnexRepo, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sizes = [s for s in repo.tmp_files().values() if s > 0]
        if sizes:
            return max(sizes)
        time.sleep(0.02)
    raise AssertionError("no partial upload appeared in the proxy repository")


def test_bridge_killed_mid_put_then_restarted(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    rw_client.add_file("big.bin", os.urandom(BIG))
    key = rw_client.key("big.bin")
    copy = _copy_in_background(rw_client, "big.bin")
    try:
        _wait_for_partial(proxy_repo)
        # SIGKILL: no cleanup at all, as in a crash or an OOM kill.
        assert bridge.proc is not None
        os.killpg(bridge.proc.pid, signal.SIGKILL)
        bridge.proc.wait(timeout=10)
        assert copy.wait(timeout=60) != 0  # the client's transfer failed cleanly
    finally:
        if copy.poll() is None:
            copy.kill()
    assert not proxy_repo.has_key(key)  # nothing half-stored as content
    proxy_repo.fsck_content()

    partial = max(proxy_repo.tmp_files().values(), default=0)
    assert partial > 0, "no partial upload kept"

    bridge.proc = None
    bridge.start()  # the stale socket left by the crash does not block a restart
    again = rw_client.annex("copy", "--to", "hub", "big.bin", "--debug", timeout=180)
    # It resumes: the proxy asks for the rest only (git-annex may have
    # verified and trimmed its partial file, so not necessarily from its size).
    offsets = [int(o) for o in re.findall(r"P2P < PUT-FROM (\d+)", again.output)]
    assert offsets and 0 < offsets[0] <= partial, f"PUT-FROM {offsets}, partial {partial}"
    print(f"bridge killed mid-PUT: resumed at byte {offsets[0]} of {BIG}")
    assert proxy_repo.key_content(key) == rw_client.read("big.bin")
    proxy_repo.fsck_content()


def test_bridge_killed_mid_get_then_restarted(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_file("big.bin", os.urandom(BIG))
    rw_client.git("fetch", "-q", "hub")
    rw_client.git("merge", "-q", "hub/main")
    get = subprocess.Popen(
        ["git", "annex", "get", "--from", "hub", "big.bin"],
        cwd=rw_client.path,
        env=rw_client.env.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_partial(rw_client)
        assert bridge.proc is not None
        os.killpg(bridge.proc.pid, signal.SIGKILL)
        bridge.proc.wait(timeout=10)
        assert get.wait(timeout=60) != 0
    finally:
        if get.poll() is None:
            get.kill()
    key = rw_client.key("big.bin")
    assert not rw_client.has_key(key)
    partial = max(rw_client.tmp_files().values(), default=0)
    assert partial > 0, "no partial download kept"
    bridge.proc = None
    bridge.start()
    again = rw_client.annex("get", "--from", "hub", "big.bin", "--debug", timeout=180)
    offsets = [int(o) for o in re.findall(r"P2P > GET (\d+) ", again.output)]
    assert offsets and 0 < offsets[0] <= partial, f"GET {offsets}, partial {partial}"
    print(f"bridge killed mid-GET: resumed at byte {offsets[0]} of {BIG}")
    assert rw_client.read("big.bin") == proxy_repo.key_content(key)
    rw_client.fsck_content()
    proxy_repo.fsck_content()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs (root only): the proxy repository will live on it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", str(mountpoint)],
        check=True,
        timeout=30,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=30)


def test_proxy_disk_full(
    annex_env: AnnexEnv,
    small_disk: Path,
    make_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    tmp_path: Path,
) -> None:
    full_repo = AnnexRepo.create(annex_env, small_disk / "proxy", "proxy on a small disk")
    bridge = make_bridge()
    bridge.repository = full_repo.path
    bridge.write_config()
    bridge.start()
    client = make_client("client")
    client.link(bridge.add_token("client", "rw").line, "hub")
    client.add_files({"huge.bin": os.urandom(64 * 1024 * 1024), "small.txt": b"fits\n"})

    result = client.annex("copy", "--to", "hub", "huge.bin", check=False, timeout=180)
    assert not result.ok  # refused or failed: never "ok"
    assert not full_repo.has_key(client.key("huge.bin"))
    full_repo.fsck_content()
    # Whatever git-annex left in tmp is cleaned up by git-annex; the bridge
    # serves the next request in a new session.
    for name in full_repo.tmp_files():
        (full_repo.path / ".git" / "annex" / "tmp" / name).unlink()
    client.annex("copy", "--to", "hub", "small.txt", timeout=60)
    assert full_repo.key_content(client.key("small.txt")) == b"fits\n"
    bridge.assert_alive()


# --- CONNECT (git fetch / git push through the bridge) ------------------------------------
#
# The bridge runs git upload-pack / receive-pack in the proxy's own
# repository for CONNECT (server/gitservice.py). A client that freezes must
# not hold that git, or its session, past its deadline: stall_timeout once it
# stops reading, idle_timeout when it stops sending (a client is silent, too,
# while its own git packs a big push: that is not cut at stall_timeout); a git
# that dies must give the client a failure, not a hang, and leave the
# repository sound.

STALL = 3.0  # stall_timeout (and idle_timeout) of the daemon in the stall tests
GIT_BLOB = 12 * 1024 * 1024  # random bytes, committed as ~24 MiB of hex: a pack of ~13 MiB


def _start_git(client: Client, *args: str) -> subprocess.Popen[bytes]:
    """``git ARGS`` in the background, in its own process group (with its helpers).

    With ``unpackLimit=1`` git keeps the incoming pack as a pack (index-pack,
    a ``tmp_pack_*`` file growing as it arrives), not loose objects written
    at the end: so a test can see the transfer under way.
    """
    return subprocess.Popen(
        ["git", "-c", "transfer.unpackLimit=1", *args],
        cwd=client.path,
        env=client.env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> str:
    """SIGKILL the command's whole group (thawing it first); its output."""
    for sig in (signal.SIGKILL, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")


def _incoming_pack(repo: AnnexRepo) -> int:
    """Bytes of the packs git is receiving into ``repo`` right now (fetch or push)."""
    objects = repo.path / ".git" / "objects"
    total = 0
    for pattern in (
        "pack/tmp_pack_*",
        "tmp_objdir-incoming-*/pack/tmp_pack_*",
        "tmp_objdir-incoming-*/??/*",
    ):
        for p in objects.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
    return total


def _helpers(bridge: Bridge) -> list[tuple[int, str]]:
    """Every process the daemon runs (git, its children, git-annex-shell)."""
    assert bridge.proc is not None
    return descendants(bridge.proc.pid)


def _git_service_pid(bridge: Bridge, service: str) -> int | None:
    for pid, cmd in _helpers(bridge):
        if cmd.startswith(f"git {service} "):
            return pid
    return None


def _sessions(bridge: Bridge) -> list[object]:
    sessions = json.loads(bridge.cli("status", "--json").stdout)["sessions"]
    assert isinstance(sessions, list)
    return sessions


def _refs(repo: AnnexRepo) -> str:
    return repo.git("for-each-ref", "--format=%(objectname) %(refname)").stdout


@pytest.fixture
def stall_bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    b = make_bridge()
    b.set_limits(stall_timeout=STALL)
    b.start()
    return b


def _assert_session_ended(bridge: Bridge, service: str, stopped_at: float, why: str) -> float:
    """The frozen client's session ends at its deadline: git, session and slot gone."""
    wait_for(
        f"{service} and its session ending after the client froze",
        lambda: not _helpers(bridge) and not _sessions(bridge),
        timeout=STALL + 30,
        interval=0.1,
    )
    took = time.monotonic() - stopped_at
    bridge.assert_alive()
    assert f"{service} {why} {STALL:.0f}s" in bridge.log(), bridge.log()[-3000:]
    return took


def test_fetch_client_stalled_mid_transfer(
    stall_bridge: Bridge, make_client: Callable[[str], Client], proxy_repo: AnnexRepo
) -> None:
    """``git fetch`` frozen (SIGSTOP) while the pack arrives: cut at stall_timeout."""
    client = make_client("client")
    client.link(stall_bridge.add_token("client", "rw").line, "hub")
    blob = os.urandom(GIT_BLOB).hex().encode()
    sha = proxy_repo.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proc = _start_git(client, "fetch", "hub")
    try:
        stopped_at = _freeze_mid_pack(proc, client)
        got = _incoming_pack(client)
        took = _assert_session_ended(
            stall_bridge, "upload-pack", stopped_at, "client not reading for"
        )
        print(
            f"fetch frozen after {got} bytes of the pack; session ended {took:.1f}s later "
            f"(stall_timeout {STALL:.0f}s)"
        )
    finally:
        _kill_group(proc)
    assert _refs(proxy_repo) == proxy_refs
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")

    client.git("fetch", "hub", timeout=120)  # the next session is served
    assert client.git("rev-parse", "hub/main").stdout.strip() == sha
    assert client.git("show", "hub/main:big.txt").stdout_bytes == blob
    client.git("fsck", "--no-dangling", "--no-progress")


def test_push_client_stalled_mid_transfer(
    make_bridge: Callable[..., Bridge], make_client: Callable[[str], Client], proxy_repo: AnnexRepo
) -> None:
    """``git push`` frozen while its pack is sent: cut at idle_timeout, refs unchanged.

    The frozen client sends nothing: that is client silence, as while its git
    packs, so idle_timeout cuts it, not stall_timeout (the bridge is not
    blocked sending to it).
    """
    stall_bridge = make_bridge()
    stall_bridge.set_limits(stall_timeout=STALL, idle_timeout=STALL)
    stall_bridge.start()
    client = make_client("client")
    client.link(stall_bridge.add_token("client", "rw").line, "hub")
    blob = os.urandom(GIT_BLOB).hex().encode()
    sha = client.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proxy_repo.git("config", "receive.unpackLimit", "1")  # see _start_git
    # Packed fast: the client's packing is silence that idle_timeout (STALL here) cuts.
    proc = _start_git(client, "-c", "pack.compression=0", "push", "hub", "main:synced/main")
    try:
        stopped_at = _freeze_mid_pack(proc, proxy_repo)
        took = _assert_session_ended(stall_bridge, "receive-pack", stopped_at, "idle for")
        print(f"push frozen; session ended {took:.1f}s later (idle_timeout {STALL:.0f}s)")
    finally:
        _kill_group(proc)
    assert _refs(proxy_repo) == proxy_refs, "a cut push changed the proxy's refs"
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")
    # The next push, with the default deadlines: however long the client packs.
    stall_bridge.stop()
    stall_bridge.write_config()
    stall_bridge.start()

    client.git("push", "hub", "main:synced/main", timeout=120)
    assert proxy_repo.git("rev-parse", "synced/main").stdout.strip() == sha
    assert proxy_repo.git("show", "synced/main:big.txt").stdout_bytes == blob
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")


def _freeze_mid_pack(proc: subprocess.Popen[bytes], receiving: AnnexRepo) -> float:
    """SIGSTOP the client's git once ``receiving`` gets the pack; when it stopped."""
    wait_for(
        "the pack arriving",
        lambda: _incoming_pack(receiving) > 0 or proc.poll() is not None,
        timeout=60,
    )
    os.killpg(proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    assert proc.poll() is None, "git finished before it could be frozen mid-pack"
    return stopped_at


def _kill_service_mid_pack(
    bridge: Bridge, proc: subprocess.Popen[bytes], service: str, receiving: AnnexRepo
) -> None:
    """SIGKILL the bridge's git ``service`` once ``receiving`` gets the pack; the
    client's git must fail, saying why, and its session end."""
    try:
        # Freeze the client so that the kill lands mid-pack, however fast the machine.
        _freeze_mid_pack(proc, receiving)
        pid = _git_service_pid(bridge, service)
        assert pid is not None, _helpers(bridge)
        os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    output = out.decode(errors="replace")
    print(f"git exit {proc.returncode} after {service} was killed:\n{output}")
    assert proc.returncode != 0, output
    # Told why, in git's own words ("remote: ..."), not left waiting for the rest.
    assert f"torbridge: git {service} was killed by signal 9" in output, output
    wait_for("the session ending", lambda: not _helpers(bridge) and not _sessions(bridge), 30, 0.1)
    bridge.assert_alive()


def test_upload_pack_killed_mid_fetch(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    """The bridge's ``git upload-pack`` SIGKILLed mid-pack: the fetch fails, and says so."""
    blob = os.urandom(GIT_BLOB).hex().encode()
    sha = proxy_repo.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proc = _start_git(rw_client, "fetch", "hub")
    _kill_service_mid_pack(bridge, proc, "upload-pack", rw_client)
    assert rw_client.git("rev-parse", "--verify", "-q", "hub/main", check=False).stdout == ""
    assert _refs(proxy_repo) == proxy_refs
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")
    rw_client.git("fsck", "--no-dangling", "--no-progress")

    rw_client.git("fetch", "hub", timeout=120)
    assert rw_client.git("show", f"{sha}:big.txt").stdout_bytes == blob


def test_receive_pack_killed_mid_push(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    """The bridge's ``git receive-pack`` SIGKILLed mid-push: a failure, the refs unchanged."""
    blob = os.urandom(GIT_BLOB).hex().encode()
    sha = rw_client.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proxy_repo.git("config", "receive.unpackLimit", "1")  # see _start_git
    proc = _start_git(rw_client, "push", "hub", "main:synced/main")
    _kill_service_mid_pack(bridge, proc, "receive-pack", proxy_repo)
    assert _refs(proxy_repo) == proxy_refs, "a killed push changed the proxy's refs"
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")

    rw_client.git("push", "hub", "main:synced/main", timeout=120)
    assert proxy_repo.git("rev-parse", "synced/main").stdout.strip() == sha
    assert proxy_repo.git("show", "synced/main:big.txt").stdout_bytes == blob
