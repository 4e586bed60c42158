"""What a configuration is: the dataclasses parse.py fills, with their defaults."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

LOG_FORMATS = ("text", "json")
OWN_REPOSITORY = "."
UNIX_PATH_MAX = 107  # bytes in a unix socket path (sun_path), without the NUL


class ConfigError(Exception):
    """One line for the user; names the file and the key."""


@dataclass(frozen=True)
class Expose:
    """One endpoint: a socket the onion service forwards a virtual port to."""

    name: str
    remote: str  # "." = the proxy's own repository
    port: int  # the onion service's virtual port


@dataclass(frozen=True)
class Limits:
    auth_timeout: float = 10.0  # from accept to AUTH
    # Client silence between requests; 0 = none, as git-annex's own server:
    # a stock client keeps idle connections pooled and fails the next
    # transfer on one the server closed (docs/protocol-notes.md).
    idle_timeout: float = 0.0
    # A session's peer (git-annex-shell, a node connection) is stopped after
    # its client has been quiet this long, unless it holds a lock or a
    # transfer; the next request starts a new one. The client's connection
    # stays open (0 = the peer stays open too).
    peer_idle: float = 30.0
    # A peer keeping the session waiting: its reply to a request, its part of
    # a DATA body. 0 = none, as git-annex has none: a working peer may be
    # silent for as long as its work takes (a special remote storing a big
    # file, a node hashing one). A dead peer is noticed as it goes (its process
    # exits, its connection closes); a client that leaves ends the wait.
    peer_timeout: float = 0.0
    # The client's part stopped: no byte of a DATA body, or of a CONNECT's git
    # traffic, moved because the client neither sends nor reads. 0 = none.
    stall_timeout: float = 300.0
    # A cluster node's connect + AUTH + VERSION: bounded on its own and short,
    # so a dead or silent node costs a session this long, once (it is then
    # marked down and skipped until a probe finds it answering).
    node_connect_timeout: float = 20.0
    max_unauthenticated: int = 128  # connections not yet past AUTH, all endpoints
    # git-annex's own P2P server serves 100 connections per network at once:
    # one client's `-J64` fits.
    max_sessions_per_token: int = 100
    # Authenticated sessions in all: ~16 KiB each while quiet, ~10 MiB more
    # while a git-annex-shell runs for it (docs/operator-guide.md).
    max_sessions: int = 2048
    # A connection with a valid token, over a session cap, waits this long for
    # a slot before it is told ERROR (never AUTH-FAILURE).
    session_wait: float = 60.0
    # Connections per Tor circuit (with export_circuit_id). Every stream of one
    # client rides one rendezvous circuit: sized above a token's sessions plus
    # its waiting connections.
    max_per_circuit: int = 256
    drain_timeout: float = 60.0  # SIGTERM: seconds sessions in flight get to finish

    @property
    def client_idle(self) -> float:
        """Seconds a client may be silent between requests (inf: no limit)."""
        return no_limit_if_zero(self.idle_timeout)

    @property
    def peer_wait(self) -> float:
        """Seconds a peer may keep the session waiting (inf: no limit)."""
        return no_limit_if_zero(self.peer_timeout)

    @property
    def client_stall(self) -> float:
        """Seconds a client may hold up a body or CONNECT (inf: no limit)."""
        return no_limit_if_zero(self.stall_timeout)


def no_limit_if_zero(seconds: float) -> float:
    """A timeout as configured, 0 meaning none (math.inf, which trio waits on forever)."""
    return seconds if seconds > 0 else math.inf


@dataclass(frozen=True)
class Tor:
    # tor's SocksPort for reaching tor-annex nodes: "HOST:PORT" or "unix:/path".
    socks: str = "127.0.0.1:9050"
    # tor's control port for publishing the onion: "unix:/run/tor/control" or
    # "HOST:PORT"; None = no onion (the unix sockets only).
    control: str | None = None
    password: str | None = None  # control port password; cookie auth needs none
    # "ephemeral": ADD_ONION with a key kept in state_dir; "torrc": the operator
    # installs the snippet `torbridge onion-snippet` prints, torbridge reads hostname.
    onion: str = "ephemeral"
    hidden_service_dir: Path | None = None  # for onion = "torrc"
    # Concurrent streams per rendezvous circuit (0 = unlimited); tor closes the
    # whole circuit, and every transfer on it, at one more. All of one
    # client's connections share its circuit: sized above what an honest
    # client can use (max_sessions_per_token sessions + as many waiting).
    max_streams: int = 512
    # With onion = "torrc" only: tor prepends a PROXY line carrying the circuit
    # id (HiddenServiceExportCircuitID haproxy), for per-circuit caps and backoff.
    export_circuit_id: bool = False
    # tor's proof-of-work defense against introduction floods (tor >= 0.4.9.2
    # through ADD_ONION; >= 0.4.8 in torrc). Rate and burst: None = tor's own.
    pow_defenses: bool = True
    pow_queue_rate: int | None = None  # introductions handled per second
    pow_queue_burst: int | None = None  # ... in a burst
    # Onion client authorization (v3): only client tors holding a key made by
    # `torbridge client add` can reach the onion at all.
    client_auth: bool = False
    # tor's MetricsPort ("127.0.0.1:PORT"), for the proof-of-work figures in status.
    metrics_port: str | None = None
    # SOCKS isolation slots per tor-annex node: parallel sessions to a node
    # spread over up to this many tor circuits (1 = one shared circuit).
    node_circuits: int = 8

    @property
    def enabled(self) -> bool:
        return self.control is not None or self.onion == "torrc"


ONION_RE = re.compile(r"[a-z2-7]{56}\.onion")


@dataclass(frozen=True)
class Balance:
    """This host as one instance behind an Onionbalance frontend (docs/scale-out.md)."""

    frontend: str  # the frontend's (master) address, "NAME.onion": clients link this one
    # The instance onion of the host that owns the git repository; None on that host.
    git_owner: str | None = None
    # The git remote (a p2p-annex remote linked to the owner) the git-annex
    # branch is synced with; None = no branch sync (a single host, or the owner).
    owner_remote: str | None = None
    sync_interval: float = 10.0  # seconds between branch syncs; 0 = never
    # On the frontend host: the directory of `torbridge balance frontend` (for doctor).
    frontend_dir: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    repository: Path
    state_dir: Path
    socket_dir: Path
    socket_mode: int
    log_format: str
    expose: tuple[Expose, ...]
    limits: Limits = field(default_factory=Limits)
    tor: Tor = field(default_factory=Tor)
    balance: Balance | None = None

    @property
    def public_onion_override(self) -> str | None:
        """The address clients link, when it is not this host's own onion."""
        return self.balance.frontend if self.balance is not None else None

    def socket_path(self, expose: Expose) -> Path:
        return self.socket_dir / f"{expose.name}.sock"

    def endpoint(self, name: str) -> Expose:
        """The endpoint called *name*; KeyError if there is none."""
        for e in self.expose:
            if e.name == name:
                return e
        raise KeyError(name)


# --- writing ----------------------------------------------------------------------
