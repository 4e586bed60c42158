"""A cluster PUT body fanned out by tee(2)/splice(2) (transport/fanout.py).

Real descriptors, no git-annex: the client on a unix socket (as tor
connects) or on two OS pipes (as git-annex's pipes passed by
git-annex-p2p-torbridge), each node on two OS pipes (as a peer program's
stdin/stdout), the nodes being the scripted servers of tests/harness/fakes.py. Every
node must get the body byte-exact, also one that reads slower than the
others; one that dies mid-body is dropped and the others go on; and at the
first trouble the rest goes through the user-space fanout, still exact.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.core.test_cluster import (
    AUTH,
    AUTH_OK,
    CLUSTER,
    GATEWAY,
    LIMITS,
    NODE_UUIDS,
    Knowledge,
    Recorder,
    plus,
)
from tests.core.test_session import Client
from tests.harness.fakes import FakeRepo, FakeTransport, OneToken, PeerConnection
from torbridge.protocol import cluster as c
from torbridge.protocol import messages as m
from torbridge.server.endpoints import Endpoint
from torbridge.server.fdpass import PassedPipes
from torbridge.server.session import Session
from torbridge.transport import fanout
from torbridge.transport.cluster import ClusterNode, ClusterTransport
from torbridge.transport.framed import StreamLost

MiB = 1 << 20
BODY = random.Random(7).randbytes(3 * MiB + 4321)  # many rounds of a 256 KiB stage
KEY = f"SHA256E-s{len(BODY)}--" + "cd" * 32
KEY2 = f"SHA256E-s{MiB}--" + "ef" * 32
A, B, C = NODE_UUIDS["n1"], NODE_UUIDS["n2"], NODE_UUIDS["n3"]
GUARD = 120.0  # seconds: a hang fails the test, load does not


@dataclass
class Rig:
    client: Client
    repos: dict[str, FakeRepo]
    recorder: Recorder
    session: Session


def client_on_socket() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
    )


def client_on_pipes() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    control_a, control_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control_a.close()  # nobody watches it here
    control = trio.SocketStream(trio.socket.from_stdlib_socket(control_b))
    FdStream = trio.lowlevel.FdStream
    client = trio.StapledStream(FdStream(to_w), FdStream(from_r))
    return client, PassedPipes(to_r, from_w, control)


@asynccontextmanager
async def rig(
    repos: dict[str, FakeRepo],
    connect: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = client_on_socket,
    kernel: bool = True,
) -> AsyncIterator[Rig]:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        transports = {
            name: FakeTransport(repo, name=name, server_nursery=nursery, pipes=True)
            for name, repo in repos.items()
        }
        nodes = [
            ClusterNode(c.NodeRef(repo.uuid, name, 200.0, frozenset()), transports[name])
            for name, repo in repos.items()
        ]
        transport = ClusterTransport(
            "cl",
            CLUSTER,
            GATEWAY,
            nodes,
            Knowledge(),
            recorder,
            node_timeout=LIMITS.peer_timeout * 0.8,
            stall_timeout=LIMITS.stall_timeout * 0.8,
            rng=random.Random(0),
            members=frozenset(NODE_UUIDS.values()),
            kernel_fanout=kernel,
        )
        endpoint = Endpoint("cl", CLUSTER, transport, Path("/nonexistent"), OneToken(), LIMITS)
        ours, theirs = connect()
        session = Session(theirs, endpoint)
        nursery.start_soon(session.run)
        client = Client(ours)  # type: ignore[arg-type]  # only send_all/receive_some/aclose
        await client.send(AUTH, b"VERSION 4\n")
        assert await client.line() == AUTH_OK
        assert await client.line() == b"VERSION 4\n"
        yield Rig(client, repos, recorder, session)
        await ours.aclose()


def fanned_out(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        int(r.getMessage().split()[1])
        for r in caplog.records
        if "fanned out by tee" in r.getMessage()
    )


async def put(r: Rig, body: bytes = BODY, key: str = KEY) -> bytes:
    await r.client.send(f"PUT file {key}\n".encode())
    assert await r.client.line() == b"PUT-FROM 0\n"
    await r.client.send(b"DATA %d\n" % len(body))
    await r.client.send_in_pieces(body, 100_003)  # pieces that do not match any round
    await r.client.send(b"VALID\n")
    return await r.client.line()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def repos3() -> dict[str, FakeRepo]:
    return {name: FakeRepo(uuid=uuid) for name, uuid in NODE_UUIDS.items()}


async def slow_reader(conn: PeerConnection, message: m.Message) -> None:
    """Takes the body in small pieces with pauses: the others wait for it."""
    assert isinstance(message, m.Put)
    await conn.send(m.PutFrom(0))
    header = await conn.receive()
    assert isinstance(header, m.Data)
    got = bytearray()
    while len(got) < header.length:
        got += await conn.framed.receive_body(min(50_000, header.length - len(got)))
        await trio.sleep(0.002)
    conn.bodies.append(bytes(got))
    verdict = await conn.receive()
    assert isinstance(verdict, m.Valid)
    conn.repo.contents[message.key] = bytes(got)
    await conn.send(m.Success())


async def die_mid_body(conn: PeerConnection, message: m.Message) -> None:
    await conn.send(m.PutFrom(0))
    header = await conn.receive()
    assert isinstance(header, m.Data)
    await conn.receive_body(header.length, stop_after=MiB + 777)
    await conn.hang_up()
    raise StreamLost("hung up mid-body")  # ends the fake server


@pytest.mark.parametrize("connect", [client_on_socket, client_on_pipes], ids=["socket", "pipes"])
async def test_every_node_gets_the_body_exact(
    connect: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="torbridge.cluster")
    repos = repos3()
    repos["n2"].hooks[m.Put] = slow_reader
    fds = open_fds()
    with trio.fail_after(GUARD):
        async with rig(repos, connect) as r:
            assert plus(await put(r)) == ("SUCCESS-PLUS", {A, B, C})
            # The session goes on: lines after the body are intact.
            await r.client.send(f"CHECKPRESENT {KEY}\n".encode())
            assert (await r.client.line()).startswith((b"SUCCESS", b"FAILURE"))
            # A second body through the same session: fresh stages.
            assert plus(await put(r, BODY[:MiB], KEY2)) == ("SUCCESS-PLUS", {A, B, C})
    assert open_fds() == fds  # every stage pipe closed
    for name, repo in repos.items():
        assert repo.contents == {KEY: BODY, KEY2: BODY[:MiB]}, name
        [conn] = repo.connections
        assert conn.bodies == [BODY, BODY[:MiB]], name
    # All but the first pieces (a node's held DATA line, the client's
    # buffered bytes) went by tee.
    assert len(BODY) + MiB - fanned_out(caplog) <= 4 * 256 * 1024
    stored = sorted((k, u, True) for u in (A, B, C) for k in (KEY, KEY2))
    assert sorted(r.recorder.records) == stored


async def test_a_node_that_dies_mid_body_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="torbridge.cluster")
    repos = repos3()
    repos["n2"].hooks[m.Put] = die_mid_body
    repos["n3"].hooks[m.Put] = slow_reader
    with trio.fail_after(GUARD):
        async with rig(repos) as r:
            assert plus(await put(r)) == ("SUCCESS-PLUS", {A, C})
            await r.client.send(f"CHECKPRESENT {KEY}\n".encode())
            assert (await r.client.line()).startswith((b"SUCCESS", b"FAILURE"))
    assert repos["n1"].contents == repos["n3"].contents == {KEY: BODY}
    assert repos["n2"].contents == {}
    assert repos["n3"].connections[0].bodies == [BODY]
    assert len(BODY) - fanned_out(caplog) <= 2 * 256 * 1024
    assert sorted(r.recorder.records) == [(KEY, A, True), (KEY, C, True)]
    assert any("node n2 lost: lost while sending it data" in x.getMessage() for x in caplog.records)


@pytest.mark.parametrize("connect", [client_on_socket, client_on_pipes], ids=["socket", "pipes"])
async def test_trouble_mid_body_goes_on_in_user_space(
    connect: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tee that comes up short after some rounds: the stages are emptied,
    what the inlet took goes through user space, and so does the rest."""
    caplog.set_level(logging.DEBUG, logger="torbridge.cluster")
    real_tee = fanout.tee
    calls = 0

    def short_tee(src: int, dst: int, length: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 11:  # a later stage of a later round takes only half
            return real_tee(src, dst, max(1, length // 2))
        return real_tee(src, dst, length)

    monkeypatch.setattr(fanout, "tee", short_tee)
    repos = repos3()
    with trio.fail_after(GUARD):
        async with rig(repos, connect) as r:
            assert plus(await put(r)) == ("SUCCESS-PLUS", {A, B, C})
    for name, repo in repos.items():
        assert repo.connections[0].bodies == [BODY], name
    moved = fanned_out(caplog)
    assert 0 < moved < len(BODY) - MiB  # some by tee, the rest not
    assert any("kernel fanout ends" in x.getMessage() for x in caplog.records)


async def test_offsets_ahead_and_kernel_off_go_by_copy(caplog: pytest.LogCaptureFixture) -> None:
    """A node resuming from an offset takes its part by the user-space copy
    until the body reaches it; with kernel_fanout off, the whole body does."""
    caplog.set_level(logging.DEBUG, logger="torbridge.cluster")
    repos = repos3()
    repos["n3"].partial = {KEY: BODY[: 2 * MiB]}
    with trio.fail_after(GUARD):
        async with rig(repos) as r:
            assert plus(await put(r)) == ("SUCCESS-PLUS", {A, B, C})
    for name, repo in repos.items():
        assert repo.contents == {KEY: BODY}, name
    assert repos["n3"].connections[0].bodies == [BODY[2 * MiB :]]
    # Past 2 MiB every node takes whole pieces again: tee for the rest.
    assert 0 < fanned_out(caplog) <= len(BODY) - 2 * MiB
    caplog.clear()
    repos = repos3()
    with trio.fail_after(GUARD):
        async with rig(repos, kernel=False) as r:
            assert plus(await put(r)) == ("SUCCESS-PLUS", {A, B, C})
    for name, repo in repos.items():
        assert repo.contents == {KEY: BODY}, name
    assert fanned_out(caplog) == 0


@pytest.mark.parametrize("connect", [client_on_socket, client_on_pipes], ids=["socket", "pipes"])
async def test_client_hangs_up_mid_body(
    connect: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
) -> None:
    repos = repos3()
    with trio.fail_after(GUARD):
        async with rig(repos, connect) as r:
            await r.client.send(f"PUT file {KEY}\n".encode())
            assert await r.client.line() == b"PUT-FROM 0\n"
            await r.client.send(b"DATA %d\n" % len(BODY))
            await r.client.send_in_pieces(BODY[: 2 * MiB], 100_003)
            await r.client.stream.aclose()
        # (The rig's nursery waited for the session to end.)
    assert r.session.outcome.startswith("client lost"), r.session.outcome
    for name, repo in repos.items():
        assert repo.contents == {}, name
        assert all(conn.finished.is_set() for conn in repo.connections), name


async def test_tee_duplicates_without_taking() -> None:
    src_r, src_w = os.pipe()
    a_r, a_w = os.pipe()
    os.write(src_w, b"abcdef")
    assert fanout.tee(src_r, a_w, 4) == 4
    assert os.read(a_r, 100) == b"abcd"
    assert os.read(src_r, 100) == b"abcdef"  # still there
    os.set_blocking(src_r, False)
    with pytest.raises(BlockingIOError):
        fanout.tee(src_r, a_w, 4)  # nothing to duplicate yet
    os.close(src_w)
    assert fanout.tee(src_r, a_w, 4) == 0  # EOF
    s1, s2 = socket.socketpair()
    with pytest.raises(OSError):
        fanout.tee(s1.fileno(), a_w, 4)  # pipes only
    for fd in (src_r, a_r, a_w):
        os.close(fd)
    s1.close()
    s2.close()
