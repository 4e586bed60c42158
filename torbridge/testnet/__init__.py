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

from torbridge.testnet.audit import (
    INET_TABLES,
    WATCHDOG_INTERVAL,
    InetSocket,
    Watchdog,
    parse_proc_net,
    proc_sockets,
    unsafe_sockets,
)
from torbridge.testnet.keys import (
    AUTH_CERT_MIN_VALIDITY,
    KeyCache,
    default_key_cache,
)
from torbridge.testnet.network import (
    MARKER,
    ONIONBALANCE_MIN_HSDIRS,
    TestNet,
)
from torbridge.testnet.process import (
    STOP_GRACE,
    TOR_ENV,
    TorProcess,
    free_ports,
    tor_command,
)
from torbridge.testnet.torrc import (
    DIST_DELAY,
    INITIAL_VOTING_INTERVAL,
    INTERVALS_VALID,
    PLACEHOLDER_AUTHORITY,
    VOTE_DELAY,
    VOTING_INTERVAL,
    Authority,
    Network,
    Node,
    authority_torrc,
    client_torrc,
    first_vote_lead,
    keygen_torrc,
    relay_torrc,
    service_torrc,
    vote_offset,
)
from torbridge.testnet.torrc_safety import (
    HOST_SOCKS_PORT,
    LOOPBACK,
    TorTestNetError,
    check_torrc_safe,
    in_host_netns,
    write_checked_torrc,
)

__all__ = [
    "AUTH_CERT_MIN_VALIDITY",
    "DIST_DELAY",
    "HOST_SOCKS_PORT",
    "INET_TABLES",
    "INITIAL_VOTING_INTERVAL",
    "INTERVALS_VALID",
    "LOOPBACK",
    "MARKER",
    "ONIONBALANCE_MIN_HSDIRS",
    "PLACEHOLDER_AUTHORITY",
    "STOP_GRACE",
    "TOR_ENV",
    "VOTE_DELAY",
    "VOTING_INTERVAL",
    "WATCHDOG_INTERVAL",
    "Authority",
    "InetSocket",
    "KeyCache",
    "Network",
    "Node",
    "TestNet",
    "TorProcess",
    "TorTestNetError",
    "Watchdog",
    "authority_torrc",
    "check_torrc_safe",
    "client_torrc",
    "default_key_cache",
    "first_vote_lead",
    "free_ports",
    "in_host_netns",
    "keygen_torrc",
    "parse_proc_net",
    "proc_sockets",
    "relay_torrc",
    "service_torrc",
    "tor_command",
    "unsafe_sockets",
    "vote_offset",
    "write_checked_torrc",
]
