"""``git-annex-p2p-tbnode``: a test P2P network for git-annex, and a SOCKS5 server for tor.

Standard library only: this file runs as a program (the bin dir holds a
shim that execs it) and is imported by the tests.

The network ``tbnode`` (addresses ``p2p-annex::tbnode:NAME``):

- ``git-annex-p2p-tbnode NAME SOCKETFILE`` is how ``git annex remotedaemon``
  starts a listener: remotedaemon binds SOCKETFILE itself and only needs the
  program to route peers to it. We record ``NAME -> SOCKETFILE`` (and the
  remotedaemon's pid) in ``$TBNODE_DIR`` and then wait until remotedaemon is
  gone (remotedaemon ignores the program's exit; its stdin is /dev/null).
  remotedaemon leaks its listening socket into the program: it is closed at
  once, or a killed node would keep accepting connections while we live.
- ``git-annex-p2p-tbnode NAME`` is how a peer connects (git-annex, or the
  bridge): connect to the recorded socket and copy stdin/stdout both ways.
  It exits 1 with a one-line reason on stderr if it cannot connect.

Faults: a JSON file ``$TBNODE_DIR/NAME.fault`` is claimed (renamed) by the
next connection to NAME, through this program or through the SOCKS server,
and fires once (see :class:`Fault`); ``NAME.fired`` is written when it did.

``unshare --net -- python tbnode.py socks-run ONION=NAME... -- CMD...`` runs
CMD with the SOCKS5 server on 127.0.0.1:9050 of a private network namespace
(where a stock tor-annex client looks for tor); it refuses to run in the
namespace it was started from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROGRAM = "git-annex-p2p-tbnode"
CHUNK = 256 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# SOCKS5 replies we use (tor's extended codes included).
SOCKS_OK = 0x00
SOCKS_REFUSED = 0x05
SOCKS_ONION_DESC_NOT_FOUND = 0xF0


def registry() -> Path:
    return Path(os.environ["TBNODE_DIR"])


def socket_record(directory: Path, name: str) -> Path:
    return directory / f"{name}.sock"


def pid_record(directory: Path, name: str) -> Path:
    return directory / f"{name}.pid"


def fault_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.fault"


def fired_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.fired"


# --- faults ---------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected failure of a relayed connection; exactly one trigger is set.

    - ``up_bytes``: after this many bytes went towards the node.
    - ``down_bytes``: after this many bytes came back from it.
    - ``up_line``: when the peer sends a line starting with this text; the
      line never reaches the node.
    - ``down_after_up_line``: the node's answer to a line starting with this
      text is passed on, then the fault fires.

    ``kill``: the pid to SIGKILL (the node's remotedaemon, or a client), or
    ``kill_file`` holds it; 0 kills the relay itself (this program, or the SOCKS connection with a
    reset). After a fault the relay passes nothing more, unless ``stop`` is
    false (for a fault that kills a third party: the client, say).
    ``signal``: sent instead of SIGKILL (SIGSTOP: the process stalls, and
    the relay, with ``stop`` false, passes on what it holds, as a kernel
    would, so a stalled node has the line that made it stop).
    """

    kill: int = 0
    kill_file: str | None = None  # or: the pid is in this file (read when firing)
    signal: int = signal.SIGKILL
    stop: bool = True
    up_bytes: int | None = None
    down_bytes: int | None = None
    up_line: str | None = None
    down_after_up_line: str | None = None
    down_line: str | None = None
    fired: bool = False
    armed_down: bool = False
    seen_up: int = 0
    seen_down: int = 0
    tail: bytes = b"\n"  # the stream starts at a line start
    down_tail: bytes = b"\n"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def claim(cls, directory: Path, name: str) -> Fault | None:
        """Take the pending fault for ``name``, if any (one connection gets it)."""
        path = fault_file(directory, name)
        claimed = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        spec = json.loads(claimed.read_text())
        claimed.unlink()
        return cls(**spec)


class Relay:
    """Copies bytes both ways between a peer and a node, with an optional fault.

    ``peer_read`` returns b"" at EOF; ``peer_write``/``peer_eof`` raise
    OSError when the peer is gone. The node is a connected socket.
    """

    def __init__(
        self,
        peer_read: Callable[[], bytes],
        peer_write: Callable[[bytes], None],
        peer_eof: Callable[[], None],
        node: socket.socket,
        fault: Fault | None,
        on_fire: Callable[[Fault], None],
    ) -> None:
        self.peer_read = peer_read
        self.peer_write = peer_write
        self.peer_eof = peer_eof
        self.node = node
        self.fault = fault
        self.on_fire = on_fire

    # The fault checks return how much of a chunk may pass, and whether to fire after it.
    def _up(self, chunk: bytes) -> tuple[int, bool]:
        f = self.fault
        if f is None or (f.fired and not f.stop):
            return len(chunk), False
        with f.lock:
            if f.fired:
                return 0, False
            allowed, fire = len(chunk), False
            if f.up_bytes is not None and f.seen_up + len(chunk) >= f.up_bytes:
                allowed, fire = f.up_bytes - f.seen_up, True
            data = f.tail + chunk
            for marker in (f.up_line, f.down_after_up_line):
                if marker is None:
                    continue
                needle = b"\n" + marker.encode()
                hit = data.find(needle)
                # Only a line that ends in this chunk (the tail was searched before).
                while hit >= 0 and hit + len(needle) <= len(f.tail):
                    hit = data.find(needle, hit + 1)
                if hit < 0:
                    continue
                if marker == f.up_line:
                    allowed, fire = min(allowed, max(0, hit + 1 - len(f.tail))), True
                else:
                    f.armed_down = True
            f.seen_up += allowed
            f.tail = data[-256:]
            return allowed, fire

    def _down(self, chunk: bytes) -> tuple[int, bool]:
        f = self.fault
        if f is None or (f.fired and not f.stop):
            return len(chunk), False
        with f.lock:
            if f.fired:
                return 0, False
            if f.armed_down:
                return len(chunk), True
            if f.down_line is not None:
                data = f.down_tail + chunk
                start = len(f.down_tail)  # where this chunk starts in data
                needle = b"\n" + f.down_line.encode()
                hit = data.find(needle)
                # Only a line that starts in this chunk (earlier ones have passed).
                while hit >= 0 and hit + 1 < start:
                    hit = data.find(needle, hit + 1)
                f.down_tail = data[-256:]
                if hit >= 0:
                    allowed = hit + 1 - start
                    f.seen_down += allowed
                    return allowed, True
            if f.down_bytes is not None and f.seen_down + len(chunk) >= f.down_bytes:
                allowed = f.down_bytes - f.seen_down
                f.seen_down += allowed
                return allowed, True
            f.seen_down += len(chunk)
            return len(chunk), False

    @property
    def stopped(self) -> bool:
        return self.fault is not None and self.fault.fired and self.fault.stop

    def _fire(self) -> None:
        f = self.fault
        assert f is not None
        with f.lock:
            if f.fired:
                return
            f.fired = True
        self.on_fire(f)

    def upstream(self) -> None:
        try:
            while chunk := self.peer_read():
                allowed, fire = self._up(chunk)
                if allowed:
                    self.node.sendall(chunk[:allowed])
                if fire:
                    self._fire()
                    if self.stopped:
                        return
                    if allowed < len(chunk):
                        self.node.sendall(chunk[allowed:])
            self.node.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def downstream(self) -> None:
        try:
            while chunk := self.node.recv(CHUNK):
                allowed, fire = self._down(chunk)
                if allowed:
                    self.peer_write(chunk[:allowed])
                if fire:
                    self._fire()
                    if self.stopped:
                        return
                    if allowed < len(chunk):
                        self.peer_write(chunk[allowed:])
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.peer_eof()


def wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Until ``pid`` has exited (a zombie, or gone): its sockets are closed then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            return
        time.sleep(0.005)


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped (SIGSTOP is asynchronous: a
    thread running on another core goes on for a moment, and a line passed
    on meanwhile would still be answered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return  # gone
        states = []
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # that thread ended meanwhile
            states.append(stat[stat.rindex(")") + 2])
        if all(state in "TtZX" for state in states):
            return
        time.sleep(0.002)


def fire_default(
    directory: Path, name: str, on_self: Callable[[], None]
) -> Callable[[Fault], None]:
    def fire(f: Fault) -> None:
        with contextlib.suppress(OSError):
            fired_file(directory, name).write_text(json.dumps({"kill": f.kill}))
        pid = f.kill
        if f.kill_file is not None:
            pid = int(Path(f.kill_file).read_text())
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, f.signal)
            if f.signal == signal.SIGKILL:
                wait_dead(pid)
            elif f.signal == signal.SIGSTOP:
                wait_stopped(pid)
        else:
            on_self()

    return fire


# --- the program ----------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def connect_node(directory: Path, name: str) -> socket.socket:
    """A connection to node ``name``'s remotedaemon; OSError with a reason if none."""
    try:
        path = socket_record(directory, name).read_text().strip()
    except FileNotFoundError:
        raise OSError(f"no node {name!r} has ever listened (no remotedaemon)") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # remotedaemon binds a path relative to its repository, which may be
    # longer than a sockaddr_un holds: reach it through a directory fd.
    try:
        dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        sock.close()
        raise OSError(f"node {name!r} has no socket directory: {e.strerror}") from None
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
    except OSError as e:
        sock.close()
        raise OSError(f"node {name!r} is not listening on {path}: {e.strerror}") from None
    finally:
        os.close(dirfd)
    return sock


def listen(name: str, socketfile: str) -> int:
    # remotedaemon leaks its listening socket (and more) into this process:
    # holding it would keep a killed node "listening" while we live.
    os.closerange(3, 65536)
    directory = registry()
    parent = os.getppid()
    pid_record(directory, name).write_text(f"{parent}\n")
    tmp = socket_record(directory, name).with_suffix(".tmp")
    # remotedaemon passes a path relative to its working directory.
    tmp.write_text(os.path.abspath(socketfile) + "\n")
    os.replace(tmp, socket_record(directory, name))
    # remotedaemon accepts on SOCKETFILE itself: live as long as it does.
    while os.getppid() == parent:
        time.sleep(0.2)
    return 0


def connect(name: str) -> int:
    directory = registry()
    try:
        sock = connect_node(directory, name)
    except OSError as e:
        print(f"{PROGRAM}: cannot connect: {e}", file=sys.stderr, flush=True)
        return 1
    fault = Fault.claim(directory, name)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    relay = Relay(
        lambda: os.read(0, CHUNK),
        lambda data: _write_all(1, data),
        lambda: os.close(1),
        sock,
        fault,
        fire_default(directory, name, die),
    )
    threading.Thread(target=relay.upstream, daemon=True).start()
    relay.downstream()
    # The node closed (or a fault fired): whatever the peer still sends is moot.
    os._exit(0 if fault is None or not fault.fired else 1)


# --- SOCKS5, standing in for tor ----------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("SOCKS client closed")
        data += chunk
    return data


class SocksServer:
    """A SOCKS5 server (no auth, CONNECT only) mapping ``ONION:PORT`` to tbnode nodes.

    ``routes`` maps "onion:port" (or just "onion") to a node name looked up in
    the registry. An unknown onion, or a node that does not answer, gets
    tor's 0xF0 (onion service descriptor not found); ``replies`` forces a
    reply code for an onion.

    ``host`` "unix:PATH" listens on a unix socket instead (as tor's
    ``SocksPort unix:PATH``); ``address`` is then "unix:PATH", as the
    bridge's ``[tor] socks`` names it.
    """

    def __init__(self, host: str, port: int, directory: Path) -> None:
        self.directory = directory
        self.routes: dict[str, str] = {}
        self.replies: dict[str, int] = {}
        self.requests: list[str] = []
        if host.startswith("unix:"):
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(host[len("unix:") :])
            self.listener.listen()
            self.address = host
        else:
            self.listener = socket.create_server((host, port))
            self.address = "{}:{}".format(*self.listener.getsockname()[:2])
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> SocksServer:
        thread = threading.Thread(target=self._accept_loop, name="socks5", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _track(self, *socks: socket.socket, add: bool = True) -> None:
        with self._lock:
            for s in socks:
                (self._conns.add if add else self._conns.discard)(s)

    def _serve(self, client: socket.socket) -> None:
        node: socket.socket | None = None
        self._track(client)
        try:
            reached = self._handshake(client)
            if reached is None:
                return
            node, name = reached
            self._track(node)
            self._relay(client, node, name)
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            for s in (client, node):
                if s is not None:
                    self._track(s, add=False)
                    with contextlib.suppress(OSError):
                        s.close()

    def _handshake(self, client: socket.socket) -> tuple[socket.socket, str] | None:
        version, nmethods = _recv_exact(client, 2)
        if version != 5:
            return None
        methods = _recv_exact(client, nmethods)
        if 0 not in methods:
            client.sendall(b"\x05\xff")
            return None
        client.sendall(b"\x05\x00")
        _ver, cmd, _rsv, atyp = _recv_exact(client, 4)
        if atyp == 3:
            host = _recv_exact(client, _recv_exact(client, 1)[0]).decode("ascii", "replace")
        elif atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, _recv_exact(client, 4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, _recv_exact(client, 16))
        else:
            self._reply(client, 0x08)
            return None
        (port,) = struct.unpack("!H", _recv_exact(client, 2))
        target = f"{host}:{port}"
        self.requests.append(target)
        if cmd != 1:
            self._reply(client, 0x07)
            return None
        forced = self.replies.get(target, self.replies.get(host))
        if forced is not None:
            self._reply(client, forced)
            return None
        name = self.routes.get(target, self.routes.get(host))
        if name is None:
            self._reply(client, SOCKS_ONION_DESC_NOT_FOUND)
            return None
        try:
            node = connect_node(self.directory, name)
        except OSError:
            # As tor: an onion service that is not up has no descriptor to find.
            self._reply(client, SOCKS_ONION_DESC_NOT_FOUND)
            return None
        self._reply(client, SOCKS_OK)
        return node, name

    @staticmethod
    def _reply(client: socket.socket, code: int) -> None:
        client.sendall(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))

    def _relay(self, client: socket.socket, node: socket.socket, name: str) -> None:
        fault = Fault.claim(self.directory, name)
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def reset() -> None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in (client, node):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        relay = Relay(
            lambda: client.recv(CHUNK),
            client.sendall,
            lambda: client.shutdown(socket.SHUT_WR),
            node,
            fault,
            fire_default(self.directory, name, reset),
        )
        up = threading.Thread(target=relay.upstream, daemon=True)
        up.start()
        relay.downstream()
        with contextlib.suppress(OSError):
            node.shutdown(socket.SHUT_RDWR)
        up.join(timeout=10)


def in_private_netns() -> bool:
    """True in a network namespace of our own (our parent's is another one)."""
    try:
        mine = os.readlink("/proc/self/ns/net")
        parents = os.readlink(f"/proc/{os.getppid()}/ns/net")
    except OSError:
        return False
    return mine != parents


def socks_run(routes: list[str], command: list[str]) -> int:
    """In a private network namespace: SOCKS on 127.0.0.1:9050, then run ``command``.

    For ``unshare --net -- python tbnode.py socks-run ONION=NAME... -- CMD...``:
    a stock tor-annex client dials 127.0.0.1:9050 and nothing else. Refuses
    to run in the namespace it was started from (never take the host's 9050).
    """
    import subprocess

    if not in_private_netns():
        print(f"{PROGRAM}: socks-run needs a private network namespace", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = SocksServer("127.0.0.1", 9050, registry())
    for route in routes:
        onion, _, name = route.partition("=")
        server.routes[onion] = name
    server.start()
    try:
        return subprocess.run(command, check=False).returncode
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["socks-run"] and "--" in argv:
        cut = argv.index("--")
        return socks_run(argv[1:cut], argv[cut + 1 :])
    if len(argv) == 1 and argv[0] == "address":
        print(f"{PROGRAM}: test network: addresses are configured by the tests", file=sys.stderr)
        return 1
    if len(argv) in (1, 2) and _NAME.fullmatch(argv[0]):
        return connect(argv[0]) if len(argv) == 1 else listen(argv[0], argv[1])
    print(f"usage: {PROGRAM} NAME [SOCKETFILE] | socks-run ONION=NAME... -- CMD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
