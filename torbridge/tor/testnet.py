"""A private Tor network on 127.0.0.1, for tests and demos.

Three directory authorities and two relays vote a consensus among
themselves in a few seconds; client tors (a SOCKS port) and service tors
(onion services over the control port) are started on top of it. No tor
started here can reach the public Tor network:

* every torrc starts with the same safety block (``_safety_lines``): its own
  ``DirAuthority`` lines on 127.0.0.1, ``UseDefaultFallbackDirs 0``,
  ``TestingTorNetwork 1``; every listener is bound to 127.0.0.1; relays get
  an empty ``ServerDNSResolvConfFile`` and never exit;
* ``check_torrc_safe`` reads back every torrc before its tor starts, and tor
  always runs as ``tor --defaults-torrc EMPTY -f TORRC``;
* a watchdog thread lists the sockets of our tors every second (from
  /proc/PID/fd and /proc/PID/net) and SIGKILLs all of them, by PID, if one
  has a local or peer address outside loopback, or if it cannot tell (the
  last line of defence, e.g. against an ADD_ONION target or a SETCONF sent
  over a control port);
* every tor is told ``__OwningControllerProcess``, and our first control
  connection to it takes ownership (stem sends TAKEOWNERSHIP): it exits
  when we do.

The API is synchronous (subprocess + stem): call it from a worker thread in
trio code. With cached keys the network is up in ~5 s; a client or service
tor bootstraps in ~1 s more.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import stem  # type: ignore[import-untyped]
import stem.connection  # type: ignore[import-untyped]
import stem.control  # type: ignore[import-untyped]

LOOPBACK = "127.0.0.1"
HOST_SOCKS_PORT = 9050  # the machine's own tor: never ours in the host network namespace
# Onionbalance 0.2.4 needs this many relays with the HSDir flag (every
# authority and relay here has it): with fewer its hash ring never completes.
ONIONBALANCE_MIN_HSDIRS = 7
TOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
MARKER = ".torbridge-testnet"  # marks a directory as ours (safe to wipe and reuse)

# Voting schedule (seconds). Until the first consensus the authorities vote
# on a 5 s grid aligned to UTC midnight, shifted by TestingV3AuthVotingStartOffset.
INITIAL_VOTING_INTERVAL = 5
VOTING_INTERVAL = 10
VOTE_DELAY = 2
DIST_DELAY = 2
INTERVALS_VALID = 2

# SIGTERM, then SIGKILL after this long. A tor exits within ~0.1 s, except
# that tor 0.4.9 can deadlock in its exit path (tor_free_all ->
# cpuworker_free_all) when stopped while its worker threads are busy, e.g.
# an authority just after publishing a consensus.
STOP_GRACE = 1.0
WATCHDOG_INTERVAL = 1.0
AUTH_CERT_MIN_VALIDITY = datetime.timedelta(days=7)

_NICKNAME = re.compile(r"[A-Za-z0-9]{1,19}")


class TorTestNetError(Exception):
    """The private network could not be started, or something in it went wrong."""


# --------------------------------------------------------------------------
# torrc safety check


_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOPBACK_LISTEN = re.compile(r"127\.0\.0\.1:(?:\d{1,5}|auto)")
_LOOPBACK_HOSTPORT = re.compile(r"127\.0\.0\.1:\d{1,5}")

# Options that point tor at other relays, directories or proxies: never allowed.
_FORBIDDEN = frozenset(
    {
        "alternatedirauthority",
        "alternatebridgeauthority",
        "fallbackdir",
        "bridge",
        "clienttransportplugin",
        "servertransportplugin",
        "socks4proxy",
        "socks5proxy",
        "httpproxy",
        "httpsproxy",
        "tcpproxy",
    }
)
# Options allowed only with exactly this value (every occurrence).
_FIXED_VALUE = {
    "testingtornetwork": "1",
    "usedefaultfallbackdirs": "0",
    "usebridges": "0",
    "exitrelay": "0",
    "runasdaemon": "0",  # we track tor by the PID we started
}
_LOOPBACK_ONLY = frozenset(
    {
        "address",
        "outboundbindaddress",
        "outboundbindaddressor",
        "outboundbindaddressexit",
        "outboundbindaddresspt",
    }
)
_LISTENERS = frozenset(
    prefix + name
    for prefix in ("", "__")
    for name in (
        "socksport",
        "controlport",
        "orport",
        "dirport",
        "dnsport",
        "extorport",
        "httptunnelport",
        "metricsport",
        "natdport",
        "transport",
    )
)
# Options ending in "Port" that are not listeners.
_NOT_LISTENERS = frozenset({"clientpreferipv6orport", "clientpreferipv6dirport"})
# tor's own aliases (config.c option_abbrevs_) that lead to a sensitive option.
_ALIASES = {"dirserver": "dirauthority", "resolvconf": "serverdnsresolvconffile"}
_SENSITIVE = (
    _FORBIDDEN
    | _FIXED_VALUE.keys()
    | _LOOPBACK_ONLY
    | _LISTENERS
    | {"dirauthority", "hiddenserviceport", "serverdnsresolvconffile"}
)


def _option_name(keyword: str) -> str:
    """The option a torrc keyword means, lower-cased.

    tor accepts any unambiguous prefix of an option name ("SocksPor" is
    SocksPort, "TestingTorNet 0" turns TestingTorNetwork off), so a keyword
    that abbreviates a safety-relevant option is refused outright.
    """
    if not _KEYWORD.fullmatch(keyword):
        raise TorTestNetError(f"unsupported torrc keyword {keyword!r}")
    name = keyword.lower()
    name = _ALIASES.get(name, name)
    if name in _SENSITIVE or name.endswith("port"):
        return name
    if any(option.startswith(name) for option in _SENSITIVE):
        raise TorTestNetError(
            f"{keyword!r} abbreviates a safety-relevant option: write the option in full"
        )
    return name


def _check_empty_file(value: str) -> None:
    try:
        empty = os.path.getsize(value) == 0
    except OSError:
        empty = False
    if not empty:
        raise TorTestNetError(f"{value!r} is not an empty file (the system resolver is not ours)")


def _check_dir_authority(value: str) -> None:
    tokens = value.split()
    addresses = [t for t in tokens if ":" in t and "=" not in t]
    if len(addresses) != 1 or not _LOOPBACK_HOSTPORT.fullmatch(addresses[0]):
        raise TorTestNetError(f"DirAuthority not on {LOOPBACK}: {value!r}")
    if any(t.lower().startswith("ipv6=") for t in tokens):
        raise TorTestNetError(f"DirAuthority with an IPv6 address: {value!r}")


def _check_listener(keyword: str, value: str) -> bool:
    """Refuse a listener off loopback; True if it actually listens."""
    first = value.split()[0] if value.split() else ""
    if first == "0":
        return False
    if first.startswith("unix:") or _LOOPBACK_LISTEN.fullmatch(first):
        return True
    raise TorTestNetError(f"{keyword} must be {LOOPBACK}:PORT, unix:PATH or 0, not {value!r}")


def _check_hidden_service_port(value: str) -> None:
    tokens = value.split()
    if not 1 <= len(tokens) <= 2 or not tokens[0].isdigit():
        raise TorTestNetError(f"malformed HiddenServicePort {value!r}")
    if len(tokens) == 1:
        return  # target defaults to 127.0.0.1:VIRTPORT
    target = tokens[1]
    if target.isdigit() or target.startswith("unix:") or _LOOPBACK_HOSTPORT.fullmatch(target):
        return
    raise TorTestNetError(f"HiddenServicePort target must be on {LOOPBACK} or unix:, not {value!r}")


def check_torrc_safe(text: str) -> None:
    """Raise TorTestNetError unless the torrc text is safe.

    Safe: ``TestingTorNetwork 1``, ``UseDefaultFallbackDirs 0``, at least one
    DirAuthority and every DirAuthority on 127.0.0.1, every *Port line
    (SocksPort, ControlPort, ORPort, DirPort, HiddenServicePort targets...)
    bound to 127.0.0.1, a unix: path, or 0; no bridges, fallback dirs,
    proxies or transport plugins; Address/OutboundBindAddress only
    127.0.0.1; a relay (ORPort) has ExitRelay 0 and an empty file as
    ServerDNSResolvConfFile (the only check that reads the disk).
    Continuation lines, %include, +/- prefixes and abbreviated option names
    are refused. Called before every tor start.
    """
    seen: dict[str, int] = {}
    relay = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            if raw.rstrip().endswith("\\"):
                raise TorTestNetError("continuation lines are not allowed")
            keyword = line.split(None, 1)[0]
            value = line[len(keyword) :].strip()
            name = _option_name(keyword)
            seen[name] = seen.get(name, 0) + 1
            if name in _FORBIDDEN:
                raise TorTestNetError(f"{keyword} is not allowed in a private network")
            if name in _FIXED_VALUE and value != _FIXED_VALUE[name]:
                raise TorTestNetError(f"{keyword} must be {_FIXED_VALUE[name]}, not {value!r}")
            if name in _LOOPBACK_ONLY and value != LOOPBACK:
                raise TorTestNetError(f"{keyword} must be {LOOPBACK}, not {value!r}")
            if name == "serverdnsresolvconffile":
                _check_empty_file(value)
            if name == "dirauthority":
                _check_dir_authority(value)
            elif name == "hiddenserviceport":
                _check_hidden_service_port(value)
            elif name.endswith("port") and name not in _NOT_LISTENERS:
                listens = _check_listener(keyword, value)
                relay = relay or (listens and name in ("orport", "__orport"))
        except TorTestNetError as e:
            raise TorTestNetError(f"unsafe torrc, line {lineno} ({raw.strip()!r}): {e}") from None
    required = [
        ("testingtornetwork", "TestingTorNetwork 1"),
        ("usedefaultfallbackdirs", "UseDefaultFallbackDirs 0"),
        ("dirauthority", f"a DirAuthority on {LOOPBACK}"),
    ]
    if relay:
        required += [
            ("serverdnsresolvconffile", "ServerDNSResolvConfFile (an empty file)"),
            ("exitrelay", "ExitRelay 0"),
        ]
    missing = [wanted for name, wanted in required if not seen.get(name)]
    if missing:
        raise TorTestNetError(f"unsafe torrc: missing {', '.join(missing)}")


# --------------------------------------------------------------------------
# torrc builders: one per role, the safety lines in one place


@dataclass(frozen=True)
class Authority:
    """What every torrc of the network needs to know about one authority."""

    nickname: str
    or_port: int
    dir_port: int
    fingerprint: str  # RSA identity (relay fingerprint)
    v3ident: str  # v3 authority identity (from its certificate)

    def line(self) -> str:
        return (
            f"DirAuthority {self.nickname} orport={self.or_port} no-v2 v3ident={self.v3ident}"
            f" {LOOPBACK}:{self.dir_port} {self.fingerprint}"
        )


# Only so that a keygen torrc validates (`tor --list-fingerprint` opens no connection).
PLACEHOLDER_AUTHORITY = Authority("placeholder", 1, 1, "0" * 40, "0" * 40)


@dataclass(frozen=True)
class Network:
    """What every torrc of one network shares."""

    authorities: tuple[Authority, ...]
    empty_file: Path
    owner_pid: int


@dataclass(frozen=True)
class Node:
    """One tor's own place: nickname, data directory, control port."""

    nickname: str
    datadir: Path
    control_port: int


def _safety_lines(net: Network, *, relay: bool) -> list[str]:
    """The lines that keep a tor off the public network. Every torrc has them."""
    lines = [
        "TestingTorNetwork 1",
        "UseDefaultFallbackDirs 0",
        *(a.line() for a in net.authorities),  # replace tor's built-in authorities
    ]
    if relay:
        lines += [
            f"Address {LOOPBACK}",
            "AddressDisableIPv6 1",
            "ExitRelay 0",
            "ExitPolicy reject *:*",
            f"ServerDNSResolvConfFile {net.empty_file}",  # no nameserver => 127.0.0.1
            "ServerDNSDetectHijacking 0",
        ]
    return lines


def _common_lines(net: Network, node: Node) -> list[str]:
    d = node.datadir
    return [
        f"DataDirectory {d}",
        f"Nickname {node.nickname}",
        f"Log notice file {d / 'notice.log'}",
        "ClientUseIPv6 0",
        "SafeLogging 0",
        "RunAsDaemon 0",
        "ShutdownWaitLength 0",
        f"GeoIPFile {net.empty_file}",  # parsing the real ones costs ~1 s CPU each
        f"GeoIPv6File {net.empty_file}",
        f"ControlPort {LOOPBACK}:{node.control_port}",
        "CookieAuthentication 1",
        f"CookieAuthFile {d / 'control_auth_cookie'}",
        f"__OwningControllerProcess {net.owner_pid}",
    ]


def _relay_lines(or_port: int) -> list[str]:
    return [
        "SocksPort 0",
        f"ORPort {LOOPBACK}:{or_port}",
        "AssumeReachable 1",  # no self-test: publish the descriptor at once
    ]


def _torrc(role: str, *blocks: Sequence[str]) -> str:
    lines = [f"# torbridge testnet: {role}"]
    for block in blocks:
        lines += block
    return "\n".join(lines) + "\n"


def keygen_torrc(datadir: Path, nickname: str, or_port: int, empty_file: Path) -> str:
    """For ``tor --list-fingerprint`` (makes relay keys, opens no connection)."""
    net = Network((PLACEHOLDER_AUTHORITY,), empty_file, os.getpid())
    return _torrc(
        "keygen",
        _safety_lines(net, relay=True),
        [f"DataDirectory {datadir}", f"Nickname {nickname}"],
        _relay_lines(or_port),
    )


def authority_torrc(
    net: Network,
    node: Node,
    *,
    or_port: int,
    dir_port: int,
    vote_offset: int,
    bandwidth_file: Path,
) -> str:
    guards = ",".join(f"${a.fingerprint}" for a in net.authorities)
    return _torrc(
        "authority",
        _safety_lines(net, relay=True),
        _common_lines(net, node),
        _relay_lines(or_port),
        [
            f"DirPort {LOOPBACK}:{dir_port}",
            "AuthoritativeDirectory 1",
            "V3AuthoritativeDirectory 1",
            f"TestingV3AuthInitialVotingInterval {INITIAL_VOTING_INTERVAL}",
            f"TestingV3AuthInitialVoteDelay {VOTE_DELAY}",
            f"TestingV3AuthInitialDistDelay {DIST_DELAY}",
            f"TestingV3AuthVotingStartOffset {vote_offset}",
            f"V3AuthVotingInterval {VOTING_INTERVAL}",
            f"V3AuthVoteDelay {VOTE_DELAY}",
            f"V3AuthDistDelay {DIST_DELAY}",
            f"V3AuthNIntervalsValid {INTERVALS_VALID}",
            # Only the authorities are guards: fresh relays answer 404 for
            # microdescriptors, and a client then backs off for ~10 s.
            f"TestingDirAuthVoteGuard {guards}",
            "TestingDirAuthVoteGuardIsStrict 1",
            "TestingDirAuthVoteHSDir *",
            "AuthDirVoteStableGuaranteeMinUptime 0",  # intro points need Stable
            "AuthDirMaxServersPerAddr 0",
            f"V3BandwidthsFile {bandwidth_file}",
        ],
    )


def relay_torrc(net: Network, node: Node, *, or_port: int) -> str:
    return _torrc(
        "relay", _safety_lines(net, relay=True), _common_lines(net, node), _relay_lines(or_port)
    )


def client_torrc(net: Network, node: Node, *, socks_port: int, extra: Sequence[str] = ()) -> str:
    return _torrc(
        "client",
        _safety_lines(net, relay=False),
        _common_lines(net, node),
        [f"SocksPort {LOOPBACK}:{socks_port} ExtendedErrors", "VanguardsLiteEnabled 0"],
        extra,
    )


def service_torrc(net: Network, node: Node, *, extra: Sequence[str] = ()) -> str:
    return _torrc(
        "onion service",
        _safety_lines(net, relay=False),
        _common_lines(net, node),
        ["SocksPort 0", "VanguardsLiteEnabled 0"],
        extra,
    )


def first_vote_lead() -> int:
    """Seconds between the first vote and its consensus's valid-after time."""
    vote, dist = VOTE_DELAY, DIST_DELAY
    if vote + dist > INITIAL_VOTING_INTERVAL // 2:  # what tor does (voting_schedule.c)
        vote = dist = INITIAL_VOTING_INTERVAL // 4
    return vote + dist


def vote_offset(valid_after: int) -> int:
    """TestingV3AuthVotingStartOffset that makes ``valid_after`` a point of the
    first-round grid; tor votes at the first such point after its start (or
    after the option changes), less first_vote_lead()."""
    midnight = valid_after - valid_after % 86400
    return (valid_after - midnight) % INITIAL_VOTING_INTERVAL


def write_checked_torrc(path: Path, text: str, empty_file: Path) -> None:
    """Write a torrc, then check what is on disk: the file tor will read."""
    path.write_text(text)
    written = path.read_text()
    check_torrc_safe(written)
    if in_host_netns() and re.search(rf"\b127\.0\.0\.1:{HOST_SOCKS_PORT}\b", written):
        raise TorTestNetError(f"port {HOST_SOCKS_PORT} belongs to the machine's own tor")
    if empty_file.stat().st_size != 0:
        raise TorTestNetError(f"{empty_file} should be empty")


def tor_command(torrc: Path, empty_file: Path, *args: str) -> list[str]:
    """The only way tor runs here: our torrc, an empty defaults file."""
    tor = shutil.which("tor") or "tor"
    return [tor, "--defaults-torrc", str(empty_file), "-f", str(torrc), *args]


def in_host_netns() -> bool:
    """True unless we are in a network namespace other than init's (where
    port 9050 would be ours)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True  # cannot tell: assume the host's


# --------------------------------------------------------------------------
# the watchdog


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


# --------------------------------------------------------------------------
# keys


class KeyCache:
    """Relay and authority keys, kept between runs (tor-gencert is slow).

    One directory per node nickname; an authority's entry is used only while
    its certificate has more than a week left.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def restore(self, nickname: str, datadir: Path, *, authority: bool) -> bool:
        src = self.root / nickname
        needed = ["fingerprint", "keys/secret_id_key", "keys/ed25519_master_id_secret_key"]
        if authority:
            needed += ["keys/authority_certificate", "keys/authority_signing_key"]
        if not all((src / name).is_file() for name in needed):
            return False
        if authority and not _certificate_fresh(src / "keys" / "authority_certificate"):
            return False
        shutil.copytree(src / "keys", datadir / "keys", dirs_exist_ok=True)
        shutil.copy(src / "fingerprint", datadir / "fingerprint")
        os.chmod(datadir / "keys", 0o700)
        return True

    def save(self, nickname: str, datadir: Path) -> None:
        with contextlib.suppress(OSError):  # a cache, best effort
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = Path(tempfile.mkdtemp(prefix=f".{nickname}-", dir=self.root))
            try:
                shutil.copytree(datadir / "keys", tmp / "keys")
                shutil.copy(datadir / "fingerprint", tmp / "fingerprint")
                dest = self.root / nickname
                if dest.exists():
                    shutil.rmtree(dest)  # stale (an expiring certificate)
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


def _certificate_fresh(path: Path) -> bool:
    match = re.search(r"^dir-key-expires (\S+ \S+)$", path.read_text(), re.M)
    if match is None:
        return False
    expires = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=datetime.UTC
    )
    return expires - datetime.datetime.now(datetime.UTC) > AUTH_CERT_MIN_VALIDITY


def default_key_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torbridge" / "testnet-keys"


# --------------------------------------------------------------------------
# processes


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


_LIVE: weakref.WeakSet[TestNet] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for net in list(_LIVE):
        with contextlib.suppress(Exception):
            net.stop()


# --------------------------------------------------------------------------
# the network


class TestNet:
    """A private Tor network on 127.0.0.1. Use as a context manager.

    ``start()`` brings up the authorities and relays; ``start_client()`` and
    ``start_service_tor()`` add tors on top. ``stop()`` kills them all (by
    PID) and removes the working directory if we made it; it may be called
    from another thread, and a start() in progress then fails cleanly.
    ``progress`` gets one-line messages (from the watchdog thread too).
    A given ``workdir`` must be empty or an earlier testnet's, and is kept.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        key_cache: Path | None = None,
        progress: Callable[[str], None] | None = None,
        authorities: int = 3,
        relays: int = 2,
    ) -> None:
        if authorities < 1 or authorities + relays < 4:
            raise ValueError("need at least one authority and four relays in all")
        self.n_authorities = authorities
        self.n_relays = relays
        self.key_cache = KeyCache(key_cache or default_key_cache())
        self._requested_workdir = workdir
        self._progress = progress
        self.workdir: Path | None = None
        self.authorities: list[TorProcess] = []
        self.relays: list[TorProcess] = []
        self.tors: list[TorProcess] = []  # every tor started, in order
        self.violation: str | None = None
        self.watchdog: Watchdog | None = None
        self._network: Network | None = None
        self._own_workdir = False
        self._lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._t0 = time.monotonic()
        self._helpers: list[subprocess.Popen[bytes]] = []  # tor-gencert, --list-fingerprint

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> TestNet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        """Authorities and relays; returns once every authority serves a
        consensus listing every relay. On failure everything is stopped."""
        with self._lock:
            if self._started or self._stopped:
                raise TorTestNetError("a TestNet starts once")
            self._started = True
            _LIVE.add(self)
        try:
            with self._stop_means_stopped():
                self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every tor by PID (SIGKILL after a grace), close our control
        connections, remove the workdir if we made it. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            tors, helpers = list(self.tors), list(self._helpers)
        _LIVE.discard(self)
        # Signal first, close our control connections after: the monitor
        # connection owns its tor (stem sends TAKEOWNERSHIP), and a tor told
        # to exit both ways at once can hang on exit.
        processes = [t.process for t in tors] + helpers
        for p in processes:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        killed = 0
        for p in processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed += 1
        for tor in tors:
            tor._close_controllers()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.workdir is not None and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if tors:
            hung = f" ({killed} hung on exit: SIGKILLed)" if killed else ""
            self._say(f"stopped {len(tors)} tor processes{hung}")

    @contextlib.contextmanager
    def _stop_means_stopped(self) -> Iterator[None]:
        """stop() from another thread closes what a waiting loop uses: say so."""
        try:
            yield
        except Exception as e:
            if self._stopped and not isinstance(e, TorTestNetError):
                raise TorTestNetError("the test network was stopped") from e
            raise

    def check(self) -> None:
        """Raise TorTestNetError if the watchdog fired or a tor of ours died."""
        if self.violation is not None:
            raise TorTestNetError(f"safety watchdog killed every tor: {self.violation}")
        if self._stopped:
            raise TorTestNetError("the test network was stopped")
        for tor in self.tors:
            code = tor.process.poll()
            if code is not None:
                raise TorTestNetError(f"tor {tor.name} exited (status {code}):\n{tor.log_tail()}")

    # ---------------------------------------------------------- bring-up
    def _start(self, deadline: float) -> None:
        for tool in ("tor", "tor-gencert"):
            if shutil.which(tool) is None:
                raise TorTestNetError(f"{tool} not found on PATH")
        self._t0 = time.monotonic()
        workdir = self._make_workdir()
        empty = workdir / "empty"
        empty.write_bytes(b"")
        self.watchdog = Watchdog(self._processes, self._on_violation)
        self.watchdog.start()

        names = [f"auth{i}" for i in range(self.n_authorities)]
        names += [f"relay{i}" for i in range(self.n_relays)]
        ports = iter(free_ports(2 * len(names) + self.n_authorities))
        nodes = {n: Node(n, workdir / n, next(ports)) for n in names}
        or_ports = {n: next(ports) for n in names}
        dir_ports = {n: next(ports) for n in names[: self.n_authorities]}
        for node in nodes.values():
            (node.datadir / "keys").mkdir(parents=True, mode=0o700)
            os.chmod(node.datadir, 0o700)
        fingerprints, v3idents = self._make_keys(nodes, or_ports, empty, deadline)

        authorities = tuple(
            Authority(n, or_ports[n], dir_ports[n], fingerprints[n], v3idents[n])
            for n in names[: self.n_authorities]
        )
        self._network = net = Network(authorities, empty, os.getpid())
        bandwidth_file = workdir / "bandwidths"
        bandwidth_file.write_text(
            f"{int(time.time())}\n"
            + "".join(f"node_id=${fingerprints[n]} bw=1000\n" for n in names)
        )
        # The latest first vote the grid allows, ~3 s from now; moved once the
        # descriptors are in (_time_first_vote).
        valid_after = int(time.time()) + INITIAL_VOTING_INTERVAL
        offset = vote_offset(valid_after)
        for name in names:
            node = nodes[name]
            if name in dir_ports:
                text = authority_torrc(
                    net,
                    node,
                    or_port=or_ports[name],
                    dir_port=dir_ports[name],
                    vote_offset=offset,
                    bandwidth_file=bandwidth_file,
                )
                role = "authority"
            else:
                text = relay_torrc(net, node, or_port=or_ports[name])
                role = "relay"
            tor = self._launch(node, text, role=role, or_port=or_ports[name])
            (self.authorities if role == "authority" else self.relays).append(tor)
        self._say(f"{len(names)} tors launched")
        for tor in self.authorities + self.relays:
            self._connect_monitor(tor, deadline)
        self._time_first_vote(valid_after, offset, deadline)
        self._wait_consensus(deadline)

    def _make_workdir(self) -> Path:
        requested = self._requested_workdir
        if requested is None:
            workdir = Path(tempfile.mkdtemp(prefix="torbridge-testnet-"))
            self._own_workdir = True
        else:
            workdir = requested.absolute()
            if workdir.exists() and any(workdir.iterdir()):
                if not (workdir / MARKER).exists():
                    raise TorTestNetError(f"{workdir} is not empty (and not a testnet directory)")
                for child in workdir.iterdir():  # an earlier testnet's: start afresh
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        (workdir / MARKER).write_text("a torbridge private Tor network; safe to delete\n")
        self.workdir = workdir
        self._say(f"working directory {workdir}")
        return workdir

    def _make_keys(
        self, nodes: dict[str, Node], or_ports: dict[str, int], empty: Path, deadline: float
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Relay keys for every node, v3 authority keys for the authorities:
        from the cache, or made in parallel (and cached)."""
        gencert = shutil.which("tor-gencert") or "tor-gencert"
        made: list[str] = []
        jobs: list[tuple[str, subprocess.Popen[bytes]]] = []
        for name, node in nodes.items():
            authority = name.startswith("auth")
            if self.key_cache.restore(name, node.datadir, authority=authority):
                continue
            made.append(name)
            keys = node.datadir / "keys"
            if authority:
                argv = [gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12"]
                argv += ["-i", str(keys / "authority_identity_key")]
                argv += ["-s", str(keys / "authority_signing_key")]
                argv += ["-c", str(keys / "authority_certificate")]
                # stdin: an empty passphrase
                jobs.append((f"tor-gencert for {name}", self._helper(argv, stdin=empty)))
            torrc = node.datadir / "torrc.keygen"
            write_checked_torrc(
                torrc, keygen_torrc(node.datadir, name, or_ports[name], empty), empty
            )
            argv = tor_command(torrc, empty, "--list-fingerprint")
            jobs.append((f"tor --list-fingerprint for {name}", self._helper(argv)))
        if made:
            self._say(f"generating keys for {', '.join(made)} (slow; cached afterwards)")
        else:
            self._say(f"keys for {len(nodes)} tors from {self.key_cache.root}")
        for what, p in jobs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TorTestNetError(f"{what} timed out") from None
            if p.returncode != 0:
                text = out.decode(errors="replace")[-2000:]
                raise TorTestNetError(f"{what} failed (status {p.returncode}):\n{text}")
        fingerprints, v3idents = {}, {}
        for name, node in nodes.items():
            fingerprints[name] = (node.datadir / "fingerprint").read_text().split()[1]
            if name.startswith("auth"):
                cert = (node.datadir / "keys" / "authority_certificate").read_text()
                match = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.M)
                if match is None:
                    raise TorTestNetError(f"no fingerprint in {name}'s authority certificate")
                v3idents[name] = match.group(1)
            if name in made:
                self.key_cache.save(name, node.datadir)
        return fingerprints, v3idents

    def _helper(self, argv: list[str], stdin: Path | None = None) -> subprocess.Popen[bytes]:
        with self._lock, open(stdin or os.devnull, "rb") as input_file:
            if self._stopped:
                raise TorTestNetError("the test network was stopped")
            p = subprocess.Popen(
                argv,
                stdin=input_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **TOR_ENV),
                start_new_session=True,
            )
            self._helpers.append(p)
        return p

    def _launch(
        self,
        node: Node,
        text: str,
        *,
        role: str,
        or_port: int | None = None,
        socks: str | None = None,
    ) -> TorProcess:
        """Write the torrc, check it as written, start tor on it."""
        assert self._network is not None
        node.datadir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(node.datadir, 0o700)
        torrc = node.datadir / "torrc"
        write_checked_torrc(torrc, text, self._network.empty_file)
        argv = tor_command(torrc, self._network.empty_file)
        with self._lock:
            if self._stopped:
                raise TorTestNetError("the test network was stopped")
            with open(node.datadir / "stdout.log", "wb") as out:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **TOR_ENV),
                    start_new_session=True,  # Ctrl-C reaches us, and we stop them
                )
            tor = TorProcess(
                name=node.nickname,
                datadir=node.datadir,
                torrc=torrc,
                process=process,
                control_port=node.control_port,
                cookie_path=node.datadir / "control_auth_cookie",
                socks=socks,
                role=role,
                or_port=or_port,
            )
            self.tors.append(tor)
        return tor

    def _connect_monitor(self, tor: TorProcess, deadline: float) -> None:
        """Our own control connection to tor (bootstrap, consensus, HS_DESC)."""
        while True:
            self.check()
            try:
                c = stem.control.Controller.from_port(address=LOOPBACK, port=tor.control_port)
            except stem.SocketError:
                c = None
            if c is not None:
                try:
                    # The first connection to authenticate owns the tor: stem
                    # sends TAKEOWNERSHIP when __OwningControllerProcess is us.
                    c.authenticate()
                    if tor.role in ("client", "service"):
                        c.add_event_listener(tor._on_hs_desc, stem.control.EventType.HS_DESC)
                    tor._monitor = c
                    return
                except stem.connection.AuthenticationFailure:
                    c.close()  # the cookie not written yet: retry
                except BaseException:
                    c.close()
                    raise
            if time.monotonic() > deadline:
                raise TorTestNetError(
                    f"tor {tor.name}: no control connection on {tor.control}:\n{tor.log_tail()}"
                )
            time.sleep(0.05)

    def _wait(
        self,
        done: Callable[[], bool],
        deadline: float,
        what: Callable[[], str],
        tors: Sequence[TorProcess] = (),
    ) -> None:
        while not done():
            self.check()
            if time.monotonic() > deadline:
                logs = "".join(f"\n--- {t.name}:\n{t.log_tail()}" for t in tors)
                raise TorTestNetError(f"timed out waiting for {what()}{logs}")
            time.sleep(0.05)

    def _time_first_vote(self, valid_after: int, offset: int, deadline: float) -> None:
        """Hold the first vote until every authority has every relay's
        descriptor, then bring it forward to just after that.

        A first vote without them gives a consensus that lacks relays (or
        none at all), and the next round comes 5-10 s later: under CPU load
        tor can take 3 s to start. SETCONF of the start offset makes tor
        recalculate its schedule (dirauth_config.c), within the 5 s grid.
        """
        lead = first_vote_lead()

        def move(to: int) -> None:
            nonlocal valid_after, offset
            if vote_offset(to) == offset:  # unchanged options do not reschedule
                to -= 1
            valid_after, offset = to, vote_offset(to)
            for a in self.authorities:
                a._monitor.set_options({"TestingV3AuthVotingStartOffset": str(offset)})

        while not self._authorities_have_all_descriptors():
            self.check()
            now = time.time()
            if time.monotonic() > deadline:
                raise TorTestNetError("timed out waiting for the relays' descriptors")
            if valid_after - lead - 0.8 < now < valid_after - lead - 0.2:
                move(int(now) + INITIAL_VOTING_INTERVAL)  # postpone
                self._say("descriptors still missing: first vote postponed")
            time.sleep(0.05)
        soonest = int(time.time() + lead + 0.5) + 1
        if soonest < valid_after:
            move(soonest)
        self._say(f"descriptors in; authorities voting in {valid_after - lead - time.time():.1f}s")

    def _authorities_have_all_descriptors(self) -> bool:
        want = len(self.authorities) + len(self.relays)
        for a in self.authorities:
            try:
                descriptors = a._monitor.get_info("desc/all-recent", "")
            except stem.ControllerError:
                return False
            if len(re.findall(r"^router ", descriptors, re.M)) < want:
                return False
        return True

    def _wait_consensus(self, deadline: float) -> None:
        want = len(self.authorities) + len(self.relays)
        counts = dict.fromkeys((a.name for a in self.authorities), 0)

        def complete() -> bool:
            for a in self.authorities:
                if counts[a.name] < want:
                    try:
                        ns = a._monitor.get_info("ns/all", "")
                    except stem.ControllerError:
                        continue
                    counts[a.name] = len(re.findall(r"^r ", ns, re.M))
            return min(counts.values()) >= want

        self._wait(
            complete,
            deadline,
            lambda: f"a consensus listing all {want} relays (authorities have {counts})",
            self.authorities,
        )
        self._say(f"consensus has {want} relays")

    def _wait_bootstrapped(self, tor: TorProcess, deadline: float) -> None:
        self._wait(
            lambda: tor._bootstrap_progress() >= 100,
            deadline,
            lambda: f"{tor.name} to bootstrap ({tor._bootstrap_progress()}%)",
            [tor],
        )

    # ------------------------------------------------------- client tors
    def start_client(
        self,
        name: str,
        *,
        socks_port: int | None = None,
        extra: Sequence[str] = (),
        timeout: float = 60,
    ) -> TorProcess:
        """A client tor: SocksPort 127.0.0.1:PORT ExtendedErrors (a free port
        unless given), a ControlPort; waits for bootstrap 100%. ``extra``
        torrc lines (e.g. HiddenServiceDir/HiddenServicePort) are checked
        like the rest."""
        control_port, free_socks = free_ports(2)
        port = socks_port if socks_port is not None else free_socks
        node = self._new_node(name, control_port)
        text = client_torrc(self._net(), node, socks_port=port, extra=extra)
        tor = self._launch(node, text, role="client", socks=f"{LOOPBACK}:{port}")
        self._finish_start(tor, time.monotonic() + timeout)
        return tor

    def start_service_tor(
        self, name: str, *, extra: Sequence[str] = (), timeout: float = 60
    ) -> TorProcess:
        """A tor for onion services published over its control port
        (ADD_ONION): SocksPort 0, cookie auth; waits for bootstrap 100%.
        ``extra`` torrc lines (checked like the rest) add torrc onion
        services, e.g. an Onionbalance instance: HiddenServiceDir,
        HiddenServicePort, ``HiddenServiceOnionBalanceInstance 1`` (its
        ``ob_config`` written in the directory before this call)."""
        node = self._new_node(name, free_ports(1)[0])
        tor = self._launch(node, service_torrc(self._net(), node, extra=extra), role="service")
        self._finish_start(tor, time.monotonic() + timeout)
        return tor

    def _net(self) -> Network:
        if self._network is None or not self.relays:
            raise TorTestNetError("start() the network first")
        return self._network

    def _new_node(self, name: str, control_port: int) -> Node:
        if not _NICKNAME.fullmatch(name):
            raise TorTestNetError(f"tor name {name!r}: 1-19 letters or digits")
        assert self.workdir is not None
        if any(t.name == name for t in self.tors) or name.startswith(("auth", "relay")):
            raise TorTestNetError(f"tor name {name!r} is taken")
        return Node(name, self.workdir / name, control_port)

    def _finish_start(self, tor: TorProcess, deadline: float) -> None:
        try:
            with self._stop_means_stopped():
                self._connect_monitor(tor, deadline)
                self._wait_bootstrapped(tor, deadline)
        except BaseException:
            self._terminate(tor)
            raise
        self._say(f"{tor.name} bootstrapped")

    def _terminate(self, tor: TorProcess) -> None:
        if tor.process.poll() is None:
            tor.process.terminate()
            try:
                tor.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                tor.process.kill()
                tor.process.wait()
        tor._close_controllers()
        with self._lock:
            if tor in self.tors:
                self.tors.remove(tor)

    # ---------------------------------------------------- onion services
    def wait_for_descriptor(self, tor: TorProcess, onion: str, timeout: float = 60) -> None:
        """Wait until tor (the service side) has uploaded the descriptor of
        ``onion`` to at least one HSDir and has no upload still in flight: a
        client caches a failed descriptor fetch, so connect only after this.
        Events are recorded from the tor's start, so a publication that
        already happened counts."""
        if tor._monitor is None:
            raise TorTestNetError(f"{tor.name} is not a client or service tor of this network")
        address = onion.removesuffix(".onion")
        deadline = time.monotonic() + timeout
        failures: list[str] = []
        while True:
            self.check()
            with tor._hs_changed:
                pending: dict[str, int] = {}
                uploaded = 0
                failures = []
                for action, addr, hsdir, reason in tor._hs_events:
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
                tor._hs_changed.wait(timeout=0.2)
        raise TorTestNetError(
            f"descriptor of {address}.onion not uploaded by {tor.name} in {timeout:.0f}s"
            + (f" (failed: {', '.join(failures)})" if failures else "")
            + f"\n{tor.log_tail()}"
        )

    # ----------------------------------------------------------- plumbing
    def _processes(self) -> list[subprocess.Popen[bytes]]:
        with self._lock:
            return [t.process for t in self.tors] + list(self._helpers)

    def _on_violation(self, why: str) -> None:
        self.violation = why
        self._say(f"SAFETY WATCHDOG: {why}; killed every tor")

    def _say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(f"[{time.monotonic() - self._t0:5.1f}s] {message}")


# --------------------------------------------------------------------------
# `torbridge testnet`


class _Interrupted(Exception):
    pass


def cli_main(directory: Path | None, relays: int = 2) -> int:
    """Bring up the network, one client tor and one service tor; print
    ``socks=``, ``control=`` (the service tor's) and ``cookie=`` lines; run
    until SIGINT/SIGTERM, then tear everything down. ``relays``: besides
    the three authorities (every one an HSDir); Onionbalance needs 7 HSDirs
    in all, so 4 for a balanced service (docs/scale-out.md)."""

    def progress(message: str) -> None:
        print(f"testnet: {message}", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        for s in handlers:  # a second Ctrl-C must not cut the teardown short
            signal.signal(s, signal.SIG_IGN)
        raise _Interrupted

    logging.getLogger("stem").setLevel(logging.WARNING)  # it logs every command at DEBUG
    handlers = [signal.SIGINT, signal.SIGTERM]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in handlers} if main_thread else {}
    for s in previous:
        signal.signal(s, interrupt)
    try:
        with TestNet(directory, progress=progress, relays=relays) as net:
            net.start()
            client = net.start_client("client")
            service = net.start_service_tor("service")
            print(f"socks={client.socks}", flush=True)
            print(f"control={service.control}", flush=True)
            print(f"cookie={service.cookie_path}", flush=True)
            progress("ready; Ctrl-C (or SIGTERM) stops the network")
            while True:
                net.check()
                time.sleep(1)
    except _Interrupted:
        return 0  # stop() has run and said so
    except TorTestNetError as e:
        progress(f"error: {e}")
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
