"""Fixtures for the ops tests: real git repositories, git-annex, fake tor."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.ops import GITCONFIG, FakeTor


@pytest.fixture(autouse=True)
def git_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated HOME and git configuration for every test (and what it runs)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text(GITCONFIG)
    for key in list(os.environ):
        if key.startswith(("GIT_", "XDG_", "NOTIFY_SOCKET", "WATCHDOG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    return home


@pytest.fixture(scope="session")
def annex_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `git init` + `git annex init` for the session; tests get copies."""
    if shutil.which("git-annex") is None:
        pytest.skip("git-annex is not installed")
    root = tmp_path_factory.mktemp("template")
    (root / ".gitconfig").write_text(GITCONFIG)
    repo = root / "repo"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
        "HOME": str(root),
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    for argv in (
        ["git", "init", "-q", str(repo)],
        ["git", "-C", str(repo), "annex", "init", "hub"],
    ):
        subprocess.run(argv, env=env, capture_output=True, timeout=120, check=True)
    return repo


@pytest.fixture
def make_repo(annex_template: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A fresh git-annex repository at tmp_path/NAME (a copy of the template)."""

    def make(name: str = "hub") -> Path:
        path = tmp_path / name
        shutil.copytree(annex_template, path, symlinks=True)
        return path

    return make


@pytest.fixture
def fake_tor(tmp_path: Path) -> Iterator[Callable[..., FakeTor]]:
    started: list[FakeTor] = []

    def start(auth: str = "NULL", **kwargs: Any) -> FakeTor:
        tor = FakeTor(tmp_path / f"control{len(started)}", auth, **kwargs)
        started.append(tor)
        return tor

    yield start
    for tor in started:
        tor.close()
