"""CONNECT when the client vanishes: git is let finish, as git-annex lets it (issue 11, item 6).

When a client leaves mid-CONNECT the bridge closes git's pipes and waits for
``receive-pack`` / ``upload-pack``: git reads EOF, its next write fails, and
it stops on its own, removing what it holds (ref ``.lock`` files, incoming
objects). It is killed only if it is still running after a grace period
(server/gitservice.py, ``end_git``). The stock client's ``git push`` is
killed (SIGKILL, its whole process group) mid-way; then the proxy
repository holds no lock or temporary file, its refs are sound, and the
next ``git push`` succeeds with no cleanup.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.e2e.test_faults import (
    GIT_BLOB,
    _helpers,
    _incoming_pack,
    _kill_group,
    _refs,
    _sessions,
    _start_git,
)
from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.process import wait_for
from torbridge.server.gitservice import GIT_EXIT_GRACE

pytestmark = pytest.mark.annex


def locks(repo: AnnexRepo) -> list[str]:
    """git's lock files in ``repo``: what a git killed mid-update leaves, failing later pushes."""
    git_dir = repo.path / ".git"
    return sorted(str(p.relative_to(git_dir)) for p in git_dir.rglob("*.lock"))


def git_left_alone(bridge: Bridge, service: str = "receive-pack") -> str:
    """The session ends once git has ended on its own, never killed; how it ended."""
    wait_for(
        "git and its session ending after the client was killed",
        lambda: not _helpers(bridge) and not _sessions(bridge),
        GIT_EXIT_GRACE + 30,
        0.1,
    )
    bridge.assert_alive()
    log = bridge.log()
    assert "after its pipes were closed: killed" not in log, log[-3000:]
    ended = re.search(rf"git {service} (.*) after its client left", log)
    assert ended is not None, log[-3000:]
    assert "signal 9" not in ended.group(1), ended.group(0)
    return ended.group(1)


def push_again(client: Client, proxy: AnnexRepo, sha: str, blob: bytes) -> None:
    client.git("push", "hub", "main:synced/main", timeout=120)
    assert proxy.git("rev-parse", "synced/main").stdout.strip() == sha
    assert proxy.git("show", "synced/main:big.txt").stdout_bytes == blob
    proxy.git("fsck", "--no-dangling", "--no-progress")
    assert locks(proxy) == []


def test_push_killed_mid_pack(bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo) -> None:
    blob = os.urandom(GIT_BLOB).hex().encode()
    sha = rw_client.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proxy_repo.git("config", "receive.unpackLimit", "1")  # a growing tmp_pack_* to see
    proc = _start_git(rw_client, "push", "hub", "main:synced/main")
    try:
        wait_for(
            "the pack arriving",
            lambda: _incoming_pack(proxy_repo) > 0 or proc.poll() is not None,
            timeout=60,
        )
        assert proc.poll() is None, "the push finished before it could be killed"
        got = _incoming_pack(proxy_repo)
    finally:
        _kill_group(proc)
    ended = git_left_alone(bridge)
    print(f"\npush killed after {got} bytes of its pack; receive-pack {ended}")
    assert locks(proxy_repo) == []
    assert _refs(proxy_repo) == proxy_refs, "a killed push changed the proxy's refs"
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")
    push_again(rw_client, proxy_repo, sha, blob)


def test_push_killed_while_the_proxy_works_on_it(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """Killed once its whole pack went out, while receive-pack runs a slow pre-receive hook.

    receive-pack sends keepalives meanwhile (receive.keepAlive); the first one
    after the client left fails, and git stops there on its own.
    """
    started, finished = tmp_path / "hook-started", tmp_path / "hook-finished"
    hook = proxy_repo.path / ".git" / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\ncat >/dev/null\ntouch {started}\nsleep 3\ntouch {finished}\n")
    hook.chmod(0o755)
    proxy_repo.git("config", "receive.keepAlive", "1")
    blob = os.urandom(256 * 1024).hex().encode()
    sha = rw_client.commit_git_file("big.txt", blob, "big commit")
    proxy_refs = _refs(proxy_repo)
    proc = _start_git(rw_client, "push", "hub", "main:synced/main")
    try:
        wait_for("the pre-receive hook", lambda: started.exists() or proc.poll() is not None, 60)
        assert proc.poll() is None, "the push finished before it could be killed"
    finally:
        _kill_group(proc)
    ended = git_left_alone(bridge)
    wait_for("the hook finishing", finished.exists, 30, 0.1)
    print(f"\npush killed in its pre-receive hook; receive-pack {ended}")
    assert locks(proxy_repo) == []
    # All or nothing: the push is in, or the refs are as they were.
    refs = _refs(proxy_repo)
    assert refs == proxy_refs or f"{sha} refs/heads/synced/main" in refs, refs
    proxy_repo.git("fsck", "--no-dangling", "--no-progress")
    hook.unlink()
    push_again(rw_client, proxy_repo, sha, blob)
