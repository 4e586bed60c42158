"""Pushes through the bridge may not rewrite protected branches: git's update hook.

``git receive-pack`` runs per ref update the ``update`` hook, which may
refuse that one ref: the client then reports ``! [remote rejected] ...
(hook declined)`` for it, with the hook's reason on a ``remote:`` line, and
the push's other refs go on. That is git's own way to refuse one ref.

The hook is installed for one push only, without touching the operator's
repository: receive-pack runs with ``core.hooksPath=DIR`` in its environment
(GIT_CONFIG_COUNT, git's environment form of ``git -c``), DIR a directory
made for that push (``prepare``) that holds

- a symlink to every entry of the repository's own hooks directory, so the
  operator's hooks (and git-annex's post-receive) run exactly as before,
  also in the git commands those hooks start (they inherit the setting);
- ``update``: ours. It asks protocol/gitaccess.py whether the update may go
  through and, if so, runs the repository's own ``update`` hook, if any.

The hook itself is this module's ``main``, run by the daemon's own Python.
It imports nothing but the standard library and protocol/gitaccess.py, so
it starts quickly; the decision stays in the sans-I/O core.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torbridge.annex.host import run
from torbridge.protocol import gitaccess as g

HOOK = "update"
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # where `import torbridge` works


class GuardError(Exception):
    """The hooks directory could not be made (one line for the client)."""


def _git(args: list[str], cwd: Path) -> str:
    result = run(["git", *args], cwd=cwd)
    if result.returncode != 0:
        raise GuardError(f"git {' '.join(args)} failed: {result.stderr.strip()[:200]}")
    return result.stdout.strip()


def own_hooks_dir(repository: Path) -> Path:
    """The repository's hooks directory as receive-pack's hooks find it.

    Push hooks run in $GIT_DIR, so a relative ``core.hooksPath`` is taken
    from there (and so is the default, ``hooks``).
    """
    git_dir = Path(_git(["rev-parse", "--absolute-git-dir"], repository))
    return git_dir / _git(["rev-parse", "--git-path", "hooks"], git_dir)


def prepare(repository: Path) -> Path:
    """A new hooks directory for one guarded push; ``remove`` it afterwards.

    Blocking (git, files): the trio layer runs it in a thread.
    """
    try:
        own = own_hooks_dir(repository)
    except (OSError, subprocess.SubprocessError) as e:
        raise GuardError(f"cannot run git: {e}") from None
    directory = Path(tempfile.mkdtemp(prefix="torbridge-hooks-"))
    try:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(own):
                if entry.name != HOOK:
                    os.symlink(own / entry.name, directory / entry.name)
        code = (
            f"import sys; sys.path.insert(0, {str(_PACKAGE_PARENT)!r}); "
            "from torbridge.server.pushguard import main; sys.exit(main(sys.argv[1:]))"
        )
        argv = [sys.executable, "-I", "-S", "-c", code, str(own / HOOK)]
        script = directory / HOOK
        script.write_text(
            "#!/bin/sh\n"
            "# torbridge: refuses history rewrites of protected branches (server/pushguard.py)\n"
            f'exec {" ".join(shlex.quote(a) for a in argv)} "$@"\n'
        )
        script.chmod(0o700)
    except BaseException:
        remove(directory)
        raise
    return directory


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def git_config_env(directory: Path, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``core.hooksPath=directory`` added through git's
    GIT_CONFIG_COUNT variables: as ``git -c``, but the argv stays
    ``git receive-pack REPO``. Config already passed that way is kept."""
    env = dict(base)
    count = env.get("GIT_CONFIG_COUNT", "0")
    n = int(count) if count.isdigit() else 0
    env[f"GIT_CONFIG_KEY_{n}"] = "core.hooksPath"
    env[f"GIT_CONFIG_VALUE_{n}"] = str(directory)
    env["GIT_CONFIG_COUNT"] = str(n + 1)
    return env


# --- the hook (runs in $GIT_DIR, in receive-pack's environment) ------------------------


def _head() -> str | None:
    result = run(["git", "symbolic-ref", "-q", "HEAD"])
    if result.returncode != 0:
        return None  # detached
    return result.stdout.strip() or None


def _fast_forward(old: str, new: str) -> bool | None:
    result = run(["git", "merge-base", "--is-ancestor", old, new])
    return {0: True, 1: False}.get(result.returncode)


def main(args: list[str]) -> int:
    """``update`` hook: ``OWN_UPDATE_HOOK REF OLD NEW``; exit status 0 lets the ref through."""
    if len(args) != 4:
        print("torbridge: the update hook needs REF OLD NEW", file=sys.stderr)
        return 1
    own_hook, ref, old, new = args
    head = _head()
    ancestry = _fast_forward(old, new) if g.needs_ancestry(ref, old, new, head) else None
    refusal = g.push_refusal(ref, old, new, head, ancestry)
    if refusal is not None:
        print(f"torbridge: {refusal}\ntorbridge: {g.REWRITE_HINT}", file=sys.stderr)
        return 1
    if os.access(own_hook, os.X_OK) and os.path.isfile(own_hook):
        os.execv(own_hook, [own_hook, ref, old, new])
    return 0
