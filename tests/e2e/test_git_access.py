"""Git access per token, and history rewrites refused, with the stock client.

CONNECT reaches the proxy's own git repository from every endpoint, so a
token's git access is its own permission (protocol/gitaccess.py): a token
limited to a node endpoint reads git at most unless granted more, and no
push through the bridge may rewrite or delete ``main``/``master``,
``git-annex`` or ``synced/*`` unless the token has ``--git rewrite``
(server/pushguard.py). Here a directory special remote plays the node: what
matters is that the endpoint is not the proxy's own repository.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Address, Bridge, Expose
from tests.harness.process import Result

pytestmark = pytest.mark.annex

PUSH_TIMEOUT = 90.0
"""A refused push or fetch must end well within this; a hang raises CommandError."""

NO_GIT_TEXT = "this token has no git access; git fetch and push denied"
GIT_READ_ONLY_TEXT = "this token may fetch but not push; git push denied"
REWRITE_HINT = "a token with --git rewrite may"


def add_token(bridge: Bridge, name: str, *options: str, endpoint: str = "hub") -> Address:
    """``torbridge token add NAME OPTIONS...``: the address line for ``endpoint``."""
    result = bridge.cli("token", "add", name, *options)
    want = bridge.socket_path(endpoint)
    for line in result.stdout.splitlines():
        if line.strip() and Address.parse(line).socket == want:
            return Address.parse(line)
    raise AssertionError(f"no address for {endpoint}:\n{result.describe()}")


def rev(repo: AnnexRepo, ref: str) -> str | None:
    result = repo.git("rev-parse", "--verify", "-q", ref, check=False)
    return result.stdout.strip() if result.ok else None


def assert_remote_error(result: Result, text: str) -> None:
    """git failed at once with the bridge's refusal, as git's own "remote error"."""
    assert result.returncode != 0, f"not refused:\n{result.describe()}"
    assert "remote error" in result.output, result.describe()
    assert text in result.output, result.describe()


def assert_rejected(result: Result, ref: str) -> None:
    """The push of ``ref`` was refused by the guard, per ref, in git's own terms."""
    assert result.returncode != 0, f"push was not refused:\n{result.describe()}"
    line = rf"! \[remote rejected\] (\S+ -> )?{re.escape(ref)} \(hook declined\)"
    assert re.search(line, result.output), result.describe()
    assert REWRITE_HINT in result.output, result.describe()


@pytest.fixture
def two_endpoints(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, tmp_path: Path
) -> Bridge:
    """``hub`` (the proxy's own repository) and ``node1`` (a remote it proxies)."""
    directory = tmp_path / "node1-store"
    directory.mkdir()
    proxy_repo.add_proxied_special_remote("node1", "type=directory", f"directory={directory}")
    bridge = make_bridge(exposes=[Expose("hub", ".", 5000), Expose("node1", "node1", 5001)])
    bridge.start()
    return bridge


def evil_commit(client: Client) -> None:
    """A branch ``evil`` unrelated to anything the proxy (or ``main``) has."""
    if rev(client, "main") is None:
        client.commit_git_file("base.txt", b"base\n", "base")
    client.git("checkout", "-q", "--orphan", "evil")
    client.git("rm", "-rq", "--cached", ".", check=False)
    client.commit_git_file("evil.txt", b"injected\n", "evil")
    client.git("checkout", "-q", "-f", "main")


# --- git access per token --------------------------------------------------------


def test_node_scoped_token_reads_git_only(
    two_endpoints: Bridge, client: Client, proxy_repo: AnnexRepo
) -> None:
    """The issue's case: `token add nodeonly --endpoint node1` cannot push into the hub."""
    bridge = two_endpoints
    proxy_repo.add_files({"hub.txt": b"hub\n"}, "hub file")
    proxy_repo.git("branch", "synced/main")
    client.link(
        add_token(bridge, "nodeonly", "--endpoint", "node1", endpoint="node1").line, "viaNode"
    )
    assert "nodeonly\trw\tgit=read(default)\t" in bridge.list_tokens()
    # What the token is for works: content to and from its node (before any
    # fetch: the git-annex branch would tell the client it is a special remote).
    client.add_files({"for node.txt": b"stored on node1\n"}, "node file")
    client.annex("copy", "--to", "viaNode", "for node.txt", timeout=PUSH_TIMEOUT)
    client.annex("drop", "--force", "for node.txt")
    client.annex("get", "--from", "viaNode", "for node.txt", timeout=PUSH_TIMEOUT)
    assert client.read("for node.txt") == b"stored on node1\n"

    client.git("fetch", "viaNode", timeout=PUSH_TIMEOUT)  # reading is still allowed
    assert client.git("rev-parse", "viaNode/main").stdout.strip() == rev(proxy_repo, "main")

    evil_commit(client)
    synced = rev(proxy_repo, "synced/main")
    for refspec in ("evil:refs/heads/injected", "+evil:synced/main"):
        result = client.git("push", "viaNode", refspec, check=False, timeout=PUSH_TIMEOUT)
        assert_remote_error(result, GIT_READ_ONLY_TEXT)
    assert rev(proxy_repo, "injected") is None
    assert rev(proxy_repo, "synced/main") == synced

    bridge.assert_alive()


def test_node_scoped_token_with_git_write(
    two_endpoints: Bridge, client: Client, proxy_repo: AnnexRepo
) -> None:
    bridge = two_endpoints
    client.link(
        add_token(
            bridge, "nodewriter", "--endpoint", "node1", "--git", "write", endpoint="node1"
        ).line,
        "viaNode",
    )
    assert "nodewriter\trw\tgit=write\t" in bridge.list_tokens()
    evil_commit(client)
    client.git("push", "viaNode", "evil:refs/heads/injected", timeout=PUSH_TIMEOUT)
    assert rev(proxy_repo, "injected") == client.git("rev-parse", "evil").stdout.strip()
    # Write is not rewrite: synced/main exists now and cannot be replaced.
    client.git("push", "viaNode", "main:synced/main", timeout=PUSH_TIMEOUT)
    result = client.git("push", "viaNode", "+evil:synced/main", check=False, timeout=PUSH_TIMEOUT)
    assert_rejected(result, "synced/main")
    assert rev(proxy_repo, "synced/main") == client.git("rev-parse", "main").stdout.strip()


def test_git_none_refuses_fetch_and_push(
    bridge: Bridge, client: Client, proxy_repo: AnnexRepo
) -> None:
    proxy_repo.add_files({"kept.txt": b"kept\n"}, "proxy file")
    client.link(add_token(bridge, "contentonly", "--git", "none").line, "hub")
    assert "contentonly\trw\tgit=none\t" in bridge.list_tokens()
    client.add_files({"up.txt": b"uploaded\n"}, "client file")
    for args in (("fetch", "hub"), ("pull", "hub", "main"), ("push", "hub", "main:x")):
        assert_remote_error(client.git(*args, check=False, timeout=PUSH_TIMEOUT), NO_GIT_TEXT)
    assert rev(proxy_repo, "x") is None
    # Content goes on: the token is rw for annex objects.
    client.annex("copy", "--to", "hub", "up.txt", timeout=PUSH_TIMEOUT)
    assert proxy_repo.key_content(client.key("up.txt")) == b"uploaded\n"
    bridge.assert_alive()


# --- history rewrites ------------------------------------------------------------


@pytest.fixture
def pushed(bridge: Bridge, client: Client, proxy_repo: AnnexRepo) -> Client:
    """A client that pushed main, synced/main and git-annex into the proxy, and a
    branch ``evil`` that rewrites them. The proxy has checked out another
    branch, so that only the bridge stands between a push and ``main``."""
    proxy_repo.git("checkout", "-q", "-b", "work")
    client.link(add_token(bridge, "writer").line, "hub")
    client.add_files({"a.txt": b"a\n"}, "first")
    client.git("push", "hub", "main:main", "main:synced/main", "main:feature", timeout=PUSH_TIMEOUT)
    client.annex("sync", "--no-content", "hub", timeout=PUSH_TIMEOUT)  # git-annex branches
    assert rev(proxy_repo, "git-annex") is not None
    evil_commit(client)
    return client


@pytest.mark.parametrize("target", ["main", "synced/main", "git-annex", "synced/git-annex"])
def test_force_push_to_protected_branch_refused(
    pushed: Client, proxy_repo: AnnexRepo, target: str
) -> None:
    before = rev(proxy_repo, target)
    result = pushed.git("push", "hub", f"+evil:{target}", check=False, timeout=PUSH_TIMEOUT)
    assert_rejected(result, target)
    assert "not a fast-forward" in result.output, result.describe()
    assert rev(proxy_repo, target) == before


def test_deleting_protected_branches_refused(pushed: Client, proxy_repo: AnnexRepo) -> None:
    targets = ["main", "synced/main", "git-annex", "synced/git-annex"]
    before = {t: rev(proxy_repo, t) for t in targets}
    result = pushed.git(
        "push", "hub", *(f":{t}" for t in targets), check=False, timeout=PUSH_TIMEOUT
    )
    for target in targets:
        assert_rejected(result, target)
    assert "deleting refs/heads/git-annex is refused" in result.output, result.describe()
    assert {t: rev(proxy_repo, t) for t in targets} == before


def test_other_branches_may_be_rewritten(pushed: Client, proxy_repo: AnnexRepo) -> None:
    """Only the protected branches are guarded; in the same push, others go through."""
    main = rev(proxy_repo, "main")
    result = pushed.git(
        "push", "hub", "+evil:feature", "+evil:main", check=False, timeout=PUSH_TIMEOUT
    )
    assert_rejected(result, "main")
    assert rev(proxy_repo, "feature") == pushed.git("rev-parse", "evil").stdout.strip()
    assert rev(proxy_repo, "main") == main
    pushed.git("push", "hub", ":feature", timeout=PUSH_TIMEOUT)
    assert rev(proxy_repo, "feature") is None


def test_rewrite_allowance(bridge: Bridge, client: Client, proxy_repo: AnnexRepo) -> None:
    """A token with --git rewrite force-pushes and deletes protected branches."""
    proxy_repo.git("checkout", "-q", "-b", "work")
    client.link(add_token(bridge, "admin", "--git", "rewrite").line, "hub")
    assert "admin\trw\tgit=rewrite\t" in bridge.list_tokens()
    client.add_files({"a.txt": b"a\n"}, "first")
    client.git("push", "hub", "main:main", "main:synced/main", timeout=PUSH_TIMEOUT)
    evil_commit(client)
    evil = client.git("rev-parse", "evil").stdout.strip()
    client.git("push", "hub", "+evil:main", timeout=PUSH_TIMEOUT)
    assert rev(proxy_repo, "main") == evil
    client.git("push", "hub", ":synced/main", timeout=PUSH_TIMEOUT)
    assert rev(proxy_repo, "synced/main") is None


def test_ordinary_sync_unchanged(
    bridge: Bridge, proxy_repo: AnnexRepo, make_client: Callable[[str], Client]
) -> None:
    """Two clients sync through the bridge, both pushing, with merges; the
    operator's own hooks run as ever, and the proxy's config is untouched."""
    hooks = Path(proxy_repo.git("rev-parse", "--absolute-git-dir").stdout.strip()) / "hooks"
    ran = hooks.parent / "operator-hooks.log"
    post = hooks / "post-update"
    post.write_text(f'#!/bin/sh\necho "post-update $*" >> "{ran}"\n')
    post.chmod(0o755)
    update = hooks / "update"  # the operator's own rule: no branch called "forbidden"
    update.write_text(
        '#!/bin/sh\n[ "$1" != refs/heads/forbidden ] || { echo "operator says no" >&2; exit 1; }\n'
    )
    update.chmod(0o755)
    config_before = proxy_repo.git("config", "--list", "--local").stdout

    alice, bob = make_client("alice"), make_client("bob")
    alice.link(add_token(bridge, "alice").line, "hub")
    bob.link(add_token(bridge, "bob").line, "hub")
    alice.add_files({"alice.txt": b"from alice\n"}, "alice's file")
    alice.annex("sync", "--content", "hub", timeout=120)
    bob.annex("sync", "--content", "hub", timeout=120)  # bob starts from alice's history
    # Both commit, then both sync: bob pushes first, alice merges bob's
    # commit and pushes the merge, bob takes it.
    alice.add_files({"alice2.txt": b"again\n"}, "alice again")
    bob.add_files({"bob.txt": b"from bob\n"}, "bob's file")
    bob.annex("sync", "--content", "hub", timeout=120)
    alice.annex("sync", "--content", "hub", timeout=120)
    bob.annex("sync", "--content", "hub", timeout=120)
    assert len(alice.git("rev-list", "--merges", "main").stdout.split()) >= 1
    for who in (alice, bob):
        for name, content in (
            ("alice.txt", b"from alice\n"),
            ("bob.txt", b"from bob\n"),
            ("alice2.txt", b"again\n"),
        ):
            assert who.read(name) == content
    assert rev(alice, "main") == rev(bob, "main") == rev(proxy_repo, "synced/main")
    # A plain push of new commits, too.
    bob.add_files({"plain.txt": b"plain\n"}, "plain push")
    bob.git("push", "hub", "main:synced/main", timeout=PUSH_TIMEOUT)
    assert rev(proxy_repo, "synced/main") == rev(bob, "main")

    assert "post-update refs/heads/synced/main" in ran.read_text()
    result = bob.git("push", "hub", "main:forbidden", check=False, timeout=PUSH_TIMEOUT)
    assert result.returncode != 0 and "operator says no" in result.output, result.describe()
    assert rev(proxy_repo, "forbidden") is None
    assert proxy_repo.git("config", "--list", "--local").stdout == config_before
    proxy_repo.fsck_content()
