"""End-to-end helpers: the real, unmodified git-annex against a running torbridge.

Everything here is synchronous and blocking on purpose: the daemon under test
is a separate process and the clients are real git/git-annex processes, so a
test reads like the shell session it replaces. Every subprocess has a timeout
(a hang is a failure, never a stuck test run), and every failure carries the
command's stdout and stderr.

Pieces:
- :class:`AnnexEnv`: an isolated HOME (own ``.gitconfig``), a bin dir first on
  PATH with ``git-remote-p2p-annex`` -> the real git-annex multi-call binary,
  then the directory of the ``torbridge`` console scripts.
- :class:`AnnexRepo` / :class:`Client`: a git-annex repository (the proxy or a
  client) with helpers to add files, link a remote, look up keys.
- :class:`Bridge`: writes a config, runs ``torbridge --config CFG serve``,
  manages tokens, stops the daemon and checks that it stopped cleanly.
- :class:`RawSession`: a plain blocking unix-socket client for wire-level tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


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

TRACE = bool(os.environ.get("TORBRIDGE_E2E_TRACE"))
"""Print every command with its run time (see with ``pytest -s``)."""

DEFAULT_TIMEOUT = 120.0
"""Seconds any one command may take unless the caller says otherwise."""

ADDRESS_PREFIX = "p2p-annex::torbridge:"

READ_ONLY_TEXT = "this repository is read-only; write access denied"
APPEND_ONLY_TEXT = "this repository is append-only; removal denied"

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


# --- running commands ----------------------------------------------------------


class CommandError(AssertionError):
    """A command failed (or timed out); the message has its full output."""

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Result:
    args: list[str]
    cwd: Path | None
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    stdout_bytes: bytes = field(repr=False, default=b"")

    @property
    def output(self) -> str:
        """stdout and stderr together, for "the message appears somewhere" checks."""
        return self.stdout + self.stderr

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}   (cwd={self.cwd}, exit {self.returncode}, "
            f"{self.elapsed:.1f}s)\n"
            f"--- stdout ---\n{self.stdout.rstrip()}\n"
            f"--- stderr ---\n{self.stderr.rstrip()}\n"
        )


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path | None = None,
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run a command, capture its output, raise :class:`CommandError` on failure.

    The command runs in its own process group: on timeout the whole group
    (git-annex, its transport program, git) is killed, and the error message
    holds whatever output there was.
    """
    args = [os.fspath(c) for c in cmd]
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = b"", b"(output lost: pipes held open by a surviving process)"
        result = Result(
            args, cwd, -9, _decode(out), _decode(err), time.monotonic() - start, out or b""
        )
        raise CommandError(
            f"command timed out after {timeout:.0f}s (a hang):\n{result.describe()}", result
        ) from None
    finally:
        # Kill leftovers of the group (a transport program that outlived
        # git-annex, say); harmless when the group is already gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    result = Result(
        args, cwd, proc.returncode, _decode(out), _decode(err), time.monotonic() - start, out
    )
    if TRACE:
        print(f"[e2e {result.elapsed:6.2f}s exit {result.returncode}] {' '.join(args)}")
    if check and result.returncode != 0:
        raise CommandError(f"command failed:\n{result.describe()}", result)
    return result


# --- the isolated environment ------------------------------------------------------


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


# --- the daemon ----------------------------------------------------------------------


@dataclass(frozen=True)
class Expose:
    name: str = "hub"
    remote: str = "."
    port: int = 5000


@dataclass(frozen=True)
class Address:
    """One line of ``torbridge token add``: ``p2p-annex::torbridge:SOCKET:TOKEN``."""

    line: str
    socket: Path
    token: str

    @classmethod
    def parse(cls, line: str) -> Address:
        line = line.strip()
        assert line.startswith(ADDRESS_PREFIX), f"not a torbridge address: {line!r}"
        rest = line[len(ADDRESS_PREFIX) :]
        sock, sep, token = rest.rpartition(":")
        assert sep and sock and re.fullmatch(r"[A-Za-z0-9]+", token), (
            f"malformed address line: {line!r}"
        )
        return cls(line=line, socket=Path(sock), token=token)

    def __str__(self) -> str:
        return self.line


def toml_str(value: str | os.PathLike[str]) -> str:
    """A TOML basic string."""
    text = os.fspath(value)
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class Bridge:
    """One torbridge daemon: config, process, tokens, log."""

    def __init__(
        self,
        env: AnnexEnv,
        repository: Path,
        workdir: Path,
        exposes: Iterable[Expose] = (Expose(),),
    ) -> None:
        self.env = env
        self.repository = repository
        self.workdir = workdir
        self.exposes = list(exposes)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "torbridge.toml"
        self.state_dir = workdir / "state"
        # AF_UNIX paths are limited to 107 bytes: keep sockets in a short dir.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tb-e2e-", dir="/tmp"))
        self.log_path = workdir / "torbridge.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.verbose = False  # serve -v: log at debug level
        self._log_file: IO[bytes] | None = None
        self.write_config()

    # config
    def config_text(self) -> str:
        lines = [
            f"repository = {toml_str(self.repository)}",
            f"state_dir  = {toml_str(self.state_dir)}",
            f"socket_dir = {toml_str(self.socket_dir)}",
        ]
        for ex in self.exposes:
            lines += [
                "",
                "[[expose]]",
                f"name   = {toml_str(ex.name)}",
                f"remote = {toml_str(ex.remote)}",
                f"port   = {ex.port}",
            ]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def socket_path(self, name: str | None = None) -> Path:
        return self.socket_dir / f"{name or self.exposes[0].name}.sock"

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> Result:
        """``torbridge --config CFG ARGS...``"""
        return self.env.run(
            ["torbridge", "--config", str(self.config_path), *args],
            self.workdir,
            check=check,
            timeout=timeout,
        )

    # process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or not self.running, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._log_file = log
        self.returncode = None
        self.proc = subprocess.Popen(
            [
                "torbridge",
                *(["-v"] if self.verbose else []),
                "--config",
                str(self.config_path),
                "serve",
            ],
            cwd=self.workdir,
            env=self.env.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        sockets = [self.socket_path(ex.name) for ex in self.exposes]
        while True:
            if all(_is_listening(s) for s in sockets):
                return
            code = self.proc.poll()
            if code is not None:
                self.returncode = code
                self._close_log()
                raise AssertionError(
                    f"torbridge serve exited with {code} before listening:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"torbridge serve did not listen on {sockets} within {timeout}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def session_processes(self) -> list[str]:
        """Command lines of the per-session helpers the daemon runs right now.

        (``git-annex-shell p2pstdio``, ``git upload-pack``/``receive-pack``,
        found among the daemon's descendants through /proc.)
        """
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [
            cmd
            for _pid, cmd in descendants(self.proc.pid)
            if any(w in cmd for w in SESSION_HELPERS)
        ]

    def wait_idle(self, timeout: float = 10.0) -> list[str]:
        """Wait for every session helper to exit; the ones still there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.assert_alive()
            left = self.session_processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def assert_idle(self, timeout: float = 10.0) -> None:
        left = self.wait_idle(timeout)
        assert not left, f"session processes still running {timeout}s after the end: {left}"

    def assert_alive(self, grace: float = 0.0) -> None:
        """The daemon is running (still, after ``grace`` seconds)."""
        assert self.proc is not None, "daemon never started"
        code = self.proc.poll()
        if code is None and grace > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=grace)
        assert code is None, f"the daemon died (exit {code}):\n{self.log()}"

    def stop(self, timeout: float = 15.0, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (or ``sig``); the daemon must exit 0 in time and remove its sockets."""
        assert self.proc is not None, "daemon never started"
        died = self.proc.poll()
        if died is not None:
            self._close_log()
            raise AssertionError(
                f"the daemon had died (exit {died}) before the stop:\n{self.log()}"
            )
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"torbridge did not exit within {timeout}s of {sig.name}:\n{self.log()}"
            ) from None
        finally:
            self._close_log()
        self.returncode = code
        assert code == 0, f"torbridge exited with {code} after {sig.name}:\n{self.log()}"
        for ex in self.exposes:
            sock = self.socket_path(ex.name)
            assert not sock.exists(), f"{sock} left behind after a clean stop"

    def kill(self) -> None:
        """Forceful cleanup of the daemon and anything it started."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.returncode = self.proc.wait(timeout=10)
        self._close_log()

    def close(self) -> None:
        """Teardown: kill whatever is left, remove the socket dir."""
        self.kill()
        if self.proc is not None:
            # The daemon's children (git-annex-shell, git) share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _close_log(self) -> None:
        log = self._log_file
        self._log_file = None
        if log is not None:
            log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon log)"

    # tokens
    def add_token_lines(self, name: str, mode: str = "rw") -> list[Address]:
        result = self.cli("token", "add", name, "--mode", mode)
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        addresses = [Address.parse(ln) for ln in lines]
        assert len(addresses) == len(self.exposes), (
            f"expected one address per endpoint:\n{result.describe()}"
        )
        return addresses

    def add_token(self, name: str, mode: str = "rw", endpoint: str | None = None) -> Address:
        """A new token; the address line of ``endpoint`` (the first one by default)."""
        want = self.socket_path(endpoint)
        for address in self.add_token_lines(name, mode):
            if address.socket == want:
                return address
        raise AssertionError(f"no address for {want} in the output of token add")

    def list_tokens(self) -> str:
        return self.cli("token", "list").stdout

    def revoke(self, name: str) -> Result:
        return self.cli("token", "revoke", name)


SESSION_HELPERS = ("p2pstdio", "upload-pack", "receive-pack")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The state and ppid follow the ")" that ends the command name.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        cmdlines[child] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, cmdlines[child]))
            todo.append(child)
    return found


def _is_listening(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


# --- the wire --------------------------------------------------------------------------


class SessionClosed(EOFError):
    """The peer closed the connection."""


class RawSession:
    """A blocking unix-socket client speaking the P2P protocol by hand."""

    def __init__(self, path: Path | str, connect_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        self.sock.connect(self.path)
        self.buf = bytearray()
        self.eof = False
        self.client_uuid = str(uuid.uuid4())

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # sending
    def send_raw(self, data: bytes, *, may_close: bool = False) -> None:
        """Send bytes; with ``may_close`` the daemon hanging up meanwhile is fine."""
        self.sock.settimeout(30.0)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if not may_close:
                raise

    def send_line(self, line: str | bytes) -> None:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send_raw(data + b"\n")

    def send_data(self, payload: bytes) -> None:
        """``DATA n`` and the payload in one write."""
        self.send_raw(b"DATA %d\n" % len(payload) + payload)

    # receiving
    def _fill(self, deadline: float) -> None:
        """Receive at least one more chunk or raise."""
        if self.eof:
            raise SessionClosed("connection closed by the daemon")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the daemon in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            raise TimeoutError("no data from the daemon in time") from None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise SessionClosed("connection closed by the daemon")
        self.buf += chunk

    def read_line(self, timeout: float = 10.0) -> str:
        """The next line, without ``\\n`` (and ``\\r``), decoded as UTF-8."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line.rstrip(b"\r").decode("utf-8", errors="replace")
            try:
                self._fill(deadline)
            except SessionClosed:
                if self.buf:
                    raise SessionClosed(
                        f"connection closed after a partial line {bytes(self.buf)[:200]!r}"
                    ) from None
                raise

    def read_exact(self, n: int, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_data(self, timeout: float = 30.0) -> bytes:
        """A ``DATA n`` line and its n bytes."""
        line = self.read_line(timeout)
        m = re.fullmatch(r"DATA (\d+)", line)
        assert m, f"expected DATA n, got {line!r}"
        return self.read_exact(int(m.group(1)), timeout)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` for the daemon to close; True if it did.

        Data that arrives meanwhile is kept in the buffer (readable later).
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            try:
                self._fill(deadline)
            except SessionClosed:
                return True
            except TimeoutError:
                return False
        return True

    def assert_closed(self, timeout: float = 5.0) -> None:
        assert self.is_closed(timeout), (
            f"the daemon kept the connection open for {timeout}s "
            f"(unread: {bytes(self.buf)[:200]!r})"
        )

    def pending(self, wait: float = 0.0) -> bytes:
        """Whatever has arrived (after waiting up to ``wait`` s), without blocking."""
        end = time.monotonic() + wait
        while True:
            r, _, _ = select.select([self.sock], [], [], max(0.0, end - time.monotonic()))
            if not r:
                break
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        data = bytes(self.buf)
        self.buf.clear()
        return data

    # protocol steps
    def auth(self, token: str, server_uuid: str | None = None) -> str:
        """``AUTH clientuuid token``; returns the reply line."""
        self.send_line(f"AUTH {self.client_uuid} {token}")
        reply = self.read_line()
        if server_uuid is not None:
            assert reply == f"AUTH-SUCCESS {server_uuid}", f"AUTH answered {reply!r}"
        return reply

    def version(self, n: int = 4) -> str:
        self.send_line(f"VERSION {n}")
        return self.read_line()

    def expect(self, want: str, timeout: float = 10.0) -> None:
        got = self.read_line(timeout)
        assert got == want, f"expected {want!r}, got {got!r}"
