"""The trio Session (torbridge/server/session.py) over in-memory streams.

The client is the test, writing and reading raw bytes; the peer is the
scripted git-annex server of tests/harness/fakes.py behind a fake Transport.
Byte transcripts check exactly what a client sees; the time-related tests
run on trio's autojump clock, so deadlines cost no real time.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.harness.fakes import (
    CLIENT_UUID,
    PEER_NAME,
    PEER_TOKEN,
    PEER_UUID,
    TOKEN,
    FakeRepo,
    FakeTransport,
    OneToken,
    PeerConnection,
)
from torbridge.config import Limits
from torbridge.protocol import messages as m
from torbridge.protocol.permissions import Mode
from torbridge.server.admission import PendingAuth
from torbridge.server.clientwatch import WATCH_CLIENT_AFTER
from torbridge.server.endpoints import Endpoint
from torbridge.server.session import Session
from torbridge.server.watched import READ_AHEAD_LIMIT
from torbridge.transport.framed import StreamLost

KEY = "SHA256E-s11--2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90.txt"
KEY2 = "SHA256E-s5--f2ca1bb6c7e907d06dafe4687e579fce76b37e4e93b7605022da52e6ccc26fd2.bin"
LIMITS = Limits(auth_timeout=10.0, idle_timeout=300.0, peer_timeout=30.0, stall_timeout=20.0)
GUARD = 10_000.0  # (virtual) seconds after which a test that waits is a test that hangs
AUTH = f"AUTH {CLIENT_UUID} {TOKEN}\n".encode()
AUTH_OK = f"AUTH-SUCCESS {PEER_UUID}\n".encode()
READ_ONLY = b"ERROR this repository is read-only; write access denied\n"
MiB = 1 << 20


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


class _Delegate(trio.abc.HalfCloseableStream):
    def __init__(self, inner: trio.abc.HalfCloseableStream, closed: trio.Event) -> None:
        self.inner = inner
        self.closed = closed  # set once the client end is closed for good

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ClientEnd(_Delegate):
    async def aclose(self) -> None:
        self.closed.set()
        await self.inner.aclose()


class SessionEnd(_Delegate):
    """Tells a half-close from a hang-up, as a unix socket or passed pipes do."""

    async def wait_reader_gone(self) -> None:
        await self.closed.wait()


def connection(lockstep: bool = False) -> tuple[ClientEnd, SessionEnd]:
    ours, theirs = (
        trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    )
    closed = trio.Event()
    return ClientEnd(ours, closed), SessionEnd(theirs, closed)


class Client:
    """The client end of the connection: raw bytes in and out."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, *parts: bytes) -> None:
        for part in parts:
            await self.stream.send_all(part)

    async def send_in_pieces(self, data: bytes, size: int, pause: float = 0.0) -> None:
        for i in range(0, len(data), size):
            await self.stream.send_all(data[i : i + size])
            if pause:
                await trio.sleep(pause)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise AssertionError(f"EOF; wanted {n} bytes, got {bytes(self.buffer)!r}")
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if not await self._fill():
                raise AssertionError(f"EOF inside a line: {bytes(self.buffer)!r}")
        end = self.buffer.index(b"\n") + 1
        out = bytes(self.buffer[:end])
        del self.buffer[:end]
        return out

    async def expect(self, *parts: bytes) -> None:
        for part in parts:
            got = await self.read(len(part))
            assert got == part

    async def rest(self) -> bytes:
        """Everything until the bridge closes the connection."""
        while await self._fill():
            pass
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    async def expect_eof(self) -> None:
        assert await self.rest() == b""

    async def login(self, version: int | None = None, agreed: int | None = None) -> None:
        await self.send(AUTH)
        await self.expect(AUTH_OK)
        if version is not None:
            await self.send(b"VERSION %d\n" % version)
            await self.expect(b"VERSION %d\n" % (version if agreed is None else agreed))


@dataclass
class RecordingLog:
    """Stands in for the LocationLog."""

    records: list[tuple[str, str, bool]] = field(default_factory=list)

    def record(self, key: str, uuid: str, present: bool) -> None:
        self.records.append((key, uuid, present))


@dataclass
class Bridge:
    client: Client
    session: Session
    transport: FakeTransport
    repo: FakeRepo
    admission: OneToken
    log: RecordingLog
    finished: trio.Event

    @property
    def connections(self) -> list[PeerConnection]:
        return self.repo.connections

    async def wait_end(self) -> None:
        with trio.fail_after(GUARD):
            await self.finished.wait()


@asynccontextmanager
async def bridge(
    repo: FakeRepo | None = None,
    mode: Mode = Mode.READ_WRITE,
    limits: Limits = LIMITS,
    lockstep: bool = False,
) -> AsyncIterator[Bridge]:
    """A Session on one end of an in-memory connection, the test on the other.

    On exit the client hangs up and everything (session, peer servers) must
    finish: a test that leaves something hanging fails here.
    """
    repo = repo or FakeRepo()
    log = RecordingLog()
    with trio.fail_after(GUARD * 2):  # whatever hangs, the test fails (in virtual time)
        async with trio.open_nursery() as nursery:
            transport = FakeTransport(repo, server_nursery=nursery, lockstep=lockstep)
            admission = OneToken(mode=mode)
            endpoint = Endpoint("ep", PEER_UUID, transport, Path("/nonexistent"), admission, limits)
            endpoint.location_log = log  # type: ignore[assignment]
            ours, theirs = connection(lockstep)
            session = Session(theirs, endpoint)
            finished = trio.Event()

            async def run() -> None:
                try:
                    await session.run()
                finally:
                    finished.set()

            nursery.start_soon(run)
            b = Bridge(Client(ours), session, transport, repo, admission, log, finished)
            yield b
            with trio.fail_after(GUARD):
                await ours.aclose()
                await finished.wait()
    # Every connection to the peer was closed by the bridge.
    assert all(c.finished.is_set() for c in repo.connections)
    assert all(ch.closed for ch in transport.channels)
    assert admission.released == admission.granted
    assert admission.left_pre_auth == 1


def script(*parts: bytes) -> bytes:
    return b"".join(parts)


# --- byte transcripts ----------------------------------------------------------------


async def test_put_v4_transcript(autojump_clock: trio.abc.Clock) -> None:
    body = b"hello world"
    async with bridge() as b:
        # The whole client side at once: the session must take it one exchange at a time.
        await b.client.send(
            script(AUTH, b"VERSION 4\n", f"PUT  {KEY}\n".encode(), b"DATA 11\n", body, b"VALID\n")
        )
        # The client's EOF comes once it has its answers, as a stock client's:
        # an EOF while the peer works means it left (test_client_leaves_*).
        await b.client.expect(AUTH_OK, b"VERSION 4\n", b"PUT-FROM 0\n", b"SUCCESS\n")
        await b.client.stream.send_eof()
        assert await b.client.rest() == b""
    assert b.repo.contents == {KEY: body}
    [conn] = b.connections
    assert conn.received == [m.Version(4), m.Put(None, KEY), m.Data(11), m.Valid()]
    assert conn.bodies == [body]
    assert b.transport.opens[0][:2] == (4, ())
    assert b.log.records == [(KEY, PEER_UUID, True)]
    assert b.session.outcome == "client closed"


async def test_put_v0_transcript(autojump_clock: trio.abc.Clock) -> None:
    body = b"hello world"
    async with bridge() as b:
        await b.client.send(script(AUTH, f"PUT file.txt {KEY}\n".encode(), b"DATA 11\n", body))
        await b.client.expect(AUTH_OK, b"PUT-FROM 0\n", b"SUCCESS\n")
        await b.client.stream.send_eof()
        assert await b.client.rest() == b""
    [conn] = b.connections
    assert conn.version == 0
    assert conn.received == [m.Put("file.txt", KEY), m.Data(11)]  # no VERSION, no VALID
    assert b.repo.contents == {KEY: body}
    assert b.transport.opens[0][0] == 0


async def test_get_v4_transcript(autojump_clock: trio.abc.Clock) -> None:
    body = b"hello world"
    repo = FakeRepo(contents={KEY: body})
    async with bridge(repo) as b:
        await b.client.send(script(AUTH, b"VERSION 4\n", f"GET 0 dir/f.txt {KEY}\n".encode()))
        await b.client.expect(AUTH_OK, b"VERSION 4\n", b"DATA 11\n", body, b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        await b.client.stream.send_eof()
        assert await b.client.rest() == b""
    [conn] = b.connections
    assert conn.received == [m.Version(4), m.Get(0, "dir/f.txt", KEY), m.Success()]
    assert b.log.records == []  # GET teaches the location log nothing


async def test_get_v0_transcript(autojump_clock: trio.abc.Clock) -> None:
    body = b"hello world"
    repo = FakeRepo(contents={KEY: body})
    async with bridge(repo) as b:
        await b.client.send(script(AUTH, f"GET 6  {KEY}\n".encode(), b"SUCCESS\n"))
        await b.client.stream.send_eof()
        seen = await b.client.rest()
    assert seen == script(AUTH_OK, b"DATA 5\n", b"world")  # no VALID at v0
    [conn] = b.connections
    assert conn.received == [m.Get(6, None, KEY), m.Success()]


async def test_get_missing_content(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA 0\n", b"INVALID\n")
        await b.client.send(b"FAILURE\n", f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")
    assert b.connections[0].received[-2:] == [m.Failure(), m.CheckPresent(KEY)]


async def test_version_is_what_the_peer_agrees(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: b"abc"}, max_version=2)
    async with bridge(repo) as b:
        await b.client.login(4, agreed=2)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA 3\n", b"abc", b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        await b.client.send(f"PUT  {KEY2}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA 5\n12345VALID\n")
        await b.client.expect(b"SUCCESS\n")
    assert b.connections[0].version == 2
    assert b.repo.contents[KEY2] == b"12345"


async def test_big_put_in_many_small_pieces(autojump_clock: trio.abc.Clock) -> None:
    body = blob(MiB)
    async with bridge(lockstep=True) as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA %d\n" % len(body))
        await b.client.send_in_pieces(body, 4093)
        await b.client.send(b"VALID\n")
        await b.client.expect(b"SUCCESS\n")
    assert b.repo.contents[KEY] == body
    assert b.connections[0].received[-2:] == [m.Data(MiB), m.Valid()]


async def test_big_get_in_many_small_pieces(autojump_clock: trio.abc.Clock) -> None:
    body = blob(MiB, seed=2)
    repo = FakeRepo(contents={KEY: body}, chunk=3001)
    async with bridge(repo, lockstep=True) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA %d\n" % MiB)
        got = await b.client.read(MiB)
        assert got == body
        await b.client.expect(b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")


async def test_big_put_resumed_v0(autojump_clock: trio.abc.Clock) -> None:
    body = blob(MiB, seed=3)
    repo = FakeRepo(partial={KEY: body[:1000]})
    async with bridge(repo) as b:
        await b.client.login()
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 1000\n")
        await b.client.send(b"DATA %d\n" % (MiB - 1000))
        await b.client.send_in_pieces(body[1000:], 65536, pause=0.001)
        await b.client.expect(b"SUCCESS\n")
    assert b.repo.contents[KEY] == body


# --- the waitv rule: bodies are never read as lines --------------------------------------


TRAP = b"SUCCESS\nVALID\nDATA 3\nERROR x\n\n"


async def test_put_body_that_looks_like_messages(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        # Header and body arrive in pieces that end exactly at the fake lines.
        await b.client.send(b"DATA %d\n" % len(TRAP))
        for piece in TRAP.split(b"\n")[:-1]:
            await b.client.send(piece + b"\n")
            await trio.sleep(0.01)
        await b.client.send(b"INVALID\n")
        await b.client.expect(b"FAILURE\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")
    [conn] = b.connections
    assert conn.bodies == [TRAP]
    assert conn.received[-3:] == [m.Data(len(TRAP)), m.Invalid(), m.CheckPresent(KEY)]
    assert b.repo.contents == {}


async def test_get_body_that_looks_like_messages(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: TRAP}, chunk=8, pause_between_chunks=True)
    async with bridge(repo) as b:
        await b.client.login(1)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA %d\n" % len(TRAP), TRAP, b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert b.connections[0].received[-2:] == [m.Success(), m.CheckPresent(KEY)]


async def test_stray_data_body_is_skipped(autojump_clock: trio.abc.Clock) -> None:
    hidden = f"CHECKPRESENT {KEY}\nNOTIFYCHANGE\n".encode()
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login(4)
        await b.client.send(b"DATA %d\n" % len(hidden), hidden, f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"ERROR unexpected command\n", b"SUCCESS\n")
    assert b.connections[0].received == [m.Version(4), m.CheckPresent(KEY)]


async def test_data_after_a_lock_is_skipped(autojump_clock: trio.abc.Clock) -> None:
    hidden = b"NOTIFYCHANGE\n"
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login(4)
        await b.client.send(f"LOCKCONTENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await b.client.send(b"DATA %d\n" % len(hidden), hidden, f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"ERROR expected UNLOCKCONTENT\n", b"SUCCESS\n")
    assert b.connections[0].received[1:] == [
        m.LockContent(KEY),
        m.UnlockContent(),
        m.CheckPresent(KEY),
    ]
    assert not b.repo.locked


# --- requests --------------------------------------------------------------------------


async def test_lock_unlock_remove_and_timestamps(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: b"x", KEY2: b"y"}, timestamp=5000)
    async with bridge(repo) as b:
        await b.client.login(4)
        await b.client.send(f"LOCKCONTENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await trio.sleep(1)
        assert repo.locked
        await b.client.send(b"UNLOCKCONTENT\n", b"GETTIMESTAMP\n")
        await b.client.expect(b"TIMESTAMP 5000\n")
        assert not repo.locked
        await b.client.send(f"REMOVE-BEFORE 5600 {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await b.client.send(f"REMOVE-BEFORE 4000 {KEY2}\n".encode())
        await b.client.expect(b"FAILURE\n")
        await b.client.send(f"REMOVE {KEY2}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await b.client.send(f"LOCKCONTENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")
    assert repo.contents == {}
    assert b.log.records == [(KEY, PEER_UUID, False), (KEY2, PEER_UUID, False)]


async def test_lock_then_something_else(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login(4)
        await b.client.send(f"LOCKCONTENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        await b.client.send(f"REMOVE {KEY}\n".encode())
        await b.client.expect(b"ERROR expected UNLOCKCONTENT\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")  # not removed
    assert b.connections[0].received[1:] == [
        m.LockContent(KEY),
        m.UnlockContent(),
        m.CheckPresent(KEY),
    ]


@pytest.mark.parametrize(
    ("mode", "request_line", "answer"),
    [
        (Mode.READ_ONLY, f"PUT  {KEY}\n", READ_ONLY),
        (Mode.READ_ONLY, f"REMOVE {KEY}\n", READ_ONLY),
        (Mode.READ_ONLY, f"REMOVE-BEFORE 9 {KEY}\n", READ_ONLY),
        (
            Mode.APPEND_ONLY,
            f"REMOVE {KEY}\n",
            b"ERROR this repository is append-only; removal denied\n",
        ),
    ],
)
async def test_modes(
    autojump_clock: trio.abc.Clock, mode: Mode, request_line: str, answer: bytes
) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"}), mode=mode) as b:
        await b.client.login()
        await b.client.send(request_line.encode(), f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(answer, b"SUCCESS\n")
    assert b.connections[0].received == [m.CheckPresent(KEY)]


@pytest.mark.parametrize("mode", [Mode.READ_ONLY, Mode.APPEND_ONLY])
async def test_receive_pack_refused(autojump_clock: trio.abc.Clock, mode: Mode) -> None:
    async with bridge(mode=mode) as b:
        await b.client.login()
        await b.client.send(b"CONNECT git-receive-pack\n")
        packet = b"ERR this repository is read-only; write access denied\n"
        pkt = b"%04x" % (len(packet) + 4) + packet
        assert await b.client.rest() == script(b"DATA %d\n" % len(pkt), pkt, b"CONNECTDONE 1\n")
    assert b.transport.opens == []


async def test_unknown_command_and_session_goes_on(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login()
        await b.client.send(b"FROBNICATE\n", b"CHECKPRESENT not-a-key\n", b"SUCCESS\n")
        await b.client.expect(
            b"ERROR unknown command\n", b"ERROR unknown command\n", b"ERROR unexpected command\n"
        )
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")


async def test_notifychange(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login()
        await b.client.send(b"NOTIFYCHANGE\n")
        assert await b.client.rest() == b"ERROR protocol error\n"
    assert b.transport.opens == []
    assert b.session.outcome == "NOTIFYCHANGE is not served"


async def test_client_error_ends_the_session(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(b"ERROR bye\n")
        assert await b.client.rest() == b""
    assert b.session.outcome == "client error: bye"


# --- AUTH --------------------------------------------------------------------------------


async def test_wrong_token(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        start = trio.current_time()
        await b.client.send(f"AUTH {CLIENT_UUID} 0badc0ffee\n".encode())
        await b.client.expect(b"AUTH-FAILURE\n")
        assert await b.client.rest() == b""
        # Closed after the linger, not at once.
        assert 1.0 <= trio.current_time() - start < 2.0
    assert b.admission.granted == 0
    assert b.transport.opens == []


async def test_token_is_case_insensitive(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.send(f"AUTH {CLIENT_UUID} {TOKEN.upper()}\n".encode())
        await b.client.expect(AUTH_OK)
    assert b.admission.granted == 1


async def test_first_message_not_auth(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await b.client.rest() == b"ERROR unexpected command\n"
    assert b.admission.endpoints == []


@pytest.mark.parametrize("sent", [b"", b"AUTH " + CLIENT_UUID.encode()])
async def test_auth_deadline(autojump_clock: trio.abc.Clock, sent: bytes) -> None:
    async with bridge() as b:
        start = trio.current_time()
        await b.client.send(sent)
        assert await b.client.rest() == b""
        assert LIMITS.auth_timeout <= trio.current_time() - start < LIMITS.auth_timeout + 1
    assert b.session.outcome.startswith("client lost")


async def test_auth_deadline_is_not_reset_by_trickling(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        start = trio.current_time()

        async def trickle() -> None:
            try:
                for byte in AUTH:  # one byte every 2 s: 256 s for the whole line
                    await b.client.send(bytes([byte]))
                    await trio.sleep(2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await b.client.rest() == b""
            assert trio.current_time() - start < LIMITS.auth_timeout + 1
            nursery.cancel_scope.cancel()
    assert b.admission.granted == 0


@pytest.mark.parametrize("sent", [b"", b"AUTH " + CLIENT_UUID.encode()])
async def test_evicted_before_auth(autojump_clock: trio.abc.Clock, sent: bytes) -> None:
    # The oldest unauthenticated connection, when max_unauthenticated is full
    # (server/admission.py): closed at once, without a word, nothing started.
    async with bridge() as b:
        await b.client.send(sent)
        await trio.sleep(1)
        start = trio.current_time()
        b.session.pending.evict()
        assert await b.client.rest() == b""
        assert trio.current_time() - start < 0.1  # neither the deadline nor a drain
        await b.wait_end()
    assert b.session.outcome == "client lost: evicted: too many unauthenticated connections"
    assert b.admission.granted == 0 and b.admission.endpoints == []
    assert b.transport.opens == []


async def test_eviction_after_auth_changes_nothing(autojump_clock: trio.abc.Clock) -> None:
    # AUTH takes the connection off the pre-auth list; a late evict() is moot.
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login(4)
        b.session.pending.evict()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert b.session.outcome == "client closed"


async def test_evicted_before_the_session_reads() -> None:
    pending = PendingAuth()
    pending.evict()
    with pending.evictable() as scope:
        await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_idle_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(contents={KEY: b"x"})) as b:
        await b.client.login()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
        start = trio.current_time()
        assert await b.client.rest() == b""
        assert LIMITS.idle_timeout <= trio.current_time() - start < LIMITS.idle_timeout + 1
    assert b.session.outcome.startswith("client lost")


# --- peer failures ---------------------------------------------------------------------


async def _silent_on_first_connection(conn: PeerConnection, message: m.Message) -> None:
    if conn is conn.repo.connections[0]:
        await conn.silent()
    await conn.send(m.Success())


async def test_peer_never_answers(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(hooks={m.CheckPresent: _silent_on_first_connection})
    async with bridge(repo) as b:
        await b.client.login()  # v0: the request opens a fresh connection
        start = trio.current_time()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(f"ERROR {PEER_NAME}: no message before the deadline\n".encode())
        assert LIMITS.peer_timeout <= trio.current_time() - start < LIMITS.peer_timeout + 1
        # The session goes on, with a new connection.
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert len(b.connections) == 2
    assert b.connections[0].eof


async def test_peer_never_answers_on_a_reused_connection(autojump_clock: trio.abc.Clock) -> None:
    # A silent peer is not a stale connection: the client is told after one
    # peer_timeout, not after a retry doubled it; the next request reconnects.
    repo = FakeRepo(hooks={m.CheckPresent: _silent_on_first_connection})
    async with bridge(repo) as b:
        await b.client.login(4)
        start = trio.current_time()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        reply = await b.client.line()
        assert reply.startswith(f"ERROR {PEER_NAME}: no message before the deadline".encode())
        assert trio.current_time() - start < 2 * LIMITS.peer_timeout
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert len(b.connections) == 2


# --- a client that leaves while its session waits on the peer ----------------------------


async def _silent(conn: PeerConnection, message: m.Message) -> None:
    await conn.silent()


@pytest.mark.parametrize("half_close_first", [False, True])
@pytest.mark.parametrize("after", [0.0, 3.0])
async def test_client_leaves_while_the_peer_is_silent(
    autojump_clock: trio.abc.Clock, half_close_first: bool, after: float
) -> None:
    # Without the watch, the session (and its peer, a git-annex-shell or a
    # node connection) would stay until peer_timeout.
    async with bridge(FakeRepo(hooks={m.Get: _silent})) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0 f {KEY}\n".encode())
        await trio.sleep(after)
        if half_close_first:  # not leaving: it may still read the answer
            await b.client.stream.send_eof()
            await trio.sleep(LIMITS.peer_timeout / 2)
            assert not b.finished.is_set()
        start = trio.current_time()
        await b.client.stream.aclose()
        await b.wait_end()
        # Noticed once the peer has been silent for WATCH_CLIENT_AFTER, at the latest.
        assert trio.current_time() - start <= WATCH_CLIENT_AFTER + 0.01
    assert b.session.outcome.startswith("client lost: hung up while waiting for the peer")
    assert b.transport.channels[0].closed and b.connections[0].eof
    assert b.admission.released == 1


async def test_half_closed_client_gets_its_answers(autojump_clock: trio.abc.Clock) -> None:
    # A script piping its requests in closes its sending side first, as
    # `printf ... | git-annex-p2p-torbridge ADDR` does; git-annex's own
    # server answers it, and so does the bridge, however slow the peer.
    async def slow(conn: PeerConnection, message: m.Message) -> None:
        await trio.sleep(LIMITS.peer_timeout / 2)
        await conn.send(m.Success())

    async with bridge(FakeRepo(hooks={m.CheckPresent: slow})) as b:
        await b.client.send(AUTH, b"VERSION 4\n", f"CHECKPRESENT {KEY}\n".encode())
        await b.client.stream.send_eof()
        await b.client.expect(AUTH_OK, b"VERSION 4\n", b"SUCCESS\n")
        assert await b.client.rest() == b""
    assert b.session.outcome == "client closed"


async def test_client_leaves_while_the_peer_opens(autojump_clock: trio.abc.Clock) -> None:
    async with bridge(FakeRepo(greeting="silent")) as b:
        await b.client.login()  # v0: the request opens the peer
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await trio.sleep(1)
        start = trio.current_time()
        await b.client.stream.aclose()
        await b.wait_end()
        assert trio.current_time() - start < 1
    assert b.session.outcome.startswith("client lost: hung up while waiting for the peer")
    assert b.connections[0].eof and b.transport.channels == []


async def test_client_leaves_after_a_put_body(autojump_clock: trio.abc.Clock) -> None:
    # The body and VALID reached the peer: it stores; only its answer is lost.
    async def slow_result(conn: PeerConnection, message: m.Message) -> None:
        await conn.receive_body(11)
        assert await conn.receive() == m.Valid()
        await trio.sleep(LIMITS.peer_timeout / 2)
        conn.repo.contents[KEY] = conn.bodies[-1]
        with contextlib.suppress(StreamLost, trio.BrokenResourceError):
            await conn.send(m.Success())

    async def put(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        assert isinstance(await conn.receive(), m.Data)
        await slow_result(conn, message)

    async with bridge(FakeRepo(hooks={m.Put: put})) as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA 11\n", b"hello world", b"VALID\n")
        await trio.sleep(1)
        start = trio.current_time()
        await b.client.stream.aclose()
        await b.wait_end()
        assert trio.current_time() - start < 1
    assert b.session.outcome.startswith("client lost: hung up while waiting for the peer")
    assert b.log.records == []  # not recorded: the peer's SUCCESS never came


async def test_bytes_sent_while_the_peer_works_are_kept(autojump_clock: trio.abc.Clock) -> None:
    # Out of step, but nothing read while watching may be lost or reordered,
    # also past the read-ahead limit (the watch then stops reading).
    async def slow(conn: PeerConnection, message: m.Message) -> None:
        if message == m.CheckPresent(KEY):
            await trio.sleep(5)
            await conn.send(m.Success())
        else:
            await conn.send(m.Failure())

    n = 3 * READ_AHEAD_LIMIT // len(f"CHECKPRESENT {KEY2}\n") + 1
    async with bridge(FakeRepo(hooks={m.CheckPresent: slow})) as b:
        await b.client.login(4)
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await trio.sleep(1)  # the session waits on the peer now
        await b.client.send(f"CHECKPRESENT {KEY2}\n".encode() * n, b"GETTIMESTAMP\n")
        await b.client.expect(b"SUCCESS\n", *[b"FAILURE\n"] * n)
        assert (await b.client.line()).startswith(b"TIMESTAMP ")
    [conn] = b.connections
    assert conn.received[1:] == [m.CheckPresent(KEY), *[m.CheckPresent(KEY2)] * n, m.GetTimestamp()]
    assert b.session.outcome == "client closed"


async def test_stale_connection_is_retried_once(autojump_clock: trio.abc.Clock) -> None:
    async def hang_up_twice(conn: PeerConnection, message: m.Message) -> None:
        if len(conn.repo.connections) <= 2:
            await conn.hang_up()
            raise StreamLost("hung up")
        await conn.send(m.Success())

    async with bridge(FakeRepo(hooks={m.CheckPresent: hang_up_twice})) as b:
        await b.client.login(4)
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(f"ERROR {PEER_NAME}: connection closed\n".encode())
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert len(b.connections) == 3


@pytest.mark.parametrize(
    ("configure", "reason"),
    [
        ({"greeting": "failure"}, f"{PEER_NAME} refused our token (AUTH-FAILURE)"),
        ({"greeting": "wrong-uuid"}, f"{PEER_NAME} is repository 0ther-uuid, expected {PEER_UUID}"),
        ({"greeting": "close"}, f"{PEER_NAME}: peer closed the connection"),
        ({"greeting": "silent"}, "no answer before the deadline"),
    ],
)
async def test_peer_unreachable(
    autojump_clock: trio.abc.Clock, configure: dict[str, str], reason: str
) -> None:
    repo = FakeRepo(contents={KEY: b"x"}, **configure)  # type: ignore[arg-type]
    async with bridge(repo) as b:
        await b.client.login()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(f"ERROR {PEER_NAME}: unreachable\n".encode())
        # The next request tries again.
        repo.greeting = "success"
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert len(b.transport.opens) == 2


async def test_peer_transport_refuses(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        b.transport.unreachable = "connection refused"
        await b.client.login()
        await b.client.send(b"VERSION 4\n")
        # Told why, then closed: an ERROR alone would leave the client at v0.
        await b.client.expect(f"ERROR {PEER_NAME}: unreachable\n".encode())
        await b.client.expect_eof()
    assert [v for v, _, _ in b.transport.opens] == [4]


async def test_peer_that_authenticates_us(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: b"x"}, expects_auth=True)
    async with bridge(repo) as b:
        await b.client.login(4)
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"SUCCESS\n")
    assert b.connections[0].received[0] == m.Auth(CLIENT_UUID, PEER_TOKEN)
    assert b.connections[0].authenticated


async def test_peer_dies_mid_put_body(autojump_clock: trio.abc.Clock) -> None:
    async def die_mid_body(conn: PeerConnection, message: m.Message) -> None:
        if len(conn.repo.connections) > 1:
            await conn.send(m.AlreadyHave())
            return
        await conn.send(m.PutFrom(0))
        data = await conn.receive()
        assert isinstance(data, m.Data)
        await conn.receive_body(data.length, stop_after=1000)
        await conn.hang_up()
        raise StreamLost("hung up")

    body = blob(100_000)
    async with bridge(FakeRepo(hooks={m.Put: die_mid_body})) as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA %d\n" % len(body))
        await b.client.send_in_pieces(body, 10_000, pause=0.01)
        await b.client.send(b"VALID\n")
        await b.client.expect(f"ERROR {PEER_NAME}: connection lost during transfer\n".encode())
        # The next request reopens the peer.
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"ALREADY-HAVE\n")
    assert len(b.connections) == 2
    assert b.connections[0].bodies == [body[:1000]]
    assert b.log.records == []


async def test_client_vanishes_mid_put_body(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA 100000\n", blob(5000))
        await trio.sleep(1)
        await b.client.stream.aclose()
        await b.wait_end()
    [conn] = b.connections
    assert b.transport.channels[0].closed
    assert conn.eof and conn.lost_in_body
    assert b.repo.contents == {}
    assert b.session.outcome.startswith("client lost")


async def test_peer_dies_mid_get_body(autojump_clock: trio.abc.Clock) -> None:
    async def die_mid_body(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Data(10_000))
        await conn.framed.send_body(b"x" * 100)
        await conn.hang_up()
        raise StreamLost("hung up")

    async with bridge(FakeRepo(hooks={m.Get: die_mid_body})) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        # A GET body cannot be completed: the client is disconnected.
        assert await b.client.rest() == script(b"DATA 10000\n", b"x" * 100)
    assert b.session.outcome.startswith(f"{PEER_NAME} lost during GET")


async def test_peer_dies_before_the_first_get_byte(autojump_clock: trio.abc.Clock) -> None:
    async def die_after_header(conn: PeerConnection, message: m.Message) -> None:
        # A header, and not one byte of the body (raw: FramedStream would hold it).
        await conn.framed.stream.send_all(m.serialise(m.Data(10_000)))
        await conn.hang_up()
        raise StreamLost("hung up")

    async with bridge(FakeRepo(hooks={m.Get: die_after_header})) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        # The client never saw DATA: it is told in words, and the session goes on.
        reply = await b.client.line()
        assert reply.startswith(f"ERROR {PEER_NAME}: ".encode()), reply
        await b.client.send(b"GETTIMESTAMP\n")
        await b.client.expect(b"TIMESTAMP 1000\n")
    assert [c.received[-1] for c in b.connections] == [m.Get(0, None, KEY), m.GetTimestamp()]


async def test_peer_dies_before_valid(autojump_clock: trio.abc.Clock) -> None:
    async def die_before_valid(conn: PeerConnection, message: m.Message) -> None:
        await conn.send_data(b"abc")
        await conn.hang_up()
        raise StreamLost("hung up")

    async with bridge(FakeRepo(hooks={m.Get: die_before_valid})) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA 3\n", b"abc", b"INVALID\n")
        await b.client.send(b"SUCCESS\n", b"GETTIMESTAMP\n")
        await b.client.expect(b"TIMESTAMP 1000\n")
    assert len(b.connections) == 2
    assert b.connections[1].received == [m.Version(4), m.GetTimestamp()]


async def test_peer_breaks_the_protocol(autojump_clock: trio.abc.Clock) -> None:
    async def garbage(conn: PeerConnection, message: m.Message) -> None:
        if len(conn.repo.connections) == 1:
            await conn.send(m.PutFrom(0))  # not an answer to CHECKPRESENT
            await conn.silent()
        await conn.send(m.Failure())

    async with bridge(FakeRepo(hooks={m.CheckPresent: garbage})) as b:
        await b.client.login(4)
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        why = "protocol error: unexpected PutFrom to CheckPresent"
        await b.client.expect(f"ERROR {PEER_NAME}: {why}\n".encode())
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")
    assert len(b.connections) == 2


# --- stalls ------------------------------------------------------------------------------


async def test_client_stalls_mid_put_body(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        start = trio.current_time()
        await b.client.send(b"DATA 100000\n", blob(5000))
        assert await b.client.rest() == b""  # nothing more, then closed
        assert LIMITS.stall_timeout <= trio.current_time() - start < LIMITS.stall_timeout + 1
    assert b.connections[0].lost_in_body
    assert b.session.outcome.startswith("client lost")


async def test_peer_stalls_mid_get_body(autojump_clock: trio.abc.Clock) -> None:
    async def stall(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Data(10_000))
        await conn.framed.send_body(b"y" * 10)
        await conn.silent()

    async with bridge(FakeRepo(hooks={m.Get: stall})) as b:
        await b.client.login(4)
        start = trio.current_time()
        await b.client.send(f"GET 0  {KEY}\n".encode())
        assert await b.client.rest() == script(b"DATA 10000\n", b"y" * 10)
        # The peer's side of a body is the peer's deadline, not the client's stall.
        assert LIMITS.peer_timeout <= trio.current_time() - start < LIMITS.peer_timeout + 1
    assert b.session.outcome.startswith(f"{PEER_NAME} lost during GET")


# --- a working peer, silent for as long as its work takes ---------------------------------
#
# With the default limits nothing cuts a peer that works: git-annex, talking
# to the repository directly, waits as long as it takes. SILENCE is longer
# than every deadline the bridge had by default before (peer_timeout 600 s,
# stall_timeout 300 s), several times over.
SILENCE = 5000.0
DEFAULTS = Limits()


def test_defaults_have_no_peer_deadline() -> None:
    assert DEFAULTS.peer_timeout == 0
    assert SILENCE > 8 * 600
    assert DEFAULTS.stall_timeout < SILENCE


async def test_node_hashing_before_its_put_result(autojump_clock: trio.abc.Clock) -> None:
    async def hashing(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        assert isinstance(await conn.receive(), m.Data)
        body = await conn.receive_body(11)
        assert await conn.receive() == m.Valid()
        await trio.sleep(SILENCE)
        conn.repo.contents[KEY] = body
        await conn.send(m.Success())

    async with bridge(FakeRepo(hooks={m.Put: hashing}), limits=DEFAULTS) as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {KEY}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        start = trio.current_time()
        await b.client.send(b"DATA 11\n", b"hello world", b"VALID\n")
        await b.client.expect(b"SUCCESS\n")
        assert trio.current_time() - start >= SILENCE
    assert b.repo.contents == {KEY: b"hello world"}


@pytest.mark.parametrize("where", ["before DATA", "mid-body"])
async def test_special_remote_slow_to_retrieve(autojump_clock: trio.abc.Clock, where: str) -> None:
    content = blob(10_000, seed=3)

    async def retrieving(conn: PeerConnection, message: m.Message) -> None:
        if where == "before DATA":
            await trio.sleep(SILENCE)
        await conn.send(m.Data(len(content)))
        await conn.framed.send_body(content[:4000])
        if where == "mid-body":
            await trio.sleep(SILENCE)
        await conn.framed.send_body(content[4000:])
        await conn.send(m.Valid())
        assert await conn.receive() == m.Success()

    async with bridge(FakeRepo(hooks={m.Get: retrieving}), limits=DEFAULTS) as b:
        await b.client.login(4)
        start = trio.current_time()
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA 10000\n", content, b"VALID\n")
        assert trio.current_time() - start >= SILENCE
        await b.client.send(b"SUCCESS\n")
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")  # the session goes on


async def test_client_leaves_while_the_peer_stalls_mid_body(
    autojump_clock: trio.abc.Clock,
) -> None:
    # With no deadline on the peer, only the client's leaving ends the wait:
    # it must, at once, or the session and its peer stay for good.
    async def stall(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Data(10_000))
        await conn.framed.send_body(b"y" * 10)
        await conn.silent()

    async with bridge(FakeRepo(hooks={m.Get: stall}), limits=DEFAULTS) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA 10000\n", b"y" * 10)
        await trio.sleep(SILENCE)
        assert not b.finished.is_set()
        start = trio.current_time()
        await b.client.stream.aclose()
        await b.wait_end()
        assert trio.current_time() - start < 1
    assert b.session.outcome.startswith("client lost: hung up while waiting for the peer")
    assert b.transport.channels[0].closed and b.connections[0].eof


# A body that keeps moving is never cut, however long it takes: idle_timeout
# and peer_timeout are about protocol silence between messages, and inside a
# body only "no byte moved" applies (stall_timeout for the client's part,
# peer_timeout for the peer's). The bodies below take 40
# steps of 0.75 x stall_timeout: 600 s, twice idle_timeout + peer_timeout.
SLOW_STEPS = 40
SLOW_PAUSE = 0.75 * LIMITS.stall_timeout
SLOW_PIECE = 997


async def test_slow_steady_put_body_is_never_cut(autojump_clock: trio.abc.Clock) -> None:
    content = blob(SLOW_STEPS * SLOW_PIECE, seed=7)
    key = f"SHA256E-s{len(content)}--" + "ab" * 32
    assert 1.5 * (LIMITS.idle_timeout + LIMITS.peer_timeout) < SLOW_STEPS * SLOW_PAUSE
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {key}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        start = trio.current_time()
        await b.client.send(b"DATA %d\n" % len(content))
        await b.client.send_in_pieces(content, SLOW_PIECE, pause=SLOW_PAUSE)
        await b.client.send(b"VALID\n")
        await b.client.expect(b"SUCCESS\n")
        took = trio.current_time() - start
        assert took >= SLOW_STEPS * SLOW_PAUSE  # it did take that long, and was not cut
    assert b.repo.contents[key] == content
    assert not b.connections[0].lost_in_body


async def test_slow_steady_get_body_is_never_cut(autojump_clock: trio.abc.Clock) -> None:
    content = blob(SLOW_STEPS * SLOW_PIECE, seed=8)

    async def slow_get(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Data(len(content)))
        for i in range(0, len(content), SLOW_PIECE):
            await conn.framed.send_body(content[i : i + SLOW_PIECE])
            await trio.sleep(SLOW_PAUSE)
        await conn.send(m.Valid())
        assert isinstance(await conn.receive(), m.Success)

    async with bridge(FakeRepo(hooks={m.Get: slow_get})) as b:
        await b.client.login(4)
        start = trio.current_time()
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA %d\n" % len(content), content, b"VALID\n")
        await b.client.send(b"SUCCESS\n")
        assert trio.current_time() - start >= SLOW_STEPS * SLOW_PAUSE
        # The session goes on after the slow body.
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        await b.client.expect(b"FAILURE\n")
    assert b.session.outcome == "client closed"


async def test_slow_put_body_that_stops_is_cut_at_stall_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The same slow body, stopping half-way: cut stall_timeout after its last byte."""
    content = blob(SLOW_STEPS * SLOW_PIECE, seed=9)
    key = f"SHA256E-s{len(content)}--" + "cd" * 32
    async with bridge() as b:
        await b.client.login(4)
        await b.client.send(f"PUT  {key}\n".encode())
        await b.client.expect(b"PUT-FROM 0\n")
        await b.client.send(b"DATA %d\n" % len(content))
        half = len(content) // 2
        await b.client.send_in_pieces(content[:half], SLOW_PIECE, pause=SLOW_PAUSE)
        last_byte = trio.current_time() - SLOW_PAUSE  # (send_in_pieces pauses after each)
        assert await b.client.rest() == b""  # then it stops: closed, nothing said
        cut = trio.current_time() - last_byte
        assert LIMITS.stall_timeout <= cut < LIMITS.stall_timeout + 1, cut
    assert b.connections[0].lost_in_body
    assert key not in b.repo.contents
    assert b.session.outcome.startswith("client lost")


async def test_slow_get_body_that_stops_is_cut_at_peer_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The peer stopped, so the operator's peer_timeout (none by default) cuts it.
    content = blob(SLOW_STEPS * SLOW_PIECE, seed=10)
    sent_last: list[float] = []

    async def slow_then_stop(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Data(len(content)))
        for i in range(0, len(content) // 2, SLOW_PIECE):
            await conn.framed.send_body(content[i : i + SLOW_PIECE])
            sent_last[:] = [trio.current_time()]
            await trio.sleep(SLOW_PAUSE)
        await conn.silent()

    async with bridge(FakeRepo(hooks={m.Get: slow_then_stop})) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        got = await b.client.rest()
        cut = trio.current_time() - sent_last[0]
        assert got.startswith(b"DATA %d\n" % len(content))
        assert len(got) < len(content)
        assert LIMITS.peer_timeout <= cut < LIMITS.peer_timeout + 1, cut
    assert b.session.outcome.startswith(f"{PEER_NAME} lost during GET")


async def test_client_that_does_not_read_a_get_body(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo(contents={KEY: blob(MiB)})
    async with bridge(repo, lockstep=True) as b:
        await b.client.login(4)
        await b.client.send(f"GET 0  {KEY}\n".encode())
        await b.client.expect(b"DATA %d\n" % MiB)
        await b.wait_end()  # the client reads no more: the bridge gives up on it
        assert trio.current_time() < LIMITS.stall_timeout + 10
    assert b.session.outcome.startswith("client lost")
    assert b.transport.channels[0].closed


# --- more AUTH ------------------------------------------------------------------------------


async def test_line_over_the_limit_before_auth(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.send(b"AUTH " + b"a" * (m.MAX_LINE + 10))
        assert await b.client.rest() == b""
        assert trio.current_time() < LIMITS.auth_timeout  # not the deadline: the cap
    assert b.session.outcome == "client sent a line over the limit"


async def test_client_uuid_that_is_not_a_uuid(autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        await b.client.send(f"AUTH --upload-pack=evil {TOKEN}\n".encode())
        await b.client.expect(b"AUTH-FAILURE\n")
        assert await b.client.rest() == b""
    assert b.admission.granted == 0


async def test_bytes_read_before_the_session(autojump_clock: trio.abc.Clock) -> None:
    # The daemon may have read the first bytes already (session.py's ``initial``).
    repo = FakeRepo(contents={KEY: b"x"})
    async with trio.open_nursery() as nursery:
        transport = FakeTransport(repo, server_nursery=nursery)
        admission = OneToken()
        endpoint = Endpoint("ep", PEER_UUID, transport, Path("/nonexistent"), admission, LIMITS)
        ours, theirs = trio.testing.memory_stream_pair()
        session = Session(theirs, endpoint, initial=AUTH + b"VERS")
        nursery.start_soon(session.run)
        client = Client(ours)
        await client.send(f"ION 4\nCHECKPRESENT {KEY}\n".encode())
        await client.expect(AUTH_OK, b"VERSION 4\n", b"SUCCESS\n")
        await ours.aclose()
    assert session.outcome == "client closed"


# --- a whole session at once -----------------------------------------------------------------


async def test_pipelined_v4_session_transcript(autojump_clock: trio.abc.Clock) -> None:
    """Everything a client would send in one write: each exchange still runs in turn."""
    repo = FakeRepo(contents={KEY: b"0123456789a"}, timestamp=77)
    new = blob(70_000, seed=9)
    client_bytes = script(
        AUTH,
        b"VERSION 4\n",
        f"CHECKPRESENT {KEY}\n".encode(),
        f"CHECKPRESENT {KEY2}\n".encode(),
        f"LOCKCONTENT {KEY}\n".encode(),
        b"UNLOCKCONTENT\n",
        b"GETTIMESTAMP\n",
        f"PUT  {KEY}\n".encode(),
        f"PUT new.bin {KEY2}\n".encode(),
        b"DATA 70000\n",
        new,
        b"VALID\n",
        f"GET 3 f {KEY}\n".encode(),
        b"SUCCESS\n",
        f"PUT  {KEY2}\n".encode(),
        f"REMOVE-BEFORE 700 {KEY}\n".encode(),
        b"NOTIFYCHANGE\n",
        f"CHECKPRESENT {KEY}\n".encode(),  # never read: NOTIFYCHANGE ended the session
    )
    async with bridge(repo) as b:
        await b.client.send(client_bytes)
        seen = await b.client.rest()
    assert seen == script(
        AUTH_OK,
        b"VERSION 4\n",
        b"SUCCESS\n",
        b"FAILURE\n",
        b"SUCCESS\n",
        b"TIMESTAMP 77\n",
        b"ALREADY-HAVE\n",
        b"PUT-FROM 0\n",
        b"SUCCESS\n",
        b"DATA 8\n",
        b"3456789a",
        b"VALID\n",
        b"ALREADY-HAVE\n",
        b"SUCCESS\n",
        b"ERROR protocol error\n",
    )
    assert repo.contents == {KEY2: new}
    assert b.log.records == [(KEY2, PEER_UUID, True), (KEY, PEER_UUID, False)]
    assert len(b.connections) == 1
