"""The torrcs of the private network: one builder per role, the safety
lines in one place (``_safety_lines``), and the authorities' voting schedule.

Every torrc written here passes ``check_torrc_safe`` (torrc_safety.py);
the network checks it again, as written, before its tor starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torbridge.testnet.torrc_safety import LOOPBACK

# Voting schedule (seconds). Until the first consensus the authorities vote
# on a 5 s grid aligned to UTC midnight, shifted by TestingV3AuthVotingStartOffset.
INITIAL_VOTING_INTERVAL = 5
VOTING_INTERVAL = 10
VOTE_DELAY = 2
DIST_DELAY = 2
INTERVALS_VALID = 2


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
