"""One torbridge daemon under test: its config, its process, its tokens, its log.

:class:`Bridge` writes a config (endpoints, and optional ``[limits]``,
``[tor]`` and other tables), runs ``torbridge --config CFG serve``, manages
tokens, reads ``torbridge status --json`` and the metrics socket, and stops
the daemon checking that it stopped cleanly. The Tor tier's
:class:`~tests.harness.tor.TorBridge` adds only the wait for "torbridge
ready" and the onion.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.harness.annex import AnnexEnv
from tests.harness.process import Result, descendants

ADDRESS_PREFIX = "p2p-annex::torbridge:"

READ_ONLY_TEXT = "this repository is read-only; write access denied"
APPEND_ONLY_TEXT = "this repository is append-only; removal denied"


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


READY_LINE = "torbridge ready"
"""What the daemon logs once every endpoint listens (and its onion is published)."""

TOR_LINE = re.compile(r"tor-annex::([a-z2-7]{56}\.onion):(\d{1,5}):([A-Za-z0-9]+)")
"""One line of ``torbridge token add`` when the daemon has an onion."""


@dataclass(frozen=True)
class TorLine:
    """One line of ``torbridge token add`` with [tor] control set."""

    line: str
    onion: str
    port: int
    token: str


def parse_tor_lines(text: str) -> list[TorLine]:
    found = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        m = TOR_LINE.fullmatch(raw)
        if m is None:
            raise AssertionError(f"not a tor-annex address line: {raw!r}")
        found.append(TorLine(raw, m.group(1), int(m.group(2)), m.group(3)))
    return found


TomlValue = str | os.PathLike[str] | bool | int | float


def toml_value(value: TomlValue) -> str:
    """A TOML value: a whole float reads as an integer (``30``, not ``30.0``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return toml_str(value)


class Bridge:
    """One torbridge daemon: config, process, tokens, status, log.

    ``limits`` becomes the ``[limits]`` table, ``tor`` the ``[tor]`` table
    (``socks`` for tor-annex nodes, ``control`` to publish an onion...),
    ``tables`` any other (``{"balance": {...}}``); the ``[tor]`` table comes
    last, so a subclass may append keys to it. Change them and call
    :meth:`write_config` (or :meth:`set_limits`) before a (re)start.
    """

    def __init__(
        self,
        env: AnnexEnv,
        repository: Path,
        workdir: Path,
        exposes: Iterable[Expose] = (Expose(),),
        *,
        limits: Mapping[str, float] | None = None,
        tor: Mapping[str, TomlValue] | None = None,
        tables: Mapping[str, Mapping[str, TomlValue]] | None = None,
    ) -> None:
        self.env = env
        self.repository = repository
        self.workdir = workdir
        self.exposes = list(exposes)
        self.limits: dict[str, float] = dict(limits or {})
        self.tor: dict[str, TomlValue] = dict(tor or {})
        self.tables: dict[str, dict[str, TomlValue]] = {
            name: dict(table) for name, table in (tables or {}).items()
        }
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
        tables: list[tuple[str, Mapping[str, TomlValue]]] = [
            ("limits", self.limits),
            *self.tables.items(),
            ("tor", self.tor),
        ]
        for name, table in tables:
            if table:
                lines += ["", f"[{name}]"]
                lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        return "\n".join(lines) + "\n"

    def set_limits(self, **limits: float) -> None:
        """Add to the ``[limits]`` table (of a daemon not started yet, or to reload)."""
        self.limits.update(limits)
        self.write_config()

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
        return self.helpers(*SESSION_HELPERS)

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

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon never started"
        return self.proc.pid

    def helpers(self, *words: str) -> list[str]:
        """Command lines of the daemon's live descendants that contain one of ``words``."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [cmd for _pid, cmd in descendants(self.proc.pid) if any(w in cmd for w in words)]

    def process_tree(self) -> list[int]:
        """The daemon's pid and its live descendants'."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *(pid for pid, _ in descendants(self.proc.pid))]

    # status
    def proc_status(self) -> dict[str, int]:
        """VmRSS, VmHWM, ... of the daemon process in KiB (``/proc/PID/status``)."""
        return proc_status_kib(self.pid)

    def rss_kib(self) -> int:
        return self.proc_status().get("VmRSS", 0)

    def status(self) -> dict[str, object]:
        """``torbridge status --json``."""
        snapshot: dict[str, object] = json.loads(self.cli("status", "--json").stdout)
        return snapshot

    def sessions(self) -> list[dict[str, Any]]:
        """The sessions in flight, as ``torbridge status --json`` lists them."""
        sessions = self.status()["sessions"]
        assert isinstance(sessions, list)
        return sessions

    def totals(self) -> dict[str, int]:
        totals = self.status()["totals"]
        assert isinstance(totals, dict)
        return {str(k): int(v) for k, v in totals.items()}

    def metrics(self) -> dict[str, float]:
        """The samples of ``<state_dir>/metrics.sock`` (Prometheus text over HTTP)."""
        return read_metrics(self.state_dir / "metrics.sock")

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


def proc_status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0])
    return out


def read_metrics(path: Path, timeout: float = 10.0) -> dict[str, float]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (chunk := s.recv(65536)):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK"), head
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
