"""One client session: the I/O around a ``Relay`` state machine.

Everything the session decides is decided by the Relay; this module only
reads the side the Relay names, carries out its actions, and keeps every
wait under a deadline. One nursery per session holds the helper tasks of
its peer; leaving it, for any reason, closes the peer and the client.

The session keeps its lifecycle (the nursery, the loop, the cleanup that
cannot be skipped) and what each action means; the jobs it hands out are
DATA bodies (server/bodycopy.py, transport/kernelcopy.py), waits that
watch the client for a hang-up (server/clientwatch.py) and admission
(server/admission.py: the caps, ``PendingAuth``, ``Busy``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from torbridge.protocol import messages as m
from torbridge.protocol import relay as r
from torbridge.protocol import relayactions as ra
from torbridge.protocol.framing import LineEvent
from torbridge.protocol.permissions import Grant
from torbridge.protocol.relayactions import Side
from torbridge.server.admission import Busy, PendingAuth
from torbridge.server.bodycopy import copy_body, discard_body
from torbridge.server.clientwatch import (
    ClientLeft,
    receive_from_peer,
    unless_client_leaves,
    wait_beside,
)
from torbridge.server.endpoints import Endpoint
from torbridge.server.gitservice import refuse_git_service, run_git_service
from torbridge.server.refwatch import Refs, RefWatch
from torbridge.server.watched import WatchedStream
from torbridge.transport.base import PeerChannel, PeerUnavailable, SessionInfo
from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.process import argv_safe_uuid

log = logging.getLogger("torbridge.session")

CLOSE_DRAIN = 2.0  # seconds to read what the client still sends before closing
_session_ids = itertools.count(1)
T = TypeVar("T")


class Session:
    def __init__(
        self,
        stream: trio.abc.Stream,
        endpoint: Endpoint,
        initial: bytes = b"",
        circuit: int | None = None,
        accepted_at: float | None = None,
        pending: PendingAuth | None = None,
    ) -> None:
        self.id = next(_session_ids)
        self.circuit = circuit  # tor's rendezvous circuit, when tor exports it
        self.endpoint = endpoint
        self.limits = endpoint.limits
        self._watched = WatchedStream(stream)
        self.client = FramedStream(self._watched, initial)
        self.relay = r.Relay(
            endpoint.uuid,
            endpoint.transport.name,
            endpoint.refs is not None,
            peer_max_version=endpoint.transport.known_max_version,
        )
        self.peer: PeerChannel | None = None
        self.grant: Grant | None = None
        self.outcome = "unfinished"
        self.linger = 0.0
        self.started = trio.current_time()
        # The AUTH deadline counts from accept, not from when reading began.
        self._auth_deadline = (accepted_at or self.started) + self.limits.auth_timeout
        self._nursery: trio.Nursery | None = None
        # Counted against the cap on unauthenticated connections until AUTH.
        self.pending = pending or PendingAuth()
        self._pre_auth = True
        self.started_wall = time.time()
        self.endpoint_name = endpoint.name
        self.token_name: str | None = None
        self._credentials = ("", "")  # (client UUID, token): only with a git owner
        self._clean = True
        # NOTIFYCHANGE: the refs as known at AUTH, then this session's watch.
        self._ref_baseline: Refs | None = None
        self._ref_watch: RefWatch | None = None
        self._exits = contextlib.ExitStack()  # left when the session ends

    # --- what the status registry reads (server/status.py) -------------------------

    @property
    def version(self) -> int:
        return self.relay.version

    @property
    def bytes_in(self) -> int:
        return self.client.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.client.bytes_out

    @property
    def current_request(self) -> m.Message | None:
        return None if self.relay.phase is r.Phase.IDLE else self.relay.request

    # --- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._loop()
                finally:
                    await self._close_peer()
                    nursery.cancel_scope.cancel()
        finally:
            self._exits.close()
            self._leave_pre_auth()
            if self.grant is not None:
                self.endpoint.admission.release(self.grant)
                self.endpoint.registry.session_ended(self, self.outcome, self._clean)
            await self._close_client()
            self._log_end()

    def _leave_pre_auth(self) -> None:
        if self._pre_auth:
            self._pre_auth = False
            self.endpoint.admission.leave_pre_auth(self.pending)

    async def _loop(self) -> None:
        queue: deque[ra.Action] = deque()
        while True:
            if not queue:
                side = self.relay.next_reader
                if side is None:
                    raise r.RelayError(f"nothing to read in phase {self.relay.phase.value}")
                queue.extend(await self._read(side))
                continue
            action = queue.popleft()
            if isinstance(action, ra.EndSession):
                self.outcome = action.reason
                self._clean = action.clean
                self.linger = action.linger
                return
            queue.extendleft(reversed(await self.perform(action)))

    async def _read(self, side: Side) -> list[ra.Action]:
        channel = self.channel(side)
        if channel is None:
            raise r.RelayError("read from a closed peer")
        if self.relay.phase is r.Phase.AUTH:
            deadline = self._auth_deadline
        elif side is Side.CLIENT:
            # idle_timeout 0: none, as git-annex's server; a client that dies
            # closes its connection (or tor tears its circuit down).
            deadline = trio.current_time() + self.limits.client_idle
        else:
            deadline = trio.current_time() + self.limits.peer_wait
        evictable: contextlib.AbstractContextManager[object] = (
            self.pending.evictable() if self._pre_auth else contextlib.nullcontext()
        )
        try:
            if side is Side.PEER:
                assert not isinstance(channel, FramedStream)
                got = await receive_from_peer(self._watched, channel, deadline)
                if isinstance(got, ClientLeft):
                    return await self.lost(Side.CLIENT, got.reason)
                event = got
            else:
                assert isinstance(channel, FramedStream)
                with evictable, trio.fail_at(deadline):
                    event = await self._client_event(channel)
            if self.pending.evicted and self._pre_auth:
                self.linger = 0.0
                return await self.lost(side, "evicted: too many unauthenticated connections")
        except trio.TooSlowError:
            # A silent peer is not a stale connection: no retry.
            return await self.lost(side, "no message before the deadline", retry=False)
        except StreamLost as e:
            return await self.lost(side, str(e))
        if side is Side.CLIENT and isinstance(event, m.Message):
            log.debug("[%d] client: %s", self.id, m.redacted(event))
        elif isinstance(event, m.Error):
            # The client may hear less (protocol/clienttext.py): the log keeps it.
            log.warning("[%d] %s said ERROR %s", self.id, self.endpoint.transport.name, event.text)
        return self.relay.receive(side, event)

    async def _client_event(self, client: FramedStream) -> LineEvent:
        """The client's next event; once it has been quiet for ``limits.peer_idle``
        seconds, stop the peer if the relay says it may be (``Relay.peer_stoppable``).

        One more cancel scope per read, no task: the read is cancelled and
        repeated, which is safe as in server/clientwatch.py's
        ``receive_from_peer`` (the FramedStream feeds its decoder only after
        a read returns).
        """
        if self.relay.peer_stoppable and self.limits.peer_idle:
            with trio.move_on_after(self.limits.peer_idle):
                return await client.receive_event()
            await self._stop_idle_peer()
        return await client.receive_event()

    async def _stopping_idle_peer(self, wait: Callable[[], Awaitable[T]]) -> T:
        """``wait()`` (for changes); meanwhile, once the client has been quiet
        for ``limits.peer_idle`` seconds, stop the peer if it may be.

        ``wait()`` itself is never cancelled by this: a timer beside it does
        the stopping, shielded, and is cancelled when ``wait()`` returns.
        """
        if not (self.relay.peer_stoppable and self.limits.peer_idle):
            return await wait()

        async def stop_peer_later(_scope: trio.CancelScope) -> None:
            await trio.sleep(self.limits.peer_idle)
            await self._stop_idle_peer()

        answer = await wait_beside(wait, stop_peer_later)
        assert answer is not None  # the timer never ends the wait
        return answer[0]

    async def _stop_idle_peer(self) -> None:
        with trio.CancelScope(shield=True):
            actions = self.relay.peer_idle()
            for action in actions:
                await self.perform(action)  # ClosePeer: the peer's process exits
            if actions:
                log.debug("[%d] peer stopped after %g s idle", self.id, self.limits.peer_idle)
                self.endpoint.registry.peer_stopped_idle(self.endpoint.transport.name)

    async def lost(
        self, side: Side, reason: str, header_unsent: bool = False, retry: bool = True
    ) -> list[ra.Action]:
        if side is Side.PEER:
            log.warning("[%d] %s: %s", self.id, self.endpoint.name, reason)
            self.endpoint.registry.peer_failed(self.endpoint.transport.name, reason)
            await self._close_peer()
        return self.relay.side_lost(side, reason, header_unsent, retry)

    def channel(self, side: Side) -> FramedStream | PeerChannel | None:
        return self.client if side is Side.CLIENT else self.peer

    def stall(self, side: Side) -> float:
        """Seconds ``side`` may hold up what is sent or copied (inf: no limit).

        The peer is working (a special remote storing, a node hashing) and
        has no limit unless the operator sets peer_timeout; a client that
        stops sending or reading in the middle has stall_timeout.
        """
        return self.limits.client_stall if side is Side.CLIENT else self.limits.peer_wait

    # --- actions ------------------------------------------------------------------

    async def perform(self, action: ra.Action) -> list[ra.Action]:
        match action:
            case ra.Send(to=side, message=message):
                return await self._send(side, message)
            case ra.CopyBody(source=source, length=length):
                return await self._copy_body(source, length)
            case ra.DiscardBody(length=length):
                return await discard_body(self, length)
            case ra.CheckAuth(client_uuid=uuid, token=token):
                return await self._check_auth(uuid, token)
            case ra.OpenPeer(version=version, bypass=bypass):
                return await self._open_peer(version, bypass)
            case ra.ClosePeer():
                await self._close_peer()
                return []
            case ra.RunService(service=service) if self.endpoint.git_owner is not None:
                # The owner decides with the client's own token (docs/scale-out.md).
                uuid, token = self._credentials
                await self.endpoint.git_owner.relay(
                    self.client,
                    uuid,
                    token,
                    service,
                    self.limits.client_idle,
                    self.limits.client_stall,
                )
                return []
            case ra.RunService(service=service, may_rewrite=may_rewrite):
                # The client's deadlines: stall_timeout once it stops reading,
                # idle_timeout for silence (git itself sends keepalives while
                # it works; the client's git is silent while it packs).
                await run_git_service(
                    self.client,
                    self.endpoint.repository,
                    service,
                    self.limits.client_idle,
                    guard_history=not may_rewrite,
                    stall_timeout=self.limits.client_stall,
                )
                return []
            case ra.RefuseService(reason=reason):
                with contextlib.suppress(StreamLost):  # the session ends next anyway
                    await refuse_git_service(self.client, reason)
                return []
            case ra.WatchRefs():
                return await self._watch_refs()
            case ra.Stored(key=key, uuids=uuids):
                self._record(key, uuids, present=True)
                return []
            case ra.Removed(key=key, uuids=uuids):
                self._record(key, uuids, present=False)
                return []
            case _:
                raise r.RelayError(f"unhandled action {action!r}")

    async def _watch_refs(self) -> list[ra.Action]:
        """Wait for the proxy repository's refs to change (server/refwatch.py).

        Deliberately no deadline, as git-annex's own server: a remotedaemon
        waits for hours. The client leaving ends the wait.
        """
        refs = self.endpoint.refs
        assert refs is not None
        if self._ref_watch is None:
            self._ref_watch = self._exits.enter_context(refs.watch(self._ref_baseline))
        watch = self._ref_watch
        got = await self._stopping_idle_peer(
            lambda: unless_client_leaves(self._watched, watch.changed, "changes")
        )
        if isinstance(got, ClientLeft):
            return await self.lost(Side.CLIENT, got.reason)
        log.debug("[%d] refs changed: %d commit(s)", self.id, len(got))
        return self.relay.refs_changed(got)

    def _record(self, key: str, uuids: tuple[str, ...], present: bool) -> None:
        if self.endpoint.location_log is not None:
            for uuid in uuids:
                self.endpoint.location_log.record(key, uuid, present)

    async def _send(self, side: Side, message: m.Message) -> list[ra.Action]:
        channel = self.channel(side)
        if channel is None:
            return []  # the peer went away; the relay has been told already
        try:
            with trio.fail_after(self.stall(side)):
                await channel.send(message)
        except trio.TooSlowError:
            return await self.lost(side, "not reading")
        except StreamLost as e:
            return await self.lost(side, str(e))
        return []

    async def _copy_body(self, source: Side, length: int) -> list[ra.Action]:
        """Copy one DATA body; the next line is read only after it is delivered.

        The peer may hold the copy up for as long as its deadline allows
        (none by default), so a client that leaves meanwhile is watched for:
        read ahead while the body comes from the peer, by its closed
        connection while the client sends the body.
        """
        copied = await unless_client_leaves(
            self._watched, lambda: copy_body(self, source, length), reading=source is Side.PEER
        )
        if isinstance(copied, ClientLeft):
            return await self.lost(Side.CLIENT, copied.reason)
        return copied

    async def _check_auth(self, client_uuid: str, token: str) -> list[ra.Action]:
        # Out of the pre-AUTH count: a valid token waiting for a slot at a
        # session cap must not be evicted as an idle stranger.
        self._leave_pre_auth()
        grant: Grant | Busy | ClientLeft | None = None
        admission = self.endpoint.admission
        if argv_safe_uuid(client_uuid):
            grant = admission.authorize(self.endpoint.name, token)
        if isinstance(grant, Busy):
            busy = grant
            grant = await unless_client_leaves(
                self._watched, lambda: admission.wait_for_slot(self.endpoint.name, token, busy)
            )
        if isinstance(grant, ClientLeft):
            return await self.lost(Side.CLIENT, grant.reason)
        if isinstance(grant, Busy):
            # Its token is fine: no AUTH-FAILURE, no failed-AUTH backoff.
            log.warning("[%d] %s: %s", self.id, self.endpoint.name, grant.text)
            self.endpoint.registry.connection_refused()
            return self.relay.auth_busy(grant.text)
        if grant is None:
            log.warning("[%d] %s: authentication failed", self.id, self.endpoint.name)
            self.endpoint.registry.auth_failed()
            self.endpoint.admission.auth_failed(self.circuit)
            return self.relay.auth_rejected()
        self.endpoint.admission.auth_succeeded(self.circuit)
        self.grant = grant
        if self.endpoint.refs is not None:
            # Changes from here on are reported, as git-annex's server watches
            # from AUTH: free when the watch runs, else from the first NOTIFYCHANGE.
            self._ref_baseline = self.endpoint.refs.peek()
        self.token_name = grant.token_name
        if self.endpoint.git_owner is not None:
            self._credentials = (client_uuid, token)  # for CONNECT, relayed to the owner
        self.endpoint.registry.session_started(self)
        accepted = self.relay.auth_accepted(grant.mode, grant.git)
        log.info(
            "[%d] %s: session start, token %s (%s, git %s), client %s",
            self.id,
            self.endpoint.name,
            grant.token_name,
            grant.mode.value,
            self.relay.git.label,
            client_uuid,
        )
        return accepted

    async def _open_peer(self, version: int, bypass: tuple[str, ...]) -> list[ra.Action]:
        assert self._nursery is not None and self.grant is not None
        assert self.relay.client_uuid is not None
        info = SessionInfo(self.relay.client_uuid, self.grant.mode)
        opening = trio.current_time()
        nursery = self._nursery
        try:
            with trio.fail_after(self.limits.peer_wait):
                opened = await unless_client_leaves(
                    self._watched,
                    lambda: self.endpoint.transport.open(nursery, info, version, bypass),
                )
        except trio.TooSlowError:
            return await self.lost(Side.PEER, "no answer before the deadline")
        except PeerUnavailable as e:
            return await self.lost(Side.PEER, str(e))
        if isinstance(opened, ClientLeft):
            return await self.lost(Side.CLIENT, opened.reason)
        self.peer = opened
        self.endpoint.registry.peer_opened(
            self.endpoint.transport.name, trio.current_time() - opening
        )
        return self.relay.peer_opened(self.peer.version)

    # --- cleanup that cannot be skipped ---------------------------------------------

    async def _close_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            with trio.CancelScope(shield=True):
                await peer.aclose()

    async def _close_client(self) -> None:
        """Close so that what was sent last is read: half-close, drain, close."""
        stream = self.client.stream
        with trio.CancelScope(shield=True):
            # An evicted connection has nothing to read: close it at once, so
            # a flood holds no descriptors for the drain.
            drain = 0.0 if self.pending.evicted and self.grant is None else CLOSE_DRAIN
            with trio.move_on_after(self.linger + drain):
                if self.linger:
                    await trio.sleep(self.linger)
                try:
                    if isinstance(stream, trio.abc.HalfCloseableStream):
                        await stream.send_eof()
                    drained = 0
                    while drained < 1 << 20 and (data := await stream.receive_some(65536)):
                        drained += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await stream.aclose()

    def _log_end(self) -> None:
        if self.grant is None:
            log.info(
                "[%d] %s: unauthenticated connection closed: %s",
                self.id,
                self.endpoint.name,
                self.outcome,
            )
            return
        log.info(
            "[%d] %s: session end, token %s, version %d, in %d B, out %d B, %.1fs: %s",
            self.id,
            self.endpoint.name,
            self.grant.token_name,
            self.relay.version,
            self.client.bytes_in,
            self.client.bytes_out,
            trio.current_time() - self.started,
            self.outcome,
        )
