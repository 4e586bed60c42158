"""One tor process of the private network, and the only command line tor
runs with here (``tor_command``: our torrc, an empty defaults file).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stem  # type: ignore[import-untyped]
import stem.connection  # type: ignore[import-untyped]
import stem.control  # type: ignore[import-untyped]

from torbridge.testnet.torrc_safety import LOOPBACK, TorTestNetError

TOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}

# SIGTERM, then SIGKILL after this long. A tor exits within ~0.1 s, except
# that tor 0.4.9 can deadlock in its exit path (tor_free_all ->
# cpuworker_free_all) when stopped while its worker threads are busy, e.g.
# an authority just after publishing a consensus.
STOP_GRACE = 1.0


def tor_command(torrc: Path, empty_file: Path, *args: str) -> list[str]:
    """The only way tor runs here: our torrc, an empty defaults file."""
    tor = shutil.which("tor") or "tor"
    return [tor, "--defaults-torrc", str(empty_file), "-f", str(torrc), *args]


@dataclass
class TorProcess:
    """One tor we started. ``socks`` is "127.0.0.1:PORT" for client tors.

    Our own control connection to it (``_monitor``) owns it: stem sends
    TAKEOWNERSHIP, so the tor exits when that connection closes (or when we
    die). Connections from controller() do not own it.
    """

    name: str
    datadir: Path
    torrc: Path
    process: subprocess.Popen[bytes]
    control_port: int
    cookie_path: Path
    socks: str | None
    role: str = "client"  # authority, relay, client, service
    or_port: int | None = None
    _monitor: Any = field(default=None, init=False, repr=False)  # our own stem Controller
    _controllers: list[Any] = field(default_factory=list, init=False, repr=False)
    _hs_events: list[tuple[str, str, str, str]] = field(
        default_factory=list, init=False, repr=False
    )
    _hs_changed: threading.Condition = field(
        default_factory=threading.Condition, init=False, repr=False
    )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def control(self) -> str:
        return f"{LOOPBACK}:{self.control_port}"

    def controller(self) -> stem.control.Controller:
        """A new authenticated (cookie) control connection; close it when done
        (stop() closes any still open). Ephemeral onion services made through
        it live as long as it does."""
        c = stem.control.Controller.from_port(address=LOOPBACK, port=self.control_port)
        try:
            c.authenticate()
        except BaseException:
            c.close()
            raise
        self._controllers.append(c)
        return c

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        for name in ("stdout.log", "notice.log"):
            with contextlib.suppress(OSError):
                text += (self.datadir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _bootstrap_progress(self) -> int:
        try:
            phase = self._monitor.get_info("status/bootstrap-phase")
        except (stem.ControllerError, AttributeError):
            return 0
        match = re.search(r"PROGRESS=(\d+)", phase)
        return int(match.group(1)) if match else 0

    def _on_hs_desc(self, event: Any) -> None:
        # HS_DESC <action> <address> <auth> <hsdir> ...
        parts = str(event).split()
        if len(parts) < 5:
            return
        fingerprint = re.search(r"[0-9A-Fa-f]{40}", parts[4])
        reason = next((p for p in parts[5:] if p.startswith("REASON=")), "")
        with self._hs_changed:
            self._hs_events.append(
                (parts[1], parts[2], fingerprint.group(0) if fingerprint else parts[4], reason)
            )
            self._hs_changed.notify_all()

    def connect_monitor(self, deadline: float, check: Callable[[], None]) -> None:
        """Our own control connection to tor (bootstrap, consensus, HS_DESC).
        ``check`` raises if the network went wrong meanwhile."""
        while True:
            check()
            try:
                c = stem.control.Controller.from_port(address=LOOPBACK, port=self.control_port)
            except stem.SocketError:
                c = None
            if c is not None:
                try:
                    # The first connection to authenticate owns the tor: stem
                    # sends TAKEOWNERSHIP when __OwningControllerProcess is us.
                    c.authenticate()
                    if self.role in ("client", "service"):
                        c.add_event_listener(self._on_hs_desc, stem.control.EventType.HS_DESC)
                    self._monitor = c
                    return
                except stem.connection.AuthenticationFailure:
                    c.close()  # the cookie not written yet: retry
                except BaseException:
                    c.close()
                    raise
            if time.monotonic() > deadline:
                raise TorTestNetError(
                    f"tor {self.name}: no control connection on {self.control}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_for_upload(
        self, onion: str, timeout: float, check: Callable[[], None], since: int = 0
    ) -> None:
        """TestNet.wait_for_descriptor, once this tor is known to be monitored:
        an upload of ``onion`` went through and none is in flight, counting
        only the HS_DESC events after the first ``since`` ones."""
        address = onion.removesuffix(".onion")
        deadline = time.monotonic() + timeout
        failures: list[str] = []
        while True:
            check()
            with self._hs_changed:
                pending: dict[str, int] = {}
                uploaded = 0
                failures = []
                for action, addr, hsdir, reason in self._hs_events[since:]:
                    if addr != address:
                        continue
                    if action == "UPLOAD":
                        pending[hsdir] = pending.get(hsdir, 0) + 1
                    elif action in ("UPLOADED", "FAILED"):
                        pending[hsdir] = pending.get(hsdir, 0) - 1
                        uploaded += action == "UPLOADED"
                        if action == "FAILED":
                            failures.append(f"{hsdir[:8]} {reason}".strip())
                if uploaded and all(n <= 0 for n in pending.values()):
                    return
                if time.monotonic() > deadline:
                    break
                self._hs_changed.wait(timeout=0.2)
        raise TorTestNetError(
            f"descriptor of {address}.onion not uploaded by {self.name} in {timeout:.0f}s"
            + (f" (failed: {', '.join(failures)})" if failures else "")
            + f"\n{self.log_tail()}"
        )

    def _close_controllers(self) -> None:
        for c in [*self._controllers, self._monitor]:
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._controllers.clear()
        self._monitor = None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            ports.append(s.getsockname()[1])
    return ports
