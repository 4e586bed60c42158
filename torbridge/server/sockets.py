"""The daemon's places on disk: its state directory and its unix sockets."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import trio

from torbridge.annex.host import StartupError
from torbridge.config import UNIX_PATH_MAX

SOCKET_BACKLOG = 128


def make_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create state_dir {path}: {e.strerror}") from e


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket; refuse one a live daemon is listening on."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise StartupError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes")
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise StartupError(f"{path} exists and is not a socket; remove it or change socket_dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check socket {path}: {e.strerror}") from e
        path.unlink(missing_ok=True)  # stale: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise StartupError(f"socket {path} is in use: is another torbridge running?")


async def bind_unix(path: Path, mode: int) -> trio.SocketListener:
    """Listen on ``path``; the name appears only once it accepts connections."""
    _claim_socket_path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(staging))
        os.chmod(staging, mode)
        sock.listen(SOCKET_BACKLOG)
        os.replace(staging, path)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return trio.SocketListener(sock)
