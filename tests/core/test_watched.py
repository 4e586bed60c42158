"""WatchedStream over real unix sockets and pipes: a half-close is not a hang-up."""

from __future__ import annotations

import os
import socket

import trio

from torbridge.server.fdpass import PassedPipes
from torbridge.server.watched import WatchedStream

SETTLE = 1.0  # seconds in which a wrong "hung up" would have shown


async def _hung_up_within(watched: WatchedStream, seconds: float) -> str | None:
    with trio.move_on_after(seconds):
        return await watched.hung_up()
    return None


async def test_unix_socket_half_close_then_close() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    watched = WatchedStream(stream)
    ours.sendall(b"CHECKPRESENT k\n")
    ours.shutdown(socket.SHUT_WR)
    assert await _hung_up_within(watched, SETTLE) is None
    # What was read ahead is kept, and the half-closed side still reads.
    assert await watched.receive_some(100) == b"CHECKPRESENT k\n"
    await watched.send_all(b"SUCCESS\n")
    assert ours.recv(100) == b"SUCCESS\n"
    ours.close()
    assert await _hung_up_within(watched, 5.0) == "closed the connection"
    await stream.aclose()


async def test_passed_pipes_half_close_then_close() -> None:
    # git-annex's stdin (we read) and stdout (we write), as fdpass hands them over.
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    control_a, control_b = socket.socketpair()
    control = trio.SocketStream(trio.socket.from_stdlib_socket(control_b))
    pipes = PassedPipes(stdin_r, stdout_w, control)
    watched = WatchedStream(pipes)
    os.write(stdin_w, b"VERSION 4\n")
    os.close(stdin_w)  # EOF on what we read, but git-annex still reads
    assert await _hung_up_within(watched, SETTLE) is None
    await watched.send_all(b"VERSION 4\n")
    assert os.read(stdout_r, 100) == b"VERSION 4\n"
    os.close(stdout_r)  # git-annex exited
    assert await _hung_up_within(watched, 5.0) == "closed the connection"
    await pipes.aclose()
    control_a.close()


async def test_unix_socket_closed_outright() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    watched = WatchedStream(stream)
    ours.close()
    assert await _hung_up_within(watched, 5.0) == "closed the connection"
    await stream.aclose()
