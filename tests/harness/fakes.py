"""Test doubles for the session tests: a scripted P2P server, a Transport that
reaches it over in-memory streams, and an Admission that knows one token.

``FakeRepo`` answers like git-annex's P2P server (P2P/Protocol.hs
``serverHandler``): it speaks first with ``AUTH-SUCCESS`` as
``git-annex-shell p2pstdio`` does (or waits for AUTH, as a tor-annex node
does), negotiates VERSION, and serves CHECKPRESENT, LOCKCONTENT, REMOVE,
REMOVE-BEFORE, GETTIMESTAMP, PUT and GET from a dict of contents. Every
message it receives is recorded per connection, bodies included, so that
tests can check what the bridge relayed. ``hooks`` replace the normal
answer to a message type by a test's own coroutine, for peers that go
silent, die half-way or break the protocol.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from torbridge.protocol import messages as m
from torbridge.protocol.framing import BadLine, EndOfStream, LineEvent, LineTooLong
from torbridge.protocol.permissions import Grant, Mode
from torbridge.server.admission import Busy, PendingAuth
from torbridge.transport.base import (
    PeerChannel,
    PeerUnavailable,
    SessionInfo,
    StreamChannel,
    Transport,
    negotiate,
)
from torbridge.transport.framed import FramedStream, StreamLost

PEER_UUID = "5a1b2c3d-0000-4000-8000-00000000beef"
PEER_NAME = "node1"
CLIENT_UUID = "c11e4700-1111-4111-8111-111111111111"
TOKEN = "0123456789abcdef" * 8
PEER_TOKEN = "feedfacefeedface"


# --- admission ------------------------------------------------------------------------


@dataclass
class OneToken:
    """An Admission that accepts one token (case-insensitively) with one mode."""

    token: str = TOKEN
    mode: Mode = Mode.READ_WRITE
    granted: int = 0
    released: int = 0
    left_pre_auth: int = 0
    endpoints: list[str] = field(default_factory=list)
    failed_circuits: list[int | None] = field(default_factory=list)
    good_circuits: list[int | None] = field(default_factory=list)

    def authorize(self, endpoint: str, token: str) -> Grant | None:
        self.endpoints.append(endpoint)
        if token.lower() != self.token.lower():
            return None
        self.granted += 1
        return Grant("test-token", self.mode)

    async def wait_for_slot(self, endpoint: str, token: str, busy: Busy) -> Grant | Busy | None:
        return busy  # never busy: authorize grants or refuses

    def release(self, grant: Grant) -> None:
        self.released += 1

    def leave_pre_auth(self, connection: PendingAuth) -> None:
        self.left_pre_auth += 1

    def auth_failed(self, circuit: int | None) -> None:
        self.failed_circuits.append(circuit)

    def auth_succeeded(self, circuit: int | None) -> None:
        self.good_circuits.append(circuit)


# --- the scripted server ------------------------------------------------------------


Hook = Callable[["PeerConnection", m.Message], Awaitable[None]]


class PeerConnection:
    """One connection to the fake server, seen from the server."""

    def __init__(self, repo: FakeRepo, stream: trio.abc.Stream) -> None:
        self.repo = repo
        self.stream = stream
        self.framed = FramedStream(stream)
        self.version = 0
        self.received: list[m.Message | BadLine | LineTooLong] = []
        self.bodies: list[bytes] = []  # every DATA body received, in order
        self.bypass: tuple[str, ...] = ()
        self.authenticated = False
        self.lock_held = False
        self.eof = False  # the bridge closed the connection (cleanly or not)
        self.lost_in_body = False  # ... in the middle of a DATA body
        self.finished = trio.Event()

    # --- I/O helpers, also for hooks ------------------------------------------------

    async def send(self, *messages: m.Message) -> None:
        for message in messages:
            await self.framed.send(message)

    async def send_data(self, body: bytes, chunk: int | None = None) -> None:
        """``DATA n`` and the body, in pieces of ``chunk`` bytes."""
        chunk = chunk or self.repo.chunk
        await self.framed.send(m.Data(len(body)))
        for i in range(0, len(body), chunk):
            await self.framed.send_body(body[i : i + chunk])
            if self.repo.pause_between_chunks:
                await trio.lowlevel.checkpoint()

    async def receive(self) -> LineEvent:
        event = await self.framed.receive_event()
        if not isinstance(event, EndOfStream):
            self.received.append(event)
        return event

    async def receive_body(self, length: int, stop_after: int | None = None) -> bytes:
        """Read a DATA body; with ``stop_after``, read that many bytes and hang up."""
        got = bytearray()
        want = length if stop_after is None else min(stop_after, length)
        try:
            while len(got) < want:
                got += await self.framed.receive_body(want - len(got))
        except StreamLost:
            self.lost_in_body = True
            raise
        self.bodies.append(bytes(got))
        return bytes(got)

    async def hang_up(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def silent(self) -> None:
        """Never answer: read on (so a close is noticed) until the bridge hangs up."""
        while not isinstance(await self.receive(), EndOfStream):
            pass
        raise StreamLost("closed while silent")

    # --- the server ---------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            if await self._greet():
                while True:
                    event = await self.receive()
                    if isinstance(event, EndOfStream):
                        self.eof = True
                        break
                    if isinstance(event, (BadLine, LineTooLong)):
                        await self.send(m.Error("unknown command"))
                        continue
                    await self.handle(event)
        except StreamLost:
            self.eof = True
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            self.finished.set()

    async def _greet(self) -> bool:
        repo = self.repo
        if repo.expects_auth:
            event = await self.receive()
            if not (isinstance(event, m.Auth) and event.token == PEER_TOKEN):
                await self.send(m.AuthFailure())
                return False
        if repo.greeting == "silent":
            await self.silent()
            return False
        if repo.greeting == "close":
            return False
        if repo.greeting == "failure":
            await self.send(m.AuthFailure())
            return False
        uuid = repo.uuid if repo.greeting == "success" else "0ther-uuid"
        await self.send(m.AuthSuccess(uuid))
        self.authenticated = True
        return True

    async def handle(self, message: m.Message) -> None:
        hook = self.repo.hooks.get(type(message))
        if hook is not None:
            await hook(self, message)
            return
        repo = self.repo
        match message:
            case m.Version(version=v):
                self.version = min(v, repo.max_version)
                await self.send(m.Version(self.version))
            case m.Bypass(uuids=uuids):
                self.bypass = uuids
            case m.CheckPresent(key=key):
                await self.send(m.Success() if key in repo.contents else m.Failure())
            case m.LockContent(key=key):
                if key not in repo.contents:
                    await self.send(m.Failure())
                    return
                self.lock_held = repo.locked = True
                await self.send(m.Success())
                after = await self.receive()
                self.lock_held = repo.locked = False
                if not isinstance(after, m.UnlockContent):
                    await self.send(m.Error("expected UNLOCKCONTENT"))
            case m.Remove(key=key):
                repo.contents.pop(key, None)
                await self.send(m.Success())
            case m.RemoveBefore(timestamp=ts, key=key):
                if repo.timestamp >= ts:
                    await self.send(m.Failure())
                    return
                repo.contents.pop(key, None)
                await self.send(m.Success())
            case m.GetTimestamp():
                await self.send(m.Timestamp(repo.timestamp))
            case m.Put(key=key):
                await self._put(key)
            case m.Get(offset=offset, key=key):
                await self._get(offset, key)
            case _:
                await self.send(m.Error("unexpected command"))

    async def _put(self, key: str) -> None:
        repo = self.repo
        if key in repo.contents:
            await self.send(m.AlreadyHave())
            return
        partial = repo.partial.get(key, b"")
        await self.send(m.PutFrom(len(partial)))
        event = await self.receive()
        if isinstance(event, m.DataPresent) and self.version >= 4:
            await self.send(m.Success() if key in repo.contents else m.Failure())
            return
        if not isinstance(event, m.Data):
            await self.send(m.Error("expected DATA"))
            return
        body = await self.receive_body(event.length)
        valid = True
        if self.version >= 1:
            verdict = await self.receive()
            valid = isinstance(verdict, m.Valid)
        if valid:
            repo.contents[key] = partial + body
            repo.partial.pop(key, None)
            await self.send(m.Success())
        else:
            await self.send(m.Failure())

    async def _get(self, offset: int, key: str) -> None:
        content = self.repo.contents.get(key)
        if content is None:
            await self.send(m.Data(0))
            if self.version >= 1:
                await self.send(m.Invalid())
        else:
            await self.send_data(content[offset:])
            if self.version >= 1:
                await self.send(m.Valid())
        verdict = await self.receive()
        if not isinstance(verdict, (m.Success, m.Failure)):
            await self.send(m.Error("expected SUCCESS or FAILURE"))


@dataclass
class FakeRepo:
    """The repository behind the fake peer, shared by all its connections."""

    uuid: str = PEER_UUID
    max_version: int = 4
    greeting: str = "success"  # "success" | "failure" | "wrong-uuid" | "silent" | "close"
    expects_auth: bool = False  # wait for AUTH first (a tor-annex node), else speak first
    contents: dict[str, bytes] = field(default_factory=dict)
    partial: dict[str, bytes] = field(default_factory=dict)  # resumable uploads
    timestamp: int = 1000
    chunk: int = 64 * 1024  # size of the pieces GET bodies are written in
    pause_between_chunks: bool = False
    hooks: dict[type[m.Message], Hook] = field(default_factory=dict)
    connections: list[PeerConnection] = field(default_factory=list)
    locked: bool = False

    def received(self) -> list[list[m.Message | BadLine | LineTooLong]]:
        return [c.received for c in self.connections]


class RecordingChannel(StreamChannel):
    """A StreamChannel that remembers being closed."""

    def __init__(self, framed: FramedStream, uuid: str, version: int) -> None:
        super().__init__(framed, uuid, version)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


def pipe_pair() -> tuple[trio.StapledStream[Any, Any], trio.StapledStream[Any, Any]]:
    """Two ends of a connection made of two OS pipes, as a program's stdin/stdout."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    FdStream = trio.lowlevel.FdStream
    return (
        trio.StapledStream(FdStream(to_w), FdStream(from_r)),
        trio.StapledStream(FdStream(from_w), FdStream(to_r)),
    )


class FakeTransport(Transport):
    """Reaches a FakeRepo over a fresh in-memory stream pair per open.

    The server tasks run in ``server_nursery`` when one is set (so they can
    be watched after the session ended), else in the session's nursery.
    """

    def __init__(
        self,
        repo: FakeRepo | None = None,
        name: str = PEER_NAME,
        server_nursery: trio.Nursery | None = None,
        lockstep: bool = False,
        pipes: bool = False,
    ) -> None:
        self.repo = repo or FakeRepo()
        self.pipes = pipes  # real OS pipes, as to a peer program (bodies are spliced)
        self.name = name
        self.uuid = self.repo.uuid
        self.server_nursery = server_nursery
        self.lockstep = lockstep
        self.unreachable: str | None = None  # open fails with this text
        self.opens: list[tuple[int, tuple[str, ...], SessionInfo]] = []
        self.channels: list[RecordingChannel] = []

    async def open(
        self,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> PeerChannel:
        self.opens.append((version, bypass, session))
        if self.unreachable is not None:
            raise PeerUnavailable(f"{self.name}: {self.unreachable}")
        ours: trio.StapledStream[Any, Any]
        theirs: trio.StapledStream[Any, Any]
        if self.pipes:
            ours, theirs = pipe_pair()
        elif self.lockstep:
            ours, theirs = trio.testing.lockstep_stream_pair()
        else:
            ours, theirs = trio.testing.memory_stream_pair()
        connection = PeerConnection(self.repo, theirs)
        self.repo.connections.append(connection)
        (self.server_nursery or nursery).start_soon(connection.serve)
        framed = FramedStream(ours)
        auth = m.Auth(session.client_uuid, PEER_TOKEN) if self.repo.expects_auth else None
        try:
            agreed = await negotiate(framed, self.name, self.uuid, version, bypass, auth)
        except BaseException:
            with trio.CancelScope(shield=True):
                await framed.aclose()
            raise
        channel = RecordingChannel(framed, self.uuid, agreed)
        self.channels.append(channel)
        return channel
