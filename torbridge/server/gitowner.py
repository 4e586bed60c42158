"""CONNECT relayed to the host that owns the git repository (docs/scale-out.md).

Behind an Onionbalance frontend, several hosts serve the same endpoints,
but only one of them, the git owner, has the repository clients pull from
and push to. Every other host passes each CONNECT on to the owner's
instance onion, on the port of the endpoint the client reached, with the
client's own token (every host has the same token store): the owner
applies the client's git access, its push guard, caps and revocations as
for a direct client. After the owner accepts CONNECT, DATA and CONNECTDONE
pass both ways unchanged, so git's bytes, exit status and error texts
reach the client as they left the owner.

The connection to the owner lives for one CONNECT and is closed after it;
the client's session goes on with its next request.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream
from torbridge.server.gitservice import CHUNK, refuse_git_service
from torbridge.transport.base import PeerUnavailable
from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.network import socks_connect

log = logging.getLogger("torbridge.gitowner")

# Reaching the owner: a first circuit to a new onion takes seconds, up to a
# minute on a loaded network; the AUTH/VERSION/CONNECT exchange after it is quick.
CONNECT_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 60.0
UNREACHABLE = "the git repository's host is unreachable; try again later"


@dataclass(eq=False)
class GitOwner:
    """Where this endpoint's CONNECTs go: the owner's instance onion and port."""

    onion: str
    port: int
    socks: str  # [tor] socks of this host
    uuid: str  # the endpoint's UUID: the owner must announce the same one
    relayed: int = field(default=0, init=False)  # CONNECTs passed on
    failed: int = field(default=0, init=False)  # ... that could not reach the owner

    async def relay(
        self,
        client: FramedStream,
        client_uuid: str,
        token: str,
        service: str,
        idle_timeout: float,
        stall_timeout: float = math.inf,
    ) -> int:
        """Serve the client's CONNECT from the owner; the exit status sent."""
        try:
            owner = await self._open(client_uuid, token, service)
        except PeerUnavailable as e:
            self.failed += 1
            log.warning("CONNECT %s: git owner %s:%d: %s", service, self.onion, self.port, e)
            with contextlib.suppress(StreamLost):
                await refuse_git_service(client, UNREACHABLE)
            return 1
        self.relayed += 1
        try:
            return await _pump(client, owner, service, idle_timeout, stall_timeout)
        finally:
            with trio.CancelScope(shield=True):
                await owner.aclose()

    async def _open(self, client_uuid: str, token: str, service: str) -> FramedStream:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                sock = await trio.to_thread.run_sync(
                    socks_connect,
                    self.socks,
                    self.onion,
                    self.port,
                    CONNECT_TIMEOUT,
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            raise PeerUnavailable(f"no connection within {CONNECT_TIMEOUT:.0f}s") from None
        owner = FramedStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await owner.send(m.Auth(client_uuid, token))
                reply = await owner.receive_event()
                if isinstance(reply, m.AuthFailure):
                    # Our store let the token in, the owner's does not: the
                    # stores differ (an import still on its way, a revocation).
                    raise PeerUnavailable("the owner refused the token (token stores differ?)")
                if not isinstance(reply, m.AuthSuccess):
                    raise PeerUnavailable(f"the owner answered AUTH with {reply!r}")
                if reply.uuid != self.uuid:
                    raise PeerUnavailable(
                        f"the owner's endpoint is repository {reply.uuid}, ours {self.uuid}"
                    )
                await owner.send(m.Version(1))
                reply = await owner.receive_event()
                if not isinstance(reply, m.Version):
                    raise PeerUnavailable(f"the owner answered VERSION with {reply!r}")
                await owner.send(m.Connect(service))
        except trio.TooSlowError:
            with trio.CancelScope(shield=True):
                await owner.aclose()
            raise PeerUnavailable(f"no answer within {HANDSHAKE_TIMEOUT:.0f}s") from None
        except StreamLost as e:
            with trio.CancelScope(shield=True):
                await owner.aclose()
            raise PeerUnavailable(f"connection lost: {e}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await owner.aclose()
            raise
        return owner


async def _copy_data(src: FramedStream, dst: FramedStream, length: int) -> None:
    await dst.send(m.Data(length))
    while src.body_remaining:
        await dst.send_body(await src.receive_body(CHUNK))


async def _fail_client(client: FramedStream, stall_timeout: float) -> None:
    """The owner went away mid-CONNECT: end the client's git with a failure
    rather than leave it waiting (if the client is still there)."""
    with (
        contextlib.suppress(StreamLost, trio.TooSlowError),
        trio.fail_after(min(stall_timeout, HANDSHAKE_TIMEOUT)),
    ):
        await client.send(m.ConnectDone(1))


async def _pump(
    client: FramedStream,
    owner: FramedStream,
    service: str,
    idle_timeout: float,
    stall_timeout: float,
) -> int:
    """DATA both ways until the owner's CONNECTDONE (sent on to the client).

    Deadlines: the client's silence (idle_timeout, as for a local CONNECT;
    the owner's git sends keepalives while it works) and a send to the
    client that does not finish (stall_timeout).
    """
    last = trio.current_time()
    code = 1

    async def client_to_owner() -> None:
        nonlocal last
        try:
            while True:
                event = await client.receive_event()
                last = trio.current_time()
                if isinstance(event, m.Data):
                    await _copy_data(client, owner, event.length)
                elif isinstance(event, m.ConnectDone):
                    await owner.send(event)
                    return
                else:
                    if not isinstance(event, EndOfStream):
                        log.warning("client sent %r during CONNECT", event)
                    # The owner's git sees EOF, as a local one would.
                    await owner.send(m.ConnectDone(0))
                    return
        except StreamLost:
            pass

    async def watchdog(scope: trio.CancelScope) -> None:
        # Polled, as gitservice's watchdog: activity moves the deadline on.
        while True:
            now = trio.current_time()
            if now >= last + idle_timeout:
                break
            await trio.sleep_until(min(last + idle_timeout, now + 1.0))
        log.warning(
            "%s relayed to the git owner: idle for %.0fs, stopping it", service, idle_timeout
        )
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_to_owner)
        if math.isfinite(idle_timeout):
            nursery.start_soon(watchdog, nursery.cancel_scope)
        try:
            while True:
                event = await owner.receive_event()
                last = trio.current_time()
                if isinstance(event, m.Data):
                    with trio.fail_after(stall_timeout):
                        await _copy_data(owner, client, event.length)
                elif isinstance(event, m.ConnectDone):
                    code = event.exit_code
                    with trio.fail_after(stall_timeout):
                        await client.send(event)
                    break
                else:
                    log.warning("git owner sent %r during CONNECT; ending it", event)
                    await _fail_client(client, stall_timeout)
                    break
        except StreamLost as e:
            log.info("%s relayed to the git owner: %s", service, e)
            await _fail_client(client, stall_timeout)
        except trio.TooSlowError:
            log.info("%s relayed to the git owner: client not reading, session ended", service)
        nursery.cancel_scope.cancel()
    return code
