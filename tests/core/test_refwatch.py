"""The daemon's one ref watch (torbridge/server/refwatch.py), and a Session serving NOTIFYCHANGE.

Real git repositories in a temporary directory (git only, no git-annex),
real time with generous deadlines: inotify and git cannot run on a virtual
clock. The Session transcript uses the in-memory client of test_session.py
and a peer that must never be opened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.core.test_session import AUTH, AUTH_OK, LIMITS, Client, connection
from tests.harness.fakes import FakeRepo, FakeTransport, OneToken
from torbridge.server.endpoints import Endpoint
from torbridge.server.refwatch import MAX_SHAS, RefWatcher, new_shas, parse_for_each_ref
from torbridge.server.session import Session

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

DEADLINE = 60.0  # real seconds; the machine is shared, nothing here is timed
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


async def agit(repo: Path, *args: str) -> str:
    return await trio.to_thread.run_sync(lambda: git(repo, *args))


async def commit(repo: Path, message: str) -> str:
    await agit(repo, "commit", "-q", "--allow-empty", "-m", message)
    return await agit(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "proxy"
    subprocess.run(["git", "init", "-q", str(path)], env=ENV, check=True)
    git(path, "commit", "-q", "--allow-empty", "-m", "first")
    return path


@asynccontextmanager
async def running(watcher: RefWatcher) -> AsyncIterator[RefWatcher]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        yield watcher
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], object]) -> None:
    """Wait (under the test's deadline) until ``predicate()`` holds."""
    while True:
        if predicate():
            return
        await trio.sleep(0.01)


# --- what CHANGED says -----------------------------------------------------------------


def test_new_shas_are_the_written_refs_once_each() -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    before = {"refs/heads/main": a, "refs/heads/gone": b}
    after = {"refs/heads/main": c, "refs/heads/new": c, "refs/tags/v1": a}
    # main moved and new appeared (both at c, said once); v1 is new although
    # its commit is not; a deleted ref is not reported, as by git-annex.
    assert new_shas(before, after) == (c, a)
    assert new_shas(after, after) == ()
    assert new_shas(after, {"refs/heads/main": c}) == ()
    many = {f"refs/tags/t{i}": f"{i:040x}" for i in range(3 * MAX_SHAS)}
    assert len(new_shas({}, many)) == MAX_SHAS


def test_for_each_ref_output_is_parsed() -> None:
    out = b"1111111111111111111111111111111111111111 refs/heads/main\n\n" + b"x\n"
    assert parse_for_each_ref(out) == {"refs/heads/main": "1" * 40}


# --- the watch -------------------------------------------------------------------------


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_a_commit_is_reported_and_nothing_runs_while_nobody_watches(
    repo: Path, use_inotify: bool
) -> None:
    watcher = RefWatcher(repo, use_inotify=use_inotify, poll_interval=0.1)
    with trio.fail_after(DEADLINE):
        async with running(watcher):
            await commit(repo, "nobody watches")
            await trio.sleep(0.3)
            assert watcher.status() == {
                "sessions": 0,
                "mechanism": None,
                "starts": 0,
                "snapshots": 0,
            }
            with watcher.watch() as watch:
                first = trio.Event()
                got: list[tuple[str, ...]] = []

                async def wait() -> None:
                    first.set()
                    got.append(await watch.changed())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await first.wait()
                    await until(lambda: watch.baseline is not None)
                    assert watcher.mechanism == ("inotify" if use_inotify else "poll")
                    sha = await commit(repo, "one")
                assert got == [(sha,)]
            # The last session left: the watch stops.
            await until(lambda: watcher.mechanism is None)
            assert watcher.starts == 1


async def test_changes_between_two_waits_are_not_lost(repo: Path) -> None:
    """A client fetching between CHANGED and its next NOTIFYCHANGE misses nothing."""
    watcher = RefWatcher(repo)
    with trio.fail_after(DEADLINE):
        async with running(watcher):
            with watcher.watch() as watch:
                async with trio.open_nursery() as nursery:
                    got: list[tuple[str, ...]] = []

                    async def wait() -> None:
                        got.append(await watch.changed())

                    nursery.start_soon(wait)
                    await until(lambda: watch.baseline is not None)
                    first = await commit(repo, "one")
                assert got == [(first,)]
                # Nobody waits now; two refs are written, one in a new directory.
                second = await commit(repo, "two")
                await agit(repo, "update-ref", "refs/heads/topic/deep/x", first)
                await until(lambda: (watcher.peek() or {}).get("refs/heads/topic/deep/x"))
                assert set(await watch.changed()) == {first, second}
                # The new directory is watched too.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await trio.sleep(0.2)
                    await agit(repo, "update-ref", "refs/heads/topic/deep/x", second)
                assert got[-1] == (second,)
                # A deletion alone is not reported; the next write is.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await trio.sleep(0.2)
                    await agit(repo, "update-ref", "-d", "refs/heads/topic/deep/x")
                    await trio.sleep(0.3)
                    assert len(got) == 2
                    third = await commit(repo, "three")
                assert got[-1] == (third,)


async def test_packed_refs_are_watched(repo: Path) -> None:
    watcher = RefWatcher(repo)
    with trio.fail_after(DEADLINE):
        async with running(watcher):
            with watcher.watch() as watch:
                await agit(repo, "pack-refs", "--all")
                head = await agit(repo, "rev-parse", "HEAD")
                async with trio.open_nursery() as nursery:
                    got: list[tuple[str, ...]] = []

                    async def wait() -> None:
                        got.append(await watch.changed())

                    nursery.start_soon(wait)
                    await until(lambda: watch.baseline is not None)
                    await trio.sleep(0.2)
                    # A tag written straight into packed-refs, as a fetch may.
                    packed = repo / ".git" / "packed-refs"
                    lock = packed.with_name("packed-refs.lock")
                    lock.write_text(packed.read_text() + f"{head} refs/tags/packed\n")
                    lock.rename(packed)
                assert got == [(head,)]


async def test_fifty_sessions_share_one_watch(repo: Path) -> None:
    watcher = RefWatcher(repo)
    with trio.fail_after(DEADLINE):
        async with running(watcher):
            got: list[tuple[str, ...]] = []
            ready = trio.Semaphore(0)

            async def session() -> None:
                with watcher.watch() as watch:
                    ready.release()
                    got.append(await watch.changed())

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(session)
                for _ in range(50):
                    await ready.acquire()
                await until(lambda: watcher.peek() is not None)
                assert watcher.users == 50
                before = watcher.snapshots
                sha = await commit(repo, "for all")
            assert got == [(sha,)] * 50
            assert watcher.starts == 1
            assert 1 <= watcher.snapshots - before <= 3  # not one per session
            await until(lambda: watcher.mechanism is None)


# --- a Session serving NOTIFYCHANGE ------------------------------------------------------


@asynccontextmanager
async def own_endpoint_session(repo: Path) -> AsyncIterator[tuple[Client, RefWatcher, FakeRepo]]:
    peer = FakeRepo()
    watcher = RefWatcher(repo)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        endpoint = Endpoint("hub", peer.uuid, FakeTransport(peer), repo, OneToken(), LIMITS)
        endpoint.refs = watcher
        ours, theirs = connection()
        finished = trio.Event()

        async def run() -> None:
            try:
                await Session(theirs, endpoint).run()
            finally:
                finished.set()

        nursery.start_soon(run)
        yield Client(ours), watcher, peer
        await ours.aclose()
        await finished.wait()
        nursery.cancel_scope.cancel()


async def test_session_transcript_notifychange_changed(repo: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with own_endpoint_session(repo) as (client, watcher, peer):
            await client.send(AUTH)
            await client.expect(AUTH_OK)
            await client.send(b"NOTIFYCHANGE\n")
            await until(lambda: watcher.users == 1 and watcher.peek() is not None)
            sha = await commit(repo, "pushed")
            await client.expect(b"CHANGED %s\n" % sha.encode())
            # Again: a change made before the NOTIFYCHANGE is answered at once.
            sha2 = await commit(repo, "meanwhile")
            await until(lambda: (watcher.peek() or {}).get("refs/heads/" + branch(repo)) == sha2)
            await client.send(b"NOTIFYCHANGE\n")
            await client.expect(b"CHANGED %s\n" % sha2.encode())
            # The client hangs up while it waits: the session ends, the watch stops.
            await client.send(b"NOTIFYCHANGE\n")
            await trio.sleep(0.1)
        assert watcher.users == 0
        assert peer.connections == [], "NOTIFYCHANGE needs no git-annex-shell"


def branch(repo: Path) -> str:
    return git(repo, "symbolic-ref", "--short", "HEAD")
