"""The proxy host's git-annex: is it there and new enough, which repository is ours.

``run`` is the one way this package runs git and git-annex at start-up or
in a worker thread: captured text output, a deadline, no exception for a
non-zero exit (callers read ``returncode`` and ``stderr``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

MIN_GIT_ANNEX = "10.20240701"  # the first release with P2P protocol v2-v4 proxies
RUN_TIMEOUT = 60.0  # seconds for one git / git-annex query


class StartupError(Exception):
    """The daemon cannot start; the text is one line saying why and what to do."""


def run(
    argv: list[str], cwd: Path | None = None, timeout: float = RUN_TIMEOUT, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run git or git-annex to completion (TimeoutExpired past ``timeout``).

    Output is text; bytes that are not UTF-8 (file names, log lines) round-trip
    as surrogate escapes.
    """
    return subprocess.run(
        argv,
        cwd=cwd,
        input=input,
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=timeout,
        check=False,
    )


def check_git_annex() -> str:
    """The installed git-annex version, if it is new enough."""
    for program in ("git", "git-annex", "git-annex-shell"):
        if shutil.which(program) is None:
            raise StartupError(
                f"{program} not found on PATH: install git-annex {MIN_GIT_ANNEX} or newer"
                " (for instance `pip install git-annex`)"
            )
    version = run(["git-annex", "version", "--raw"]).stdout.strip()
    if _version_key(version) < _version_key(MIN_GIT_ANNEX):
        raise StartupError(
            f"git-annex {version or '?'} is too old: {MIN_GIT_ANNEX} or newer needed"
        )
    return version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("-")[0])[:2]) or (0,)


def repository_uuid(repository: Path) -> str:
    """The annex UUID of the proxy's own repository."""
    if not repository.is_dir():
        raise StartupError(f"repository {repository} does not exist")
    result = run(["git", "config", "--get", "annex.uuid"], cwd=repository)
    if "dubious ownership" in result.stderr:
        raise StartupError(
            f"git refuses {repository}: it belongs to another user; run torbridge as the"
            " repository's owner (e.g. sudo -u torbridge)"
        )
    uuid = result.stdout.strip()
    if result.returncode != 0 or not uuid:
        raise StartupError(
            f"{repository} is not a git-annex repository (no annex.uuid): run `git annex init`"
        )
    return uuid
