"""The push guard's hook with real git (no git-annex), and ``token add --git``.

receive-pack runs here as the bridge runs it, with ``core.hooksPath=DIR``
in its environment and DIR from ``pushguard.prepare``, reached by a local
``git push --receive-pack``: the guard refuses per ref, the repository's own
hooks still run, its own ``update`` hook still has the last word.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.core.test_config import MINIMAL
from torbridge.cli import main
from torbridge.server import pushguard

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=GIT_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, f"git {args}: {result.stderr}"
    return result


def rev(repo: Path, ref: str) -> str | None:
    result = git(repo, "rev-parse", "--verify", "-q", ref, check=False)
    return result.stdout.strip() or None


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(name)
    git(repo, "add", name)
    git(repo, "commit", "-qm", name)
    return git(repo, "rev-parse", "HEAD").stdout.strip()


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Path, Path]:
    """A bare hub with main, synced/main, git-annex and feature; a client clone."""
    hub, client = tmp_path / "hub.git", tmp_path / "client"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(hub))
    git(tmp_path, "init", "-q", "-b", "main", str(client))
    commit(client, "base")
    git(
        client,
        "push",
        "-q",
        str(hub),
        "main",
        "main:synced/main",
        "main:git-annex",
        "main:feature",
        "main:trunk",
    )
    git(client, "checkout", "-q", "--orphan", "evil")
    git(client, "rm", "-rqf", "--cached", ".")
    commit(client, "evil")
    git(client, "checkout", "-q", "-f", "main")
    return hub, client


def guarded_push(hub: Path, client: Path, *refspecs: str) -> subprocess.CompletedProcess[str]:
    hooks = pushguard.prepare(hub)
    try:
        # As the bridge runs it: core.hooksPath through GIT_CONFIG_COUNT.
        extra = pushguard.git_config_env(hooks, {})
        receive = (
            f"env {' '.join(f'{k}={shlex.quote(v)}' for k, v in extra.items())} git receive-pack"
        )
        return git(client, "push", "--receive-pack", receive, str(hub), *refspecs, check=False)
    finally:
        pushguard.remove(hooks)
        assert not hooks.exists()


def rejected(result: subprocess.CompletedProcess[str], ref: str) -> bool:
    return (
        re.search(
            rf"! \[remote rejected\] (\S+ -> )?{re.escape(ref)} \(hook declined\)", result.stderr
        )
        is not None
    )


def test_protected_rewrites_refused_per_ref(repos: tuple[Path, Path]) -> None:
    hub, client = repos
    before = {b: rev(hub, b) for b in ("main", "synced/main", "git-annex")}
    result = guarded_push(
        hub, client, "+evil:main", "+evil:synced/main", ":git-annex", "+evil:feature"
    )
    assert result.returncode != 0
    for branch in before:
        assert rejected(result, branch), result.stderr
        assert rev(hub, branch) == before[branch]
    assert "refs/heads/main is not a fast-forward" in result.stderr
    assert "deleting refs/heads/git-annex is refused" in result.stderr
    assert rev(hub, "feature") == rev(client, "evil")  # unprotected: through


def test_the_head_branch_of_a_bare_hub_is_protected(repos: tuple[Path, Path]) -> None:
    hub, client = repos
    git(hub, "symbolic-ref", "HEAD", "refs/heads/trunk")
    trunk = rev(hub, "trunk")
    result = guarded_push(hub, client, "+evil:trunk")
    assert rejected(result, "trunk"), result.stderr
    assert rev(hub, "trunk") == trunk


def test_fast_forwards_and_new_branches_go_through(repos: tuple[Path, Path]) -> None:
    hub, client = repos
    head = commit(client, "next")
    result = guarded_push(hub, client, "main", "main:synced/main", "main:synced/new")
    assert result.returncode == 0, result.stderr
    assert rev(hub, "main") == rev(hub, "synced/main") == rev(hub, "synced/new") == head


def test_the_repositorys_own_hooks_still_run(repos: tuple[Path, Path], tmp_path: Path) -> None:
    hub, client = repos
    log = tmp_path / "hooks.log"
    for name, body in (
        ("post-receive", f'cat >> "{log}"'),
        (
            "update",
            f'echo "update $1" >> "{log}"; [ "$1" != refs/heads/forbidden ] || '
            '{ echo "operator says no" >&2; exit 1; }',
        ),
    ):
        path = hub / "hooks" / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    head = commit(client, "next")
    result = guarded_push(hub, client, "main", "main:forbidden")
    assert rev(hub, "main") == head
    assert "operator says no" in result.stderr and rejected(result, "forbidden")
    text = log.read_text()
    assert "update refs/heads/main" in text  # the operator's update hook ran after ours
    assert f"{head} refs/heads/main" in text  # and post-receive got the update
    # A refused rewrite never reaches the operator's update hook.
    log.write_text("")
    guarded_push(hub, client, "+evil:synced/main")
    assert "synced/main" not in log.read_text()


def test_a_relative_hooks_path_is_followed(repos: tuple[Path, Path], tmp_path: Path) -> None:
    hub, client = repos
    (hub / "myhooks").mkdir()
    log = tmp_path / "hooks.log"
    hook = hub / "myhooks" / "post-update"
    hook.write_text(f'#!/bin/sh\necho "post-update $*" >> "{log}"\n')
    hook.chmod(0o755)
    git(hub, "config", "core.hooksPath", "myhooks")
    assert pushguard.own_hooks_dir(hub) == hub / "myhooks"
    commit(client, "next")
    assert guarded_push(hub, client, "main").returncode == 0
    assert "post-update refs/heads/main" in log.read_text()


def test_config_env_extends_what_is_there() -> None:
    base = {
        "PATH": "/bin",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "a.b",
        "GIT_CONFIG_VALUE_0": "c",
    }
    env = pushguard.git_config_env(Path("/h"), base)
    assert env == {
        **base,
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_1": "core.hooksPath",
        "GIT_CONFIG_VALUE_1": "/h",
    }
    assert base["GIT_CONFIG_COUNT"] == "1"  # not changed in place


def test_prepare_fails_cleanly_outside_a_repository(tmp_path: Path) -> None:
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("torbridge-hooks-*"))
    with pytest.raises(pushguard.GuardError, match="git rev-parse"):
        pushguard.prepare(tmp_path)  # a directory, but no repository
    assert set(temp.glob("torbridge-hooks-*")) == before  # nothing left behind


# --- the CLI -----------------------------------------------------------------------


def test_token_add_and_list_show_git_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "torbridge.toml"
    config.write_text(
        MINIMAL.replace("/var/lib/torbridge", str(tmp_path / "state"))
        + '\n[[expose]]\nname = "node1"\nremote = "node1"\nport = 5001\n'
    )
    base = ["--config", str(config), "token"]
    assert main([*base, "add", "alice"]) == 0
    assert main([*base, "add", "nodeonly", "--endpoint", "node1"]) == 0
    assert "'nodeonly' (rw, git read(default)) created" in capsys.readouterr().err
    assert main([*base, "add", "nodewriter", "--endpoint", "node1", "--git", "write"]) == 0
    assert main([*base, "add", "admin", "--git", "rewrite"]) == 0
    assert main([*base, "add", "reader", "--mode", "ro", "--git", "none"]) == 0
    capsys.readouterr()
    assert main([*base, "list"]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert {name: row[1:3] for name, row in rows.items()} == {
        "admin": ["rw", "git=rewrite"],
        "alice": ["rw", "git=write(default)"],
        "nodeonly": ["rw", "git=read(default)"],
        "nodewriter": ["rw", "git=write"],
        "reader": ["ro", "git=none"],
    }
    assert rows["nodeonly"][4] == "node1"
    with pytest.raises(SystemExit):
        main([*base, "add", "bad", "--git", "push"])
    assert "invalid choice: 'push'" in capsys.readouterr().err
