"""The socket audit: which IP sockets our tors hold (read from /proc, no
subprocess), and the watchdog thread that SIGKILLs every one of them, by
PID, as soon as one has an address off loopback (or cannot be watched).

The watchdog runs only while a network is up: ``TestNet.start()`` starts
it, ``stop()`` stops it. Importing this module starts nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

WATCHDOG_INTERVAL = 1.0


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*" (any address) or garbage
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# The socket tables of /proc/PID/net/ the watchdog reads; packet sockets
# (which bypass IP altogether) are listed separately and are never ours.
INET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6")


@dataclass(frozen=True)
class InetSocket:
    """One IP socket a process holds, as /proc/PID/net/* shows it."""

    pid: int
    table: str  # "tcp", "udp6", ... or "packet"
    local: tuple[str, int]  # (address, port)
    peer: tuple[str, int] | None  # None: no peer (a listener, an unconnected socket)

    @property
    def on_loopback(self) -> bool:
        if self.table == "packet":
            return False
        return _is_loopback(self.local[0]) and (self.peer is None or _is_loopback(self.peer[0]))

    def __str__(self) -> str:
        def show(end: tuple[str, int] | None) -> str:
            if end is None:
                return "*"
            host, port = end
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        return f"{self.table} {show(self.local)} -> {show(self.peer)} (pid {self.pid})"


def _proc_address(field_text: str) -> tuple[str, int]:
    """ "0100007F:1F90" -> ("127.0.0.1", 8080): each 32-bit word is printed in
    host byte order, so packing it natively gives back the network bytes."""
    hex_address, hex_port = field_text.split(":")
    if len(hex_address) not in (8, 32):
        raise ValueError(f"not an address: {field_text!r}")
    raw = b"".join(
        int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder)
        for i in range(0, len(hex_address), 8)
    )
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(hex_port, 16)


def parse_proc_net(text: str) -> dict[int, tuple[tuple[str, int], tuple[str, int] | None]]:
    """A /proc/net/{tcp,tcp6,udp,udp6,raw,raw6} table: inode -> (local, peer).

    ValueError if a line cannot be read (the caller fails closed).
    """
    sockets: dict[int, tuple[tuple[str, int], tuple[str, int] | None]] = {}
    for line in text.splitlines()[1:]:  # the first line is a header
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 10:
            raise ValueError(f"unreadable socket table line: {line!r}")
        local, peer = _proc_address(fields[1]), _proc_address(fields[2])
        # An unspecified peer address with port 0: a listener or an unconnected socket.
        no_peer = peer[1] == 0 and ipaddress.ip_address(peer[0]).is_unspecified
        sockets[int(fields[9])] = (local, None if no_peer else peer)
    return sockets


def _packet_inodes(text: str) -> set[int]:
    """Inodes in /proc/net/packet (its last column)."""
    return {int(line.split()[-1]) for line in text.splitlines()[1:] if line.strip()}


def _socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets among pid's open files; None if pid has exited."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue  # closed since the listing
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _read_table(pid: int, table: str) -> str:
    # A table the kernel does not have (no IPv6, no AF_PACKET) holds no socket.
    try:
        with open(f"/proc/{pid}/net/{table}") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def proc_sockets(pids: Collection[int]) -> list[InetSocket]:
    """Every IP (and packet) socket the processes ``pids`` hold, read from /proc.

    No subprocess: each process's socket inodes (``/proc/PID/fd``) are looked
    up in the socket tables of its own network namespace (``/proc/PID/net``,
    read once per namespace). A process that has exited holds nothing.
    Raises OSError or ValueError when a live process cannot be inspected.
    """
    found: list[InetSocket] = []
    tables_by_netns: dict[int, dict[str, str]] = {}
    for pid in pids:
        # The fds first: a socket they name is in the tables read after, unless
        # it was closed in between (then it is gone, which is as good).
        inodes = _socket_inodes(pid)
        if not inodes:
            continue
        try:
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except FileNotFoundError:
            continue  # exited since
        tables = tables_by_netns.get(netns)
        if tables is None:
            tables = {t: _read_table(pid, t) for t in (*INET_TABLES, "packet")}
            if not os.path.isdir(f"/proc/{pid}"):
                continue  # exited while we read: its tables may be cut short, not the others'
            tables_by_netns[netns] = tables
        for table in INET_TABLES:
            for inode, (local, peer) in parse_proc_net(tables[table]).items():
                if inode in inodes:
                    found.append(InetSocket(pid, table, local, peer))
        for inode in _packet_inodes(tables["packet"]) & inodes:
            found.append(InetSocket(pid, "packet", ("*", inode), None))
    return found


def unsafe_sockets(pids: Collection[int]) -> list[str]:
    """The sockets of ``pids`` with a local or peer address off loopback."""
    return [str(s) for s in proc_sockets(pids) if not s.on_loopback]


class Watchdog:
    """A thread that SIGKILLs every process we started (by PID) as soon as one
    of them has a socket off loopback, then reports it to on_violation.

    ``sample`` lists the sockets of the given PIDs (``proc_sockets``: /proc,
    no subprocess that a loaded machine could time out). Three failed
    samples in a row count as a violation too: we do not run tors we cannot
    watch.
    """

    def __init__(
        self,
        processes: Callable[[], Iterable[subprocess.Popen[bytes]]],
        on_violation: Callable[[str], None],
        *,
        interval: float = WATCHDOG_INTERVAL,
        sample: Callable[[Collection[int]], list[InetSocket]] = proc_sockets,
    ) -> None:
        self._processes = processes
        self._on_violation = on_violation
        self._interval = interval
        self._sample = sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tor-testnet-watchdog", daemon=True)
        self.checks = 0
        self.violation: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)

    def check_once(self) -> bool:
        """One inspection; False (and everything killed) on a violation."""
        live = [p for p in self._processes() if p.poll() is None]
        if not live:
            return True
        pids = {p.pid for p in live}  # not reaped: no other process can have these PIDs
        failures = 0
        while True:
            try:
                sockets = self._sample(pids)
                break
            except (OSError, ValueError) as e:
                failures += 1
                if failures >= 3:
                    return self._violate(live, f"cannot list sockets ({e})")
                time.sleep(0.1)
        self.checks += 1
        bad = [str(s) for s in sockets if s.pid in pids and not s.on_loopback]
        return self._violate(live, "non-loopback socket: " + "; ".join(bad)) if bad else True

    def _violate(self, live: list[subprocess.Popen[bytes]], why: str) -> bool:
        for p in live:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
        self.violation = why
        self._on_violation(why)
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.check_once():
                return
            self._stop.wait(self._interval)
