"""The torrc checker: what a tor of the private network may be told.

``check_torrc_safe`` reads a torrc and refuses anything that could reach
past 127.0.0.1; ``write_checked_torrc`` writes a torrc and checks the file
tor will read. Nothing here starts a process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LOOPBACK = "127.0.0.1"
HOST_SOCKS_PORT = 9050  # the machine's own tor: never ours in the host network namespace


class TorTestNetError(Exception):
    """The private network could not be started, or something in it went wrong."""


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


def write_checked_torrc(path: Path, text: str, empty_file: Path) -> None:
    """Write a torrc, then check what is on disk: the file tor will read."""
    path.write_text(text)
    written = path.read_text()
    check_torrc_safe(written)
    if in_host_netns() and re.search(rf"\b127\.0\.0\.1:{HOST_SOCKS_PORT}\b", written):
        raise TorTestNetError(f"port {HOST_SOCKS_PORT} belongs to the machine's own tor")
    if empty_file.stat().st_size != 0:
        raise TorTestNetError(f"{empty_file} should be empty")


def in_host_netns() -> bool:
    """True unless we are in a network namespace other than init's (where
    port 9050 would be ours)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True  # cannot tell: assume the host's
