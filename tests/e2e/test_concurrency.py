"""Several transfers at once: parallel jobs of one client, several clients."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.process import Result

pytestmark = pytest.mark.annex


def some_files(prefix: str, small: int, large: int) -> dict[str, bytes]:
    files = {f"{prefix} small {i:02d}.txt": os.urandom(100 + i * 37) for i in range(small)}
    files.update({f"{prefix} large {i}.bin": os.urandom(1_500_000) for i in range(large)})
    return files


def test_parallel_jobs(rw_client: Client, proxy_repo: AnnexRepo, bridge: Bridge) -> None:
    """``-J4``: four sessions at once, interleaved on the daemon."""
    files = some_files("j", 16, 2)
    rw_client.add_files(files)
    rw_client.annex("copy", "--to", "hub", "-J4", ".", timeout=180)
    for name, content in files.items():
        assert proxy_repo.key_content(rw_client.key(name)) == content, name
    rw_client.annex("drop", "-J4", ".", timeout=180)
    assert rw_client.present_here() == set()
    rw_client.annex("get", "--from", "hub", "-J4", ".", timeout=180)
    for name, content in files.items():
        assert rw_client.read(name) == content, name
    proxy_repo.fsck_content()
    bridge.assert_alive()


def test_clients_at_once(
    bridge: Bridge, proxy_repo: AnnexRepo, make_client: Callable[[str], Client]
) -> None:
    """Three clients upload, fetch and push at the same time."""
    clients = [make_client(f"c{i}") for i in range(3)]
    files = {c.path.name: some_files(c.path.name, 6, 1) for c in clients}
    for c in clients:
        c.link(bridge.add_token(c.path.name, "rw").line, "hub")
        c.add_files(files[c.path.name])

    def work(c: Client) -> list[Result]:
        return [
            c.annex("copy", "--to", "hub", ".", timeout=180),
            c.git("push", "hub", f"main:from-{c.path.name}", timeout=60),
            c.git("fetch", "hub", timeout=60),
        ]

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(work, clients))  # re-raises the first CommandError

    for c in clients:
        for name, content in files[c.path.name].items():
            assert proxy_repo.key_content(c.key(name)) == content, name
        head = c.git("rev-parse", "HEAD").stdout.strip()
        assert proxy_repo.git("rev-parse", f"from-{c.path.name}").stdout.strip() == head
    proxy_repo.fsck_content()
    bridge.assert_alive()
