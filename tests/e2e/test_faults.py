"""The bridge killed mid-transfer and restarted; the proxy's disk full.

After each: nothing stored that fails fsck, the client's transfer fails
cleanly, and the next session is served (and resumes where it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import AnnexEnv, AnnexRepo, Bridge, Client

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

    bridge.proc = None
    bridge.start()  # the stale socket left by the crash does not block a restart
    rw_client.annex("copy", "--to", "hub", "big.bin", timeout=180)
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
    bridge.proc = None
    bridge.start()
    rw_client.annex("get", "--from", "hub", "big.bin", timeout=180)
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
        check=True, timeout=30,
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
