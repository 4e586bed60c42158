"""``git-annex-p2p-torbridge``: git-annex's generic P2P transport to a bridge.

For a remote ``p2p-annex::torbridge:ADDR`` git-annex runs
``git-annex-p2p-torbridge ADDR`` and speaks the P2P protocol on its
stdin/stdout. ADDR is the path of a torbridge endpoint's unix socket; this
program only copies bytes both ways. It exits non-zero if it cannot
connect, and 0 once the bridge closes the connection.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 256 * 1024
NAME = "git-annex-p2p-torbridge"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _upstream(sock: socket.socket) -> None:
    """stdin -> bridge, then half-close so the bridge sees the client's EOF."""
    try:
        while data := os.read(0, CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["address"]:
        # `git annex p2p --enable torbridge` asks for this host's addresses:
        # a bridge is reached, never listened for, through this program.
        print(
            f"{NAME}: only connecting is supported; use the lines `torbridge token add` prints",
            file=sys.stderr,
        )
        return 1
    if len(args) != 1:
        print(f"usage: {NAME} SOCKET-PATH", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args[0])
    except OSError as e:
        print(f"{NAME}: cannot connect to {args[0]}: {e.strerror}", file=sys.stderr)
        return 1
    threading.Thread(target=_upstream, args=(sock,), daemon=True).start()
    try:
        while data := sock.recv(CHUNK):
            _write_all(1, data)
    except OSError as e:
        print(f"{NAME}: connection lost: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
