"""Peers reached over a network: tor-annex nodes (SOCKS5) and p2p-annex nodes.

Both authenticate as git-annex does when it connects to a P2P remote: the
proxy's UUID and the token stored when the operator linked the node.
"""

from __future__ import annotations

import abc
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import socks  # type: ignore[import-untyped]
import trio

from torbridge.annex.remotes import NetAddress, TorAddress
from torbridge.protocol import messages as m
from torbridge.transport.base import (
    PeerChannel,
    PeerUnavailable,
    SessionInfo,
    StreamChannel,
    Transport,
    negotiate,
)
from torbridge.transport.framed import FramedStream
from torbridge.transport.process import open_process_channel

# SOCKS5 replies, with tor's extended codes for onion services (ExtendedErrors).
SOCKS_REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused by the node",
    0x06: "TTL expired (tor: the circuit timed out)",
    0x07: "command not supported",
    0x08: "address type not supported",
    0xF0: "onion service descriptor not found (is the node online?)",
    0xF1: "onion service descriptor is invalid",
    0xF2: "onion service introduction failed",
    0xF3: "onion service rendezvous failed",
    0xF4: "onion service needs client authorization",
    0xF5: "onion service rejected our client authorization",
    0xF6: "invalid onion address",
    0xF7: "onion service introduction timed out",
}


def socks_reply_text(code: int) -> str:
    return SOCKS_REPLIES.get(code, f"SOCKS reply {code:#04x}")


class _UnixSocksSocket(socks.socksocket):  # type: ignore[misc]
    """pysocks over a unix-socket SocksPort (Debian's /run/tor/socks).

    pysocks only dials TCP proxies; it asks ``_proxy_addr`` where the proxy
    is, so answering with a path is all an AF_UNIX socket needs.
    """

    def __init__(self, path: str) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix_path = path

    def _proxy_addr(self) -> str:
        return self._unix_path


# tor answers a SOCKS CONNECT it cannot complete by its SocksTimeout (120 s).
SOCKS_CONNECT_TIMEOUT = 120.0
# TCP keepalive on a connection to a SocksPort on another host: a host that
# vanished is noticed in about KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL
# seconds, though no deadline cuts a peer that is merely silent.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4


def keep_alive(sock: socket.socket) -> None:
    """Turn on TCP keepalive (a no-op for a unix socket)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class CircuitSlots:
    """Which SOCKS credentials a new stream to one node gets.

    tor puts streams with different SOCKS username/password on different
    circuits (IsolateSOCKSAuth, on by default). Each of ``count`` slots has
    its own credentials; a new stream takes the slot with the fewest open
    streams (the lowest first), so parallel sessions to a node spread over
    circuits while one session after another keeps reusing the first.
    """

    def __init__(self, count: int) -> None:
        self.busy = [0] * max(1, count)
        # Random per daemon: two daemons on one tor never share a circuit by name.
        self.prefix = f"torbridge-{secrets.token_hex(4)}"

    def take(self) -> int:
        slot = min(range(len(self.busy)), key=lambda i: (self.busy[i], i))
        self.busy[slot] += 1
        return slot

    def give_back(self, slot: int) -> None:
        self.busy[slot] -= 1

    def credentials(self, slot: int) -> tuple[str, str]:
        return (f"{self.prefix}-{slot}", "isolate")


class _SlotChannel(StreamChannel):
    """A channel that gives its circuit slot back once closed."""

    def __init__(
        self, framed: FramedStream, uuid: str, version: int, release: Callable[[], None]
    ) -> None:
        super().__init__(framed, uuid, version)
        self._release: Callable[[], None] | None = release

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await super().aclose()
        finally:
            if release is not None:
                release()


def socks_connect(
    socks_address: str,
    host: str,
    port: int,
    timeout: float,
    credentials: tuple[str, str] | None = None,
) -> socket.socket:
    """Blocking SOCKS5 CONNECT (run it in a worker thread); a plain socket back."""
    user, password = credentials if credentials is not None else (None, None)
    if socks_address.startswith("unix:"):
        s: socks.socksocket = _UnixSocksSocket(socks_address[len("unix:") :])
        s.set_proxy(socks.SOCKS5, "unix", 0, rdns=True, username=user, password=password)
    else:
        proxy_host, _, proxy_port = socks_address.rpartition(":")
        s = socks.socksocket(socket.AF_INET6 if ":" in proxy_host else socket.AF_INET)
        s.set_proxy(
            socks.SOCKS5,
            proxy_host.strip("[]"),
            int(proxy_port),
            rdns=True,
            username=user,
            password=password,
        )
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except socks.ProxyConnectionError as e:
        s.close()
        raise PeerUnavailable(f"cannot reach tor's SOCKS port {socks_address}: {e.msg}") from None
    except ValueError:
        # pysocks words a failed dial to a unix SocksPort by unpacking the path.
        s.close()
        raise PeerUnavailable(f"cannot reach tor's SOCKS port {socks_address}") from None
    except (socks.ProxyError, OSError) as e:
        # pysocks wraps the SOCKS5 reply ("0xf0: Unknown error") in a
        # GeneralProxyError("Socket error", ...): find the code wherever it is.
        s.close()
        code = _socks_code(str(e))
        if code is not None:
            raise PeerUnavailable(socks_reply_text(code)) from None
        raise PeerUnavailable(f"SOCKS connection failed: {e}") from None
    s.settimeout(None)
    # Hand trio a plain socket: pysocks' subclass overrides methods trio must not see.
    family = s.family
    plain = socket.socket(family, socket.SOCK_STREAM, fileno=s.detach())
    # The stream's end is tor's to tell (it closes the connection when the
    # circuit goes); keepalive tells when the host tor runs on is gone.
    keep_alive(plain)
    return plain


def _socks_code(text: str) -> int | None:
    # pysocks words a SOCKS5 reply as "0xf0: Unknown error".
    match = re.search(r"\b0x([0-9a-fA-F]{2}):", text)
    return int(match.group(1), 16) if match else None


@dataclass(eq=False)  # compared by identity, as before; the token stays out of repr
class LinkedNodeTransport(Transport):
    """A node the operator linked with ``git annex p2p --link``.

    We authenticate as git-annex does when it connects to a P2P remote: the
    proxy's UUID and the token stored at link time. The session's client is
    not the node's business, so ``open`` only needs a way to reach the node.
    """

    name: str
    address: TorAddress | NetAddress
    uuid: str
    token: str = field(repr=False)
    proxy_uuid: str

    @property
    def label(self) -> str:
        """How errors name the node: the remote and its address."""
        return f"{self.name} ({self.address})"

    async def open(
        self,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> PeerChannel:
        return await self.reach(nursery, version, bypass, m.Auth(self.proxy_uuid, self.token))

    @abc.abstractmethod
    async def reach(
        self, nursery: trio.Nursery, version: int, bypass: tuple[str, ...], auth: m.Auth
    ) -> PeerChannel:
        """Connect and negotiate with ``auth``; PeerUnavailable naming ``label`` on failure."""


@dataclass(eq=False)
class TorAnnexTransport(LinkedNodeTransport):
    """A tor-annex node, through tor's SocksPort."""

    address: TorAddress
    socks_address: str
    connect_timeout: float = SOCKS_CONNECT_TIMEOUT
    # Circuits parallel sessions to this node spread over ([tor] node_circuits);
    # 1 = every stream on one circuit.
    circuits: int = 8
    slots: CircuitSlots = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.slots = CircuitSlots(self.circuits)

    async def reach(
        self, nursery: trio.Nursery, version: int, bypass: tuple[str, ...], auth: m.Auth
    ) -> PeerChannel:
        slot = self.slots.take()
        try:
            try:
                sock = await trio.to_thread.run_sync(
                    socks_connect,
                    self.socks_address,
                    self.address.onion,
                    self.address.port,
                    self.connect_timeout,
                    self.slots.credentials(slot) if self.circuits > 1 else None,
                    abandon_on_cancel=True,
                )
            except PeerUnavailable as e:
                raise PeerUnavailable(f"{self.label}: {e}") from None
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))  # TCP_NODELAY
            framed = FramedStream(stream)
            try:
                agreed = await negotiate(framed, self.name, self.uuid, version, bypass, auth)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await framed.aclose()
                raise
        except BaseException:
            self.slots.give_back(slot)
            raise
        return _SlotChannel(framed, self.uuid, agreed, lambda: self.slots.give_back(slot))


@dataclass(eq=False)
class P2PNetTransport(LinkedNodeTransport):
    """A p2p-annex node: ``git-annex-p2p-NET ADDR`` carries the bytes, as for git-annex."""

    address: NetAddress
    cwd: Path

    async def reach(
        self, nursery: trio.Nursery, version: int, bypass: tuple[str, ...], auth: m.Auth
    ) -> PeerChannel:
        argv = [f"git-annex-p2p-{self.address.net}", self.address.address]
        return await open_process_channel(
            nursery,
            self.label,
            argv,
            dict(os.environ),
            self.uuid,
            version,
            bypass,
            auth=auth,
            cwd=self.cwd,
        )
