"""git-annex for the tests: an isolated environment, repositories, the stock client.

- :class:`AnnexEnv`: an isolated HOME (own ``.gitconfig``), a bin dir first on
  PATH with ``git-remote-p2p-annex`` -> the real git-annex multi-call binary,
  then the directory of the ``torbridge`` console scripts.
- :class:`AnnexRepo` / :class:`Client`: a git-annex repository (the proxy, a
  node or a client) with helpers to add files, link a remote, look up keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.process import DEFAULT_TIMEOUT, Result, run


def _git_annex_binary() -> Path:
    try:
        import git_annex
    except ImportError:  # the fixtures skip the tests: see conftest.annex_env
        return Path("/nonexistent/git-annex")
    return Path(git_annex.__file__).resolve().parent / "git-annex"


GIT_ANNEX_BINARY = _git_annex_binary()
"""The real multi-call git-annex binary shipped in the PyPI wheel (``pip install git-annex``)."""

GIT_ANNEX_MAGIC = GIT_ANNEX_BINARY.parent / "magic.mgc"

# Names under which the multi-call binary is put on PATH. Only
# git-remote-p2p-annex is strictly needed (the wheel does not ship it); the
# others skip the wheel's Python wrapper, which saves ~50 ms per call.
MULTICALL_NAMES = (
    "git-annex",
    "git-annex-shell",
    "git-remote-annex",
    "git-remote-p2p-annex",
    "git-remote-tor-annex",
)

GITCONFIG = """\
[user]
\tname = torbridge e2e
\temail = e2e@torbridge.invalid
[init]
\tdefaultBranch = main
[core]
\tquotepath = false
[advice]
\tdetachedHead = false
[pull]
\trebase = false
[color]
\tui = false
[gc]
\tauto = 0
[maintenance]
\tauto = false
[safe]
\tdirectory = *
[annex]
\tautocommit = false
\tdiskreserve = 1mb
\tstalldetection = false
"""


def scripts_dir() -> Path:
    """The directory that holds the ``torbridge`` console scripts."""
    candidates = [Path(sysconfig.get_path("scripts"))]
    found = shutil.which("torbridge")
    if found:
        candidates.append(Path(found).resolve().parent)
    for candidate in candidates:
        if (candidate / "torbridge").exists():
            return candidate
    return candidates[0]


@dataclass
class AnnexEnv:
    """HOME, PATH and friends for one test; nothing outside ``root`` is touched."""

    root: Path
    home: Path
    bin_dir: Path
    env: dict[str, str]

    @classmethod
    def create(cls, root: Path) -> AnnexEnv:
        home = root / "home"
        bin_dir = root / "bin"
        home.mkdir(parents=True, exist_ok=True)
        bin_dir.mkdir(parents=True, exist_ok=True)
        (home / ".gitconfig").write_text(GITCONFIG)
        for name in MULTICALL_NAMES:
            link = bin_dir / name
            if not link.exists():
                link.symlink_to(GIT_ANNEX_BINARY)
        # TORBRIDGE_E2E_PATH: directories searched before the installed scripts
        # (to run the suite against another build of torbridge).
        extra_path = [p for p in os.environ.get("TORBRIDGE_E2E_PATH", "").split(os.pathsep) if p]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GIT_", "XDG_", "TORBRIDGE")) and k not in {"MAGIC"}
        }
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local" / "share"),
            XDG_CACHE_HOME=str(home / ".cache"),
            PATH=os.pathsep.join(
                [str(bin_dir), *extra_path, str(scripts_dir()), env.get("PATH", os.defpath)]
            ),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_TERMINAL_PROMPT="0",
            LC_ALL="C.UTF-8",
            LANG="C.UTF-8",
        )
        if GIT_ANNEX_MAGIC.exists():
            env["MAGIC"] = str(GIT_ANNEX_MAGIC)
        return cls(root=root, home=home, bin_dir=bin_dir, env=env)

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        cwd: Path | None = None,
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: bytes | str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Result:
        env = dict(self.env)
        if extra_env:
            env.update(extra_env)
        return run(cmd, cwd, check=check, timeout=timeout, input=input, env=env)


# --- repositories -----------------------------------------------------------------


class AnnexRepo:
    """A non-bare git-annex repository driven with the real git and git-annex."""

    def __init__(self, env: AnnexEnv, path: Path) -> None:
        self.env = env
        self.path = path

    @classmethod
    def create(cls, env: AnnexEnv, path: Path, description: str) -> AnnexRepo:
        repo = cls(env, path)
        repo.init(description)
        return repo

    def init(self, description: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.env.run(["git", "init", "-q"], self.path)
        self.annex("init", description)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # commands
    def git(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: bytes | str | None = None,
    ) -> Result:
        return self.env.run(["git", *args], self.path, check=check, timeout=timeout, input=input)

    def annex(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: bytes | str | None = None,
    ) -> Result:
        return self.env.run(
            ["git", "annex", *args], self.path, check=check, timeout=timeout, input=input
        )

    @property
    def uuid(self) -> str:
        return self.git("config", "annex.uuid").stdout.strip()

    def add_proxied_special_remote(self, name: str, *settings: str) -> str:
        """``initremote NAME SETTINGS encryption=none``, marked for git-annex to
        proxy (``annex-proxy``, ``updateproxy``); returns the remote's UUID."""
        self.annex("initremote", name, *settings, "encryption=none")
        self.git("config", f"remote.{name}.annex-proxy", "true")
        self.annex("updateproxy")
        return self.git("config", f"remote.{name}.annex-uuid").stdout.strip()

    # files
    def write_file(self, relpath: str, content: bytes) -> Path:
        path = self.path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def add_files(self, files: Mapping[str, bytes], message: str = "add files") -> None:
        """Write, ``git annex add`` and commit the files (names may be anything)."""
        for relpath, content in files.items():
            self.write_file(relpath, content)
        self.annex("add", "--", *files)
        self.git("commit", "-q", "-m", message)

    def add_file(self, relpath: str, content: bytes, message: str | None = None) -> Path:
        self.add_files({relpath: content}, message or f"add {relpath}")
        return self.path / relpath

    def commit_git_file(self, relpath: str, content: bytes, message: str) -> str:
        """Commit a file to git itself (not annexed); return the new commit sha."""
        self.write_file(relpath, content)
        self.git("-c", "annex.largefiles=nothing", "add", "--", relpath)
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def read(self, relpath: str) -> bytes:
        return (self.path / relpath).read_bytes()

    def key(self, relpath: str) -> str:
        """The git-annex key of an annexed file (``git annex lookupkey``)."""
        return self.annex("lookupkey", "--", relpath).stdout.strip()

    # content in this repository, looked up by key (works without a work tree file)
    def content_path(self, key: str) -> Path | None:
        result = self.annex("contentlocation", key, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return None
        return self.path / result.stdout.strip()

    def has_key(self, key: str) -> bool:
        return self.content_path(key) is not None

    def key_content(self, key: str) -> bytes:
        path = self.content_path(key)
        assert path is not None, f"{key} is not present in {self.path}"
        return path.read_bytes()

    def present_here(self) -> set[str]:
        """Files of the work tree whose content is here (``git annex find --in here``)."""
        out = self.annex("find", "--in", "here", "--print0").stdout
        return {name for name in out.split("\0") if name}

    def fsck(self, *args: str, timeout: float = DEFAULT_TIMEOUT) -> Result:
        """``git annex fsck ARGS`` (raises if it finds a problem)."""
        return self.annex("fsck", "--quiet", *args, timeout=timeout)

    def fsck_content(self, timeout: float = DEFAULT_TIMEOUT) -> Result:
        """Verify every object this repository holds (by checksum), nothing else.

        ``fsck --all --in here``: the proxy does not know the clients' copies, so a
        plain ``fsck --all`` would report "no known copies" of what a client
        dropped from it. Also asserts that nothing was ever moved to
        ``.git/annex/bad`` and that git's own object store is sound.
        """
        result = self.annex("fsck", "--quiet", "--all", "--in", "here", timeout=timeout)
        bad = self.path / ".git" / "annex" / "bad"
        assert not bad.exists() or not any(bad.iterdir()), (
            f"corrupt content found in {self.path}: {sorted(p.name for p in bad.iterdir())}"
        )
        self.git("fsck", "--no-dangling", "--no-progress", timeout=timeout)
        return result

    def tmp_files(self) -> dict[str, int]:
        """Partial transfers in ``.git/annex/tmp``: name -> size."""
        tmp = self.path / ".git" / "annex" / "tmp"
        if not tmp.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}


class Client(AnnexRepo):
    """A client repository of a torbridge endpoint."""

    @classmethod
    def create(cls, env: AnnexEnv, path: Path, description: str = "client") -> Client:
        repo = cls(env, path)
        repo.init(description)
        return repo

    def link(
        self, address: str, name: str = "hub", *, check: bool = True, timeout: float = 60.0
    ) -> Result:
        """``git annex p2p --link --name NAME`` with the address on stdin."""
        return self.annex(
            "p2p",
            "--link",
            "--name",
            name,
            check=check,
            timeout=timeout,
            input=address.strip() + "\n",
        )

    def remote_uuid(self, name: str) -> str:
        return self.git("config", f"remote.{name}.annex-uuid").stdout.strip()


def whereis_uuids(repo: AnnexRepo, key: str) -> set[str]:
    """UUIDs that ``repo``'s location log says have ``key``."""
    result = repo.annex("whereis", "--json", "--key", key, check=False)
    uuids: set[str] = set()
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            uuids |= {w["uuid"] for w in json.loads(line).get("whereis", [])}
    return uuids


def object_keys(repo: AnnexRepo) -> set[str]:
    """Keys of every object file in ``repo``'s annex (whatever git-annex thinks).

    ``objects/XX/YY/KEY/KEY``; ``KEY.rtl``, ``KEY.rtm``... beside it are lock files.
    """
    objects = repo.path / ".git" / "annex" / "objects"
    if not objects.is_dir():
        return set()
    return {p.name for p in objects.rglob("*") if p.is_file() and p.parent.name == p.name}


def object_contents(repo: AnnexRepo) -> dict[str, bytes]:
    """Every object file in ``repo``'s annex by key, read at once (no git-annex
    call for each key, as ``key_content`` makes)."""
    objects = repo.path / ".git" / "annex" / "objects"
    if not objects.is_dir():
        return {}
    return {
        p.name: p.read_bytes()
        for p in objects.rglob("*")
        if p.is_file() and p.parent.name == p.name
    }
