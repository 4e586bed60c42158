"""DATA bodies moved by splice(2) (transport/splice.py, Session._copy_body).

Real descriptors here, no git-annex: the client on a unix socket (as tor
connects), the peer on two OS pipes (as a peer program's stdin/stdout),
the peer being the scripted server of tests/harness/fakes.py.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.harness.fakes import (
    CLIENT_UUID,
    TOKEN,
    FakeRepo,
    FakeTransport,
    OneToken,
    PeerConnection,
)
from torbridge.config import Limits
from torbridge.protocol import messages as m
from torbridge.server.endpoints import Endpoint
from torbridge.server.session import Session
from torbridge.transport import splice
from torbridge.transport.framed import StreamLost

MiB = 1 << 20
BODY = random.Random(5).randbytes(3 * MiB + 12345)  # past several 256 KiB relay chunks
KEY = f"SHA256E-s{len(BODY)}--" + "ab" * 32
LIMITS = Limits(auth_timeout=10.0, idle_timeout=300.0, peer_timeout=30.0, stall_timeout=20.0)
PEER_UUID = FakeRepo().uuid


# --- splice_some on its own ----------------------------------------------------------------


async def test_pipe_to_pipe_socket_to_pipe_pipe_to_socket() -> None:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    os.set_blocking(a_r, False)
    os.set_blocking(b_w, False)
    os.write(a_w, b"x" * 1000)
    assert splice.can_splice(a_r, b_w)
    assert await splice.splice_some(a_r, b_w, 600) == 600
    assert os.read(b_r, 4096) == b"x" * 600
    os.close(a_w)
    assert await splice.splice_some(a_r, b_w, 4096) == 400
    assert os.read(b_r, 4096) == b"x" * 400
    assert await splice.splice_some(a_r, b_w, 4096) == 0  # EOF
    s1, s2 = socket.socketpair()
    s2.setblocking(False)
    s1.sendall(b"from a socket")
    assert await splice.splice_some(s2.fileno(), b_w, 100) == 13
    assert os.read(b_r, 100) == b"from a socket"
    c_r, c_w = os.pipe()
    os.set_blocking(c_r, False)
    os.write(c_w, b"to a socket")
    assert await splice.splice_some(c_r, s2.fileno(), 100) == 11
    assert s1.recv(100) == b"to a socket"
    # Two sockets: no pipe on either end, so not spliced.
    assert not splice.can_splice(s1.fileno(), s2.fileno())
    for fd in (a_r, b_r, b_w, c_r, c_w):
        os.close(fd)
    s1.close()
    s2.close()


async def test_a_full_destination_is_waited_for_and_named() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    for fd in (src_r, dst_w):
        os.set_blocking(fd, False)
    os.write(src_w, b"y" * 4096)
    while True:  # fill the destination pipe
        try:
            os.write(dst_w, b"z" * 65536)
        except BlockingIOError:
            break
    with trio.move_on_after(0.5) as scope:
        await splice.splice_some(src_r, dst_w, 4096)
    assert scope.cancelled_caught
    assert splice.waiting_for_reader(src_r, dst_w)  # the destination, not the source
    while os.read(dst_r, 1 << 20):  # drain: it goes on
        if not splice.waiting_for_reader(src_r, dst_w):
            break
    assert await splice.splice_some(src_r, dst_w, 4096) > 0
    for fd in (src_r, src_w, dst_r, dst_w):
        os.close(fd)


# --- through a session -----------------------------------------------------------------------


@dataclass
class Wired:
    client: trio.SocketStream
    session: Session
    repo: FakeRepo
    buffer: bytearray

    async def send(self, data: bytes) -> None:
        await self.client.send_all(data)

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.client.receive_some(1 << 20)
            if not data:
                raise AssertionError(f"EOF after {bytes(self.buffer[:80])!r}")
            self.buffer += data
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = await self.client.receive_some(1 << 20)
            if not data:
                raise AssertionError(f"EOF after {bytes(self.buffer[:80])!r}")
            self.buffer += data
        i = self.buffer.index(b"\n") + 1
        out = bytes(self.buffer[:i])
        del self.buffer[:i]
        return out


@asynccontextmanager
async def wired(repo: FakeRepo, limits: Limits = LIMITS) -> AsyncIterator[Wired]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    async with trio.open_nursery() as nursery:
        transport = FakeTransport(repo, server_nursery=nursery, pipes=True)
        endpoint = Endpoint("ep", PEER_UUID, transport, Path("/nonexistent"), OneToken(), limits)
        session = Session(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)), endpoint)
        nursery.start_soon(session.run)
        w = Wired(client, session, repo, bytearray())
        await w.send(f"AUTH {CLIENT_UUID} {TOKEN}\nVERSION 4\n".encode())
        assert await w.line() == f"AUTH-SUCCESS {PEER_UUID}\n".encode()
        assert await w.line() == b"VERSION 4\n"
        yield w
        await client.aclose()


def spliced(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        int(r.getMessage().split()[1])
        for r in caplog.records
        if "moved by splice" in r.getMessage()
    ]


async def test_put_and_get_bodies_are_spliced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="torbridge.session")
    repo = FakeRepo()
    with trio.fail_after(60):
        async with wired(repo) as w:
            await w.send(f"PUT file {KEY}\n".encode())
            assert await w.line() == b"PUT-FROM 0\n"
            await w.send(b"DATA %d\n" % len(BODY) + BODY + b"VALID\n")
            assert await w.line() == b"SUCCESS\n"
            await w.send(f"GET 1000 file {KEY}\n".encode())
            assert await w.line() == b"DATA %d\n" % (len(BODY) - 1000)
            assert await w.read(len(BODY) - 1000) == BODY[1000:]
            assert await w.line() == b"VALID\n"
            await w.send(b"SUCCESS\n")
            await w.send(f"CHECKPRESENT {KEY}\n".encode())  # lines after the bodies are intact
            assert await w.line() == b"SUCCESS\n"
            session = w.session
    assert repo.contents == {KEY: BODY}
    put, get = spliced(caplog)
    # All but the first piece of each (the one that takes the held DATA line).
    assert len(BODY) - put <= 256 * 1024 and len(BODY) - 1000 - get <= 256 * 1024
    assert session.bytes_in > len(BODY) and session.bytes_out > len(BODY) - 1000


async def test_peer_not_reading_mid_body(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def stop_reading(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.PutFrom(0))
        assert isinstance(await conn.receive(), m.Data)
        await conn.framed.receive_body(1 << 20)
        await trio.sleep(LIMITS.stall_timeout * 3)  # reads nothing more meanwhile
        await conn.hang_up()
        raise StreamLost("stopped reading")

    repo = FakeRepo(hooks={m.Put: stop_reading})
    async with wired(repo) as w:
        await w.send(f"PUT file {KEY}\n".encode())
        assert await w.line() == b"PUT-FROM 0\n"
        await w.send(b"DATA %d\n" % len(BODY) + BODY + b"VALID\n")
        reply = await w.line()
        assert reply == b"ERROR node1: connection lost during transfer\n", reply
        await w.send(f"CHECKPRESENT {KEY}\n".encode())  # the session goes on
        assert (await w.line()).startswith((b"SUCCESS", b"FAILURE"))
    assert repo.contents == {}
    # The stall was put on the side that stopped: the peer, not the client.
    assert any(r.getMessage().endswith("ep: not reading") for r in caplog.records)


async def test_client_stalls_mid_body(autojump_clock: trio.abc.Clock) -> None:
    repo = FakeRepo()
    async with wired(repo) as w:
        await w.send(f"PUT file {KEY}\n".encode())
        assert await w.line() == b"PUT-FROM 0\n"
        await w.send(b"DATA %d\n" % len(BODY) + BODY[: 2 * MiB])
        with trio.fail_after(LIMITS.stall_timeout * 3):
            while await w.client.receive_some(4096):
                pass  # the session ends: EOF
        assert w.session.outcome.startswith("client lost: stalled inside a DATA body")
    assert repo.contents == {}
