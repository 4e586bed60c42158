"""``git-annex-p2p-torbridge``: git-annex's generic P2P transport to a bridge.

For a remote ``p2p-annex::torbridge:ADDR`` git-annex runs
``git-annex-p2p-torbridge ADDR`` and speaks the P2P protocol on its
stdin/stdout. ADDR is the path of a torbridge endpoint's unix socket.

ADDR may also be ``NAME.onion:PORT``: the onion is then dialled through the
SOCKS port named by ``$TORBRIDGE_SOCKS`` (``HOST:PORT`` or ``unix:/path``;
default tor's 127.0.0.1:9050), for clients whose tor is not where
git-annex's own tor-annex remotes expect it.

When stdin and stdout are pipes (as git-annex makes them) they are handed
to the bridge over the socket, so the bridge reads and writes git-annex's
pipes itself and no message pays for an extra hop; this program then only
waits for the bridge to close. Otherwise it copies bytes both ways. It
exits non-zero if it cannot connect, and 0 once the bridge closes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
import sys
import threading

from torbridge.server.fdpass import MARKER

ONION_ADDRESS = re.compile(r"([a-z2-7]{16,56}\.onion):(\d{1,5})")

CHUNK = 256 * 1024
PIPE_SIZE = 256 * 1024
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


def _pipes(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _hand_over(sock: socket.socket) -> int:
    """Give git-annex's pipes to the bridge, then wait until it is done with them."""
    for fd in (0, 1):
        # 256 KiB, not 64: the bridge then moves a DATA body in fewer, larger
        # pieces (see PIPE_SIZE in torbridge/transport/process.py). Best effort.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    try:
        socket.send_fds(sock, [MARKER], [0, 1])
    except OSError as e:
        print(f"{NAME}: cannot hand over the connection: {e.strerror}", file=sys.stderr)
        return 1
    # Our copies must go, or git-annex would not see EOF when the bridge closes.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    return 0


def _through_tor(onion: str, port: int) -> socket.socket | None:
    """Dial an onion through the SOCKS port in $TORBRIDGE_SOCKS (tor's default otherwise).

    git-annex's own tor-annex remotes only know 127.0.0.1:9050; this reaches
    a bridge through Tor Browser's 9150, Debian's unix:/run/tor/socks, etc.
    """
    from torbridge.transport.base import PeerUnavailable
    from torbridge.transport.network import socks_connect

    socks_address = os.environ.get("TORBRIDGE_SOCKS", "127.0.0.1:9050")
    try:
        sock = socks_connect(socks_address, onion, port, timeout=120)
    except PeerUnavailable as e:
        print(f"{NAME}: {onion}:{port} through {socks_address}: {e}", file=sys.stderr)
        return None
    if sock.family != socket.AF_UNIX:
        # The client writes DATA headers and small messages separately.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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
        print(f"usage: {NAME} SOCKET-PATH | ONION.onion:PORT", file=sys.stderr)
        return 2
    onion = ONION_ADDRESS.fullmatch(args[0])
    if onion:
        sock = _through_tor(onion.group(1), int(onion.group(2)))
        if sock is None:
            return 1
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(args[0])
        except OSError as e:
            print(f"{NAME}: cannot connect to {args[0]}: {e.strerror}", file=sys.stderr)
            return 1
        if _pipes(0) and _pipes(1):
            return _hand_over(sock)
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
