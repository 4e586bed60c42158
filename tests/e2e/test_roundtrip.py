"""Content and git round trips through torbridge with the stock git-annex client."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge

pytestmark = pytest.mark.annex

FILES: dict[str, bytes] = {
    "plain.txt": b"plain content\n",
    "with space in name.txt": b"spaces are fine\n" * 100,
    "ünïcødé ✓ файл.bin": os.urandom(70_000),  # more than one 64 KiB read
    "sub dir/nested 100%.dat": bytes(range(256)) * 1000,
    "empty": b"",
}


def assert_files(repo: AnnexRepo, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        got = repo.read(name)
        assert got == content, f"{name}: content differs ({len(got)} vs {len(content)} bytes)"


def test_copy_drop_get_fsck_drop_from(
    rw_client: Client, proxy_repo: AnnexRepo, bridge: Bridge
) -> None:
    client = rw_client
    client.add_files(FILES)
    keys = {name: client.key(name) for name in FILES}

    client.annex("copy", "--to", "hub", ".")
    for name, key in keys.items():
        assert proxy_repo.key_content(key) == FILES[name], f"proxy copy of {name} differs"
    whereis = client.annex("whereis", "--", "ünïcødé ✓ файл.bin").stdout
    assert "hub" in whereis and proxy_repo.uuid in whereis, whereis
    proxy_repo.fsck_content()

    # Drop locally, with the proxy as proof (LOCKCONTENT), then get it back.
    client.annex("drop", ".")
    assert client.present_here() == set()
    client.annex("get", "--from", "hub", ".")
    assert client.present_here() == set(FILES)
    assert_files(client, FILES)

    # fsck --from downloads everything again and checks it.
    fsck = client.annex("fsck", "--from", "hub", ".")
    assert "failed" not in fsck.output, fsck.describe()

    client.annex("drop", "--from", "hub", ".")
    for name, key in keys.items():
        assert not proxy_repo.has_key(key), f"{name} still in the proxy after drop --from"
    assert "hub" not in client.annex("whereis", "--", "plain.txt").stdout
    proxy_repo.fsck_content()
    assert_files(client, FILES)
    bridge.assert_alive()


def test_large_file(rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """100 MiB up and down, checked byte for byte (by hash) at both ends."""
    client = rw_client
    content = os.urandom(100 * 1024 * 1024)
    digest = hashlib.sha256(content).hexdigest()
    client.add_file("big.bin", content)
    del content
    key = client.key("big.bin")

    t0 = time.monotonic()
    client.annex("copy", "--to", "hub", "big.bin", timeout=180)
    up = time.monotonic() - t0
    path = proxy_repo.content_path(key)
    assert path is not None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

    client.annex("drop", "big.bin")
    t0 = time.monotonic()
    client.annex("get", "--from", "hub", "big.bin", timeout=180)
    down = time.monotonic() - t0
    assert hashlib.sha256(client.read("big.bin")).hexdigest() == digest
    print(f"100 MiB: copy --to {up:.1f}s, get {down:.1f}s")
    proxy_repo.fsck_content(timeout=180)


def test_push_reaches_proxy(rw_client: Client, proxy_repo: AnnexRepo) -> None:
    client = rw_client
    client.add_files({"pushed file.txt": b"pushed\n"}, "a commit to push")
    head = client.git("rev-parse", "HEAD").stdout.strip()
    client.git("push", "hub", "main:synced/main", timeout=60)
    assert proxy_repo.git("rev-parse", "synced/main").stdout.strip() == head
    log = proxy_repo.git("log", "--format=%s", "synced/main").stdout
    assert "a commit to push" in log
    # The pushed tree is intact in the proxy's object store.
    assert proxy_repo.git("fsck", "--no-dangling").ok
    # A second push with new commits goes through too (a fresh connection).
    client.add_files({"second.txt": b"two\n"}, "second push")
    client.git("push", "hub", "main:synced/main", timeout=60)
    assert (
        proxy_repo.git("rev-parse", "synced/main").stdout.strip()
        == client.git("rev-parse", "HEAD").stdout.strip()
    )
    # And the git-annex branch (location log) can be pushed as well.
    client.git("push", "hub", "git-annex:synced/git-annex", timeout=60)
    assert proxy_repo.git("rev-parse", "--verify", "synced/git-annex").ok


def test_fetch_and_pull_from_proxy(rw_client: Client, proxy_repo: AnnexRepo) -> None:
    client = rw_client
    proxy_repo.commit_git_file("from proxy.txt", b"made in the proxy\n", "proxy commit")
    proxy_repo.add_files({"annexed in proxy.bin": b"annexed\n" * 10}, "proxy annexed")
    proxy_head = proxy_repo.git("rev-parse", "HEAD").stdout.strip()

    client.git("fetch", "hub", timeout=60)
    assert client.git("rev-parse", "hub/main").stdout.strip() == proxy_head
    # The client's main is unborn: pull fast-forwards it to the proxy's main.
    client.git("pull", "hub", "main", timeout=60)
    assert client.git("rev-parse", "HEAD").stdout.strip() == proxy_head
    assert client.read("from proxy.txt") == b"made in the proxy\n"
    # The annexed file's content comes through the bridge as well.
    client.annex("get", "--from", "hub", "annexed in proxy.bin")
    assert client.read("annexed in proxy.bin") == b"annexed\n" * 10


def test_many_fetches_with_new_objects(rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """30 fetches in a row, each bringing new objects: none may lose pack data."""
    client = rw_client
    for i in range(30):
        # A few KiB of fresh, incompressible content makes a real pack each time.
        content = f"round {i}\n".encode() + os.urandom(8192).hex().encode()
        sha = proxy_repo.commit_git_file(f"round-{i:02d}.txt", content, f"round {i}")
        result = client.git("fetch", "hub", timeout=60)
        assert client.git("rev-parse", "hub/main").stdout.strip() == sha, (
            f"fetch {i} did not bring {sha}:\n{result.describe()}"
        )
        got = client.git("show", f"hub/main:round-{i:02d}.txt").stdout_bytes
        assert got == content, f"fetch {i}: file content differs"
    client.git("fsck", "--no-dangling")


def test_two_clients_share_content(
    rw_client: Client, bridge: Bridge, make_client: Callable[[str], Client]
) -> None:
    """One client uploads and pushes, another pulls and downloads through the proxy."""
    alice = rw_client
    alice.add_files({"shared ✓.txt": b"shared content\n"}, "alice's file")
    alice.annex("copy", "--to", "hub", ".")
    alice.git("push", "hub", "main:main-from-alice", timeout=60)

    bob = make_client("bob")
    bob.link(bridge.add_token("bob", "ro").line, "hub")
    bob.git("pull", "hub", "main-from-alice", timeout=60)
    bob.git("fetch", "hub", timeout=60)  # hub/git-annex: where the content is
    bob.annex("get", "--from", "hub", ".")
    assert bob.read("shared ✓.txt") == b"shared content\n"


def test_big_git_objects_both_ways(rw_client: Client, proxy_repo: AnnexRepo) -> None:
    """Packs of several MiB through CONNECT, in both directions."""
    up = os.urandom(3 * 1024 * 1024)
    rw_client.commit_git_file("big up.bin", up, "big upload")
    rw_client.git("push", "hub", "main:synced/main", timeout=120)
    assert proxy_repo.git("show", "synced/main:big up.bin").stdout_bytes == up

    down = os.urandom(3 * 1024 * 1024)
    sha = proxy_repo.commit_git_file("big down.bin", down, "big download")
    rw_client.git("fetch", "hub", timeout=120)
    assert rw_client.git("rev-parse", "hub/main").stdout.strip() == sha
    assert rw_client.git("show", "hub/main:big down.bin").stdout_bytes == down
    rw_client.git("fsck", "--no-dangling", "--no-progress")
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")


def test_sync_content(
    rw_client: Client, bridge: Bridge, proxy_repo: AnnexRepo, make_client: Callable[[str], Client]
) -> None:
    """``git annex sync --content``: git and content through one remote, two clients."""
    alice = rw_client
    files = {"synced ✓.txt": b"synced\n", "data/синх.bin": os.urandom(50_000)}
    alice.add_files(files, "alice adds")
    alice.annex("sync", "--content", "hub", timeout=120)
    for name, content in files.items():
        assert proxy_repo.key_content(alice.key(name)) == content, name
    assert proxy_repo.git("rev-parse", "--verify", "synced/main").ok

    bob = make_client("bob")
    bob.link(bridge.add_token("bob", "rw").line, "hub")
    bob.annex("sync", "--content", "hub", timeout=120)
    for name, content in files.items():
        assert bob.read(name) == content, name
    proxy_repo.fsck_content()
