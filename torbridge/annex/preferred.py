"""Each node's preferred content, evaluated by git-annex as that node.

git-annex's gateway (Annex/Cluster.hs) sends a PUT to the nodes whose
preferred content wants the key, evaluated for each node as that node:
``standard`` and ``groupwanted`` stand for the node's group's expression,
``present``, ``balanced=``, ``sizebalanced=`` and ``maxsize`` are the
node's. torbridge never parses these expressions; git-annex evaluates them
with ``git annex find --want-get-by=NODE``, which is the same check
(``wantGetBy``) with the proxy's git-annex branch.

``--want-get-by`` needs a file: it looks the key up from the file's
symlink, and ``find`` only lists files staged in an index. (Given keys
with ``--batch-keys``, git-annex 10.20261026 drops the key before the
check, and every node answers "not wanted"; a long-running ``find --batch``
does not see files staged after it started.) So each query stages the
PUT's associated file, as a symlink to the key, in a scratch work tree and
index of its own, next to the proxy's git directory: the proxy's index,
work tree and object store are not touched (the symlink's blob goes to a
scratch object directory that git-annex reads as an alternate).

A query that fails or runs out of time counts as wanted, and says so in
the log: a copy too many is safe, a copy too few is not.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from torbridge.protocol.fields import is_valid_key

log = logging.getLogger("torbridge.preferred")

QUERY_TIMEOUT = 60.0  # one evaluation, queueing included
WANTED_TTL = 10.0  # seconds a node's preferred content expression is reused
MAX_RUNNING = 4  # git-annex processes evaluating at once (they are CPU-bound)
_MAX_PATH = 4096
# Set for each query; inherited values of these would point git elsewhere.
_REPOSITORY_VARIABLES = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
    }
)
_MAX_COMPONENT = 255


def safe_relative_path(af: str | None) -> str | None:
    """``af`` if it can name a file inside a scratch work tree, else None.

    The associated file comes from the client: nothing absolute, no ``..``,
    no ``.git``, nothing empty, no control characters.
    """
    if not af or len(af.encode("utf-8", "surrogateescape")) > _MAX_PATH:
        return None
    if any(ord(ch) < 32 or ch == "\x7f" for ch in af) or af.startswith("/"):
        return None
    parts = af.split("/")
    for part in parts:
        if part in ("", ".", "..") or part.lower() == ".git":
            return None
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT:
            return None
    return af


class PreferredContent:
    """Asks git-annex whether nodes want a key, as each node would."""

    def __init__(self, repository: Path, scratch_parent: Path | None = None) -> None:
        self.repository = repository
        self.scratch_parent = scratch_parent
        self._git_dir: str | None = None
        self._scratch: Path | None = None
        self._counter = 0
        self._running = trio.Semaphore(MAX_RUNNING)
        self._setup_lock = trio.Lock()
        self._expressions: dict[str, tuple[float, str]] = {}

    # --- the answer ------------------------------------------------------------------

    async def wanted(self, remotes: Sequence[str], key: str, af: str | None) -> dict[str, bool]:
        """For each remote name in ``remotes``: does its preferred content want ``key``?

        An unset expression wants everything, as for git-annex's gateway.
        """
        answers: dict[str, bool] = {}
        expressions: dict[str, str] = {}

        async def expression(remote: str) -> None:
            expressions[remote] = await self.expression(remote)

        async with trio.open_nursery() as nursery:
            for remote in remotes:
                nursery.start_soon(expression, remote)
        to_ask = []
        for remote in remotes:
            text = expressions[remote]
            if text in ("", "anything"):
                answers[remote] = True
            elif text == "nothing":
                answers[remote] = False
            else:
                to_ask.append(remote)
        if not to_ask:
            return answers
        path = safe_relative_path(af)
        if path is None or not is_valid_key(key):
            # git-annex's gateway would evaluate file-name terms as not
            # matching; find needs a file. Sent: an extra copy is safe.
            for remote in to_ask:
                log.info(
                    "preferred content of %s not evaluated (%s): sending it",
                    remote,
                    "no usable file name" if af else "the PUT names no file",
                )
                answers[remote] = True
            return answers
        answers.update(await self._evaluate(to_ask, key, path))
        return answers

    async def expression(self, remote: str) -> str:
        """``git annex wanted REMOTE`` (reused for WANTED_TTL seconds); "" if unset."""
        now = trio.current_time()
        cached = self._expressions.get(remote)
        if cached is not None and now - cached[0] < WANTED_TTL:
            return cached[1]
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                done = await trio.run_process(
                    ["git", "annex", "wanted", remote],
                    cwd=self.repository,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        except (trio.TooSlowError, OSError) as e:
            log.warning("git annex wanted %s failed (%s): taken as unset", remote, e)
            return ""
        text = done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else ""
        self._expressions[remote] = (now, text)
        return text

    # --- git-annex's evaluation in a scratch work tree ---------------------------------

    async def _evaluate(self, remotes: Sequence[str], key: str, path: str) -> dict[str, bool]:
        answers = dict.fromkeys(remotes, True)
        query: Path | None = None
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                query, env = await self._stage(key, path)
                async with trio.open_nursery() as nursery:
                    for remote in remotes:
                        nursery.start_soon(self._ask, remote, path, query, env, answers)
        except (trio.TooSlowError, OSError, subprocess.CalledProcessError) as e:
            log.warning(
                "preferred content of %s not known (%s): sending it anyway",
                ", ".join(remotes),
                _why(e),
            )
            return dict.fromkeys(remotes, True)
        finally:
            if query is not None:
                shutil.rmtree(query, ignore_errors=True)
        return answers

    async def _ask(
        self,
        remote: str,
        path: str,
        query: Path,
        env: Mapping[str, str],
        answers: dict[str, bool],
    ) -> None:
        argv = ["git", "annex", "find", f"--want-get-by={remote}", "--", path]
        async with self._running:
            done = await trio.run_process(
                argv,
                cwd=query / "wt",
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if done.returncode != 0:
            log.warning(
                "preferred content of %s not decided (%s): sending it anyway",
                remote,
                done.stderr.decode("utf-8", "replace").strip()[:300],
            )
            return
        answers[remote] = bool(done.stdout.strip())

    async def _stage(self, key: str, path: str) -> tuple[Path, dict[str, str]]:
        """A work tree and index holding only ``path``, an annex symlink to ``key``."""
        scratch = await self._scratch_dir()
        assert self._git_dir is not None
        self._counter += 1
        query = scratch / f"q{self._counter}"
        link = query / "wt" / path
        link.parent.mkdir(parents=True)
        depth = path.count("/")
        # What git-annex reads from the link is the key (its last component).
        os.symlink("../" * depth + f".git/annex/objects/00/00/{key}/{key}", link)
        env = {k: v for k, v in os.environ.items() if k not in _REPOSITORY_VARIABLES}
        env.update(
            GIT_DIR=self._git_dir,
            GIT_WORK_TREE=str(query / "wt"),
            GIT_INDEX_FILE=str(query / "index"),
            GIT_ALTERNATE_OBJECT_DIRECTORIES=str(scratch / "objects"),
        )
        # The symlink's blob goes to the scratch object directory only.
        stage_env = {**env, "GIT_OBJECT_DIRECTORY": str(scratch / "objects")}
        del stage_env["GIT_ALTERNATE_OBJECT_DIRECTORIES"]
        await trio.run_process(
            ["git", "update-index", "--add", "--", path],
            cwd=query / "wt",
            env=stage_env,
            capture_stdout=True,
            capture_stderr=True,
            check=True,
        )
        return query, env

    async def _scratch_dir(self) -> Path:
        async with self._setup_lock:
            if self._scratch is not None and self._scratch.is_dir():
                return self._scratch
            if self._git_dir is None:
                done = await trio.run_process(
                    ["git", "rev-parse", "--absolute-git-dir"],
                    cwd=self.repository,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=True,
                )
                self._git_dir = done.stdout.decode().strip()
            if self.scratch_parent is not None:
                self.scratch_parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="torbridge-wanted-", dir=self.scratch_parent))
            (scratch / "objects").mkdir()
            self._scratch = scratch
            return scratch

    def close(self) -> None:
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _why(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return f"no answer in {QUERY_TIMEOUT:.0f} s"
    if isinstance(e, subprocess.CalledProcessError):
        err = e.stderr.decode("utf-8", "replace").strip() if isinstance(e.stderr, bytes) else ""
        return f"{e.cmd[0:3]} exited {e.returncode}: {err[:200]}"
    return str(e) or type(e).__name__
