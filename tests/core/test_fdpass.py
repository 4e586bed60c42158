"""The local transport hands git-annex's pipes to the daemon (server/fdpass.py)."""

from __future__ import annotations

import os
import socket
import tempfile

import trio

from torbridge.server.fdpass import MARKER, PassedPipes, accept_stream


def _pair() -> tuple[socket.socket, trio.SocketStream]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a, trio.SocketStream(trio.socket.from_stdlib_socket(b))


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_pipes_are_adopted_and_speak_both_ways() -> None:
    program, server_side = _pair()
    to_bridge_r, to_bridge_w = os.pipe()  # what git-annex writes
    from_bridge_r, from_bridge_w = os.pipe()  # what git-annex reads
    socket.send_fds(program, [MARKER], [to_bridge_r, from_bridge_w])
    os.close(to_bridge_r)
    os.close(from_bridge_w)

    stream, initial = await accept_stream(server_side)
    assert isinstance(stream, PassedPipes)
    assert initial == b""
    os.write(to_bridge_w, b"AUTH u t\n")
    assert await stream.receive_some(100) == b"AUTH u t\n"
    await stream.send_all(b"AUTH-SUCCESS x\n")
    assert os.read(from_bridge_r, 100) == b"AUTH-SUCCESS x\n"

    await stream.aclose()
    # git-annex sees EOF, and the program sees its control socket close.
    assert os.read(from_bridge_r, 100) == b""
    assert program.recv(10) == b""
    for fd in (to_bridge_w, from_bridge_r):
        os.close(fd)
    program.close()


async def test_an_ordinary_stream_keeps_its_first_bytes() -> None:
    program, server_side = _pair()
    program.sendall(b"AUTH 1234 abcd\n")
    stream, initial = await accept_stream(server_side)
    assert stream is server_side
    assert initial == b"AUTH 1234 abcd\n"
    program.close()
    await stream.aclose()


async def test_a_regular_file_descriptor_is_refused_and_closed() -> None:
    program, server_side = _pair()
    with tempfile.TemporaryFile() as f:
        before = _open_fds()
        socket.send_fds(program, [MARKER], [f.fileno(), f.fileno()])
        stream, initial = await accept_stream(server_side)
        # Not adopted: the marker is handed on as bytes (the session will
        # refuse it as a bad first line) and the received copies are closed.
        assert stream is server_side
        assert initial == MARKER
        assert _open_fds() == before
    program.close()
    await stream.aclose()
