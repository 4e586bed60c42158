"""The whole Tor path, for the Tor tier's end-to-end tests and bench/bench_tor.py.

    stock git-annex (in a private network namespace, SOCKS hard-coded to
    127.0.0.1:9050) -> forwarder -> unix SocksPort -> client tor -> bridge's
    onion -> torbridge -> (node endpoint) SOCKS -> client tor -> node's onion
    -> a second torbridge serving the node repository -> git-annex-shell

Everything runs on a private Tor network (:class:`TestNet`) on 127.0.0.1:

* The git-annex client runs inside a network namespace of its own
  (``ip netns add tb-XXXX``) that has nothing but ``lo``: port 9050 there is
  ours, and nothing it does can leave the machine. A small forwarder inside
  the namespace listens on 127.0.0.1:9050 and passes each connection to the
  client tor's unix-socket SocksPort (unix sockets cross network namespaces).
* The bridge (``torbridge serve``) and the node (a second ``torbridge serve``,
  remote ".") each publish their onion through the control port of their own
  service tor; the bridge reaches the node through the client tor's TCP
  SocksPort on 127.0.0.1.
* After each step the caller can check that no process of ours (the
  daemons and their children) holds a socket off loopback
  (:meth:`~tests.harness.worlds.WorldBase.assert_loopback_only`).

Here: the namespace and its forwarder, :class:`NetnsAnnexEnv` (git-annex
inside it), :class:`TorBridge` (a Bridge that publishes an onion), tor
restarts and descriptor uploads, the end-of-session leak check, and the
small helpers of the Tor tier (``require_tor``, ``socks_connect``, echo
servers). The worlds built from these are in :mod:`tests.harness.worlds`.
Synchronous on purpose, like the rest of the harness. A few private parts of TestNet (``_launch``,
``_finish_start``, ``_terminate``, ``_hs_events``) are used to stop and
restart one service tor on its own data directory and control port.

Run as a script, this module is the forwarder: ``python -m tests.harness.tor
forward --netns NAME --port 9050 --unix PATH`` (started inside the namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import socks  # type: ignore[import-untyped]

from tests.harness.annex import AnnexEnv
from tests.harness.bridge import READY_LINE, Bridge, Expose, TomlValue, TorLine, parse_tor_lines
from tests.harness.process import DEFAULT_TIMEOUT, Result
from torbridge.testnet import (
    LOOPBACK,
    Node,
    TestNet,
    TorProcess,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NETNS_SOCKS_PORT = 9050  # git-annex's hard-coded SOCKS port: ours only inside the namespace
NETNS_PREFIX = "tb-"
PUBLISH_TIMEOUT = 180.0  # serve -> ready (descriptor uploaded); ~5-15 s seen
TOR_COMMAND_TIMEOUT = 240.0  # one git-annex command through Tor (first circuits can take 30 s)
STOP_TIMEOUT = 30.0  # SIGTERM -> exit of a daemon (15 s is short on a loaded machine)


# What this process started, for the end-of-session leak check (conftest).
STARTED: dict[str, set[str]] = {"netns": set(), "workdirs": set()}
STARTED_PIDS: set[int] = set()


class TorPathError(Exception):
    """Setting up the path failed; the message says where."""


# --------------------------------------------------------------------------
# the private network namespace


def netns_unavailable() -> str | None:
    """Why a private network namespace cannot be made here (None: it can)."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "`ip netns add` needs root"
    name = f"{NETNS_PREFIX}probe{secrets.token_hex(3)}"
    probe = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False)
    return None


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _own_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class PrivateNetns:
    """``ip netns add tb-XXXX`` with ``lo`` up and nothing else; ``close()``
    kills what is left in it (by PID: only our processes are in it) and
    deletes it."""

    def __init__(self) -> None:
        self.name = f"{NETNS_PREFIX}{secrets.token_hex(4)}"
        self.forwarder: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._ip("netns", "add", self.name)
        STARTED["netns"].add(self.name)
        try:
            self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
            links = self._ip("netns", "exec", self.name, "ip", "-o", "link", "show")
            names = re.findall(r"^\d+: ([^:@]+)", links, re.M)
            if names != ["lo"]:
                raise TorPathError(f"namespace {self.name} has links {names}, not just lo")
            if _netns_inode(self.name) == _own_netns_inode():
                raise TorPathError(f"namespace {self.name} is the host's")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> str:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=30, check=False
        )
        if result.returncode != 0:
            raise TorPathError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def argv(self, cmd: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *(os.fspath(c) for c in cmd)]

    def start_forwarder(
        self, unix_path: Path, timeout: float = 20.0, *, isolate: bool = False
    ) -> None:
        """127.0.0.1:9050 inside the namespace -> ``unix_path`` (tor's SocksPort).
        ``isolate``: each connection gets a SOCKS username of its own (tor
        circuits of its own)."""
        assert self.forwarder is None
        argv = self.argv(
            [
                sys.executable,
                "-m",
                "tests.harness.tor",
                "forward",
                "--netns",
                self.name,
                "--port",
                str(NETNS_SOCKS_PORT),
                "--unix",
                str(unix_path),
                *(["--isolate"] if isolate else []),
            ]
        )
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.forwarder = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        STARTED_PIDS.add(self.forwarder.pid)
        assert self.forwarder.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(
            target=lambda: ready.append(self.forwarder.stdout.readline().decode()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not ready or not ready[0].startswith("ready"):
            self._stop_forwarder()
            raise TorPathError(f"the SOCKS forwarder in {self.name} did not start: {ready}")

    def pids(self) -> list[int]:
        try:
            out = self._ip("netns", "pids", self.name)
        except TorPathError:
            return []
        return [int(p) for p in out.split()]

    def _stop_forwarder(self) -> None:
        p = self.forwarder
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_forwarder()
        for pid in self.pids():  # leftovers of ours (a git-annex killed mid-way, say)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(TorPathError):
            self._ip("netns", "delete", self.name)

    @staticmethod
    def exists(name: str) -> bool:
        return Path("/run/netns", name).exists()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 18):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("closed during the SOCKS greeting")
        data += chunk
    return data


_ISOLATION = iter(range(1, 1 << 62))


def _isolated_greeting(conn: socket.socket, upstream: socket.socket) -> None:
    """Answer the client's SOCKS5 greeting (no authentication) ourselves and
    greet tor with a username of this connection's own: tor's
    IsolateSOCKSAuth then gives the connection circuits of its own, so
    connections to an Onionbalance frontend spread over its instances, as
    connections from different client machines would. The CONNECT request
    and everything after it pass unchanged."""
    _version, count = _recv_exactly(conn, 2)
    _recv_exactly(conn, count)
    conn.sendall(b"\x05\x00")
    upstream.sendall(b"\x05\x01\x02")
    if _recv_exactly(upstream, 2) != b"\x05\x02":
        raise OSError("tor refused username authentication")
    user = f"conn{next(_ISOLATION)}".encode()
    upstream.sendall(b"\x01" + bytes([len(user)]) + user + b"\x01x")
    if _recv_exactly(upstream, 2)[1] != 0:
        raise OSError("tor refused the SOCKS username")


def _forward(conn: socket.socket, unix_path: str, isolate: bool = False) -> None:
    try:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(unix_path)
        if isolate:
            _isolated_greeting(conn, upstream)
    except OSError:
        conn.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
    back.start()
    _pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def forward_main(netns: str, port: int, unix_path: str, isolate: bool = False) -> int:
    """The forwarder: refuses to run anywhere but inside the namespace ``netns``
    (port 9050 of the host is not ours), then serves until SIGTERM."""
    if _own_netns_inode() != _netns_inode(netns):
        print(f"refusing: not inside network namespace {netns}", flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, port))
    server.listen(64)
    print(f"ready {LOOPBACK}:{port} -> {unix_path}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_forward, args=(conn, unix_path, isolate), daemon=True).start()


# --------------------------------------------------------------------------
# git-annex inside the namespace


@dataclass
class NetnsAnnexEnv(AnnexEnv):
    """An AnnexEnv whose every command runs inside the private namespace."""

    netns: str = ""

    @classmethod
    def inside(cls, base: AnnexEnv, netns: PrivateNetns) -> NetnsAnnexEnv:
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(AnnexEnv)}
        return cls(**fields, netns=netns.name)

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        cwd: Path | None = None,
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: bytes | str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Result:
        argv = ["ip", "netns", "exec", self.netns, *(os.fspath(c) for c in cmd)]
        return super().run(
            argv, cwd, check=check, timeout=timeout, input=input, extra_env=extra_env
        )


# --------------------------------------------------------------------------
# torbridge with an onion


class TorBridge(Bridge):
    """A ``torbridge serve`` with a ``[tor]`` table: it publishes its onion
    through ``control`` (a tor control port, cookie auth; or, with ``tor``
    keys ``onion = "torrc"`` and ``hidden_service_dir``, through a tor of
    its own) and dials tor-annex nodes through ``socks``. ``start()``
    returns once the daemon logs "torbridge ready" (every endpoint listens
    and the descriptor is uploaded)."""

    def __init__(
        self,
        env: AnnexEnv,
        repository: Path,
        workdir: Path,
        exposes: Sequence[Expose],
        *,
        socks: str,
        control: str | None = None,
        max_streams: int | None = None,  # None: the daemon's default
        tor: Mapping[str, TomlValue] | None = None,
        tables: Mapping[str, Mapping[str, TomlValue]] | None = None,
    ) -> None:
        table: dict[str, TomlValue] = {} if control is None else {"control": control}
        table["socks"] = socks
        if max_streams is not None:
            table["max_streams"] = max_streams
        table.update(tor or {})
        self.ready_seconds: list[float] = []  # serve start -> ready, per start
        super().__init__(env, repository, workdir, exposes, tor=table, tables=tables)

    def set_control(self, control: str) -> None:
        self.tor["control"] = control
        self.write_config()

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def start(self, timeout: float = PUBLISH_TIMEOUT) -> None:
        offset = self._log_size()
        t0 = time.monotonic()
        super().start(timeout)  # the unix sockets listen
        deadline = t0 + timeout
        while READY_LINE not in self.log_since(offset):
            if self.proc is not None and self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise AssertionError(
                    f"torbridge serve exited with {self.returncode} before ready:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"torbridge serve not ready within {timeout:.0f}s:\n{self.log()}"
                )
            time.sleep(0.05)
        self.ready_seconds.append(time.monotonic() - t0)
        assert self.proc is not None
        STARTED_PIDS.add(self.proc.pid)

    @property
    def onion(self) -> str:
        return (self.state_dir / "onion_hostname").read_text().strip()

    def tor_lines(self, name: str, mode: str = "rw") -> dict[int, TorLine]:
        """``torbridge token add NAME``: the address line of each endpoint, by port."""
        result = self.cli("token", "add", name, "--mode", mode, timeout=90)
        lines = parse_tor_lines(result.stdout)
        assert len(lines) == len(self.exposes), result.describe()
        return {line.port: line for line in lines}


# --------------------------------------------------------------------------
# tors: restart one, wait for a new descriptor upload


def restart_tor(net: TestNet, tor: TorProcess, timeout: float = 90.0) -> TorProcess:
    """Stop ``tor`` (SIGTERM, by PID) and start it again on the same torrc,
    data directory and control port; our monitor connection owns it again.
    Returns the new TorProcess (the old one is dead)."""
    node = Node(tor.name, tor.datadir, tor.control_port)
    text = tor.torrc.read_text()
    net._terminate(tor)
    with contextlib.suppress(OSError):  # _launch truncates stdout.log: keep the old one
        shutil.copy(tor.datadir / "stdout.log", tor.datadir / f"stdout.{tor.pid}.log")
    new = net._launch(node, text, role=tor.role, or_port=tor.or_port, socks=tor.socks)
    net._finish_start(new, time.monotonic() + timeout)
    return new


def stop_tor(net: TestNet, tor: TorProcess) -> None:
    net._terminate(tor)


def hs_event_count(tor: TorProcess) -> int:
    with tor._hs_changed:
        return len(tor._hs_events)


def wait_for_upload(
    net: TestNet, tor: TorProcess, onion: str, since: int, timeout: float = 120.0
) -> None:
    """Like TestNet.wait_for_descriptor, counting only HS_DESC events after
    the first ``since`` ones: a NEW upload of ``onion`` went through and no
    upload is in flight."""
    tor.wait_for_upload(onion, timeout, net.check, since)


# --------------------------------------------------------------------------
# the Tor tier's small helpers: skip without tor, a SOCKS client, echo servers

FIRST_CONNECT_TIMEOUT = 45.0  # a first connection to a new onion takes 8-11 s at times


def require_tor() -> None:
    for tool in ("tor", "tor-gencert"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (Debian: apt-get install tor)")


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class TCPEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class UnixEcho(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def serve_in_thread(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def socks_connect(
    client: TorProcess, host: str, port: int, timeout: float = FIRST_CONNECT_TIMEOUT
) -> socket.socket:
    """A stream to host:port through the client tor (the name resolved by tor)."""
    assert client.socks is not None, f"{client.name} has no SOCKS port"
    proxy_host, proxy_port = client.socks.rsplit(":", 1)
    s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    s.set_proxy(socks.SOCKS5, proxy_host, int(proxy_port), rdns=True)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s  # type: ignore[no-any-return]


def control(tor: TorProcess, command: str) -> str:
    """One command on tor's control port (cookie authentication), as the client
    machine's operator would send it; the reply's text. A plain socket, not
    stem: a stem Controller can hang in close() after a SIGNAL RELOAD."""
    with socket.create_connection(("127.0.0.1", tor.control_port), timeout=60) as s:
        reader = s.makefile("rb")

        def ask(line: str) -> str:
            s.sendall(line.encode() + b"\r\n")
            lines = []
            while True:
                got = reader.readline().decode().rstrip("\r\n")
                lines.append(got)
                if len(got) < 4 or got[3] == " ":
                    return "\n".join(lines)

        info = ask("PROTOCOLINFO 1")
        m = re.search(r'COOKIEFILE="([^"]+)"', info)
        assert m is not None, info
        cookie = Path(m.group(1)).read_bytes().hex()
        assert ask(f"AUTHENTICATE {cookie}").startswith("250"), "control auth failed"
        reply = ask(command)
        ask("QUIT")
        return reply


# tor's extended SOCKS5 replies (tor's socks-extensions, SocksPort ExtendedErrors)
MISSING_CLIENT_AUTH = 0xF4
BAD_CLIENT_AUTH = 0xF5


def socks_error(tor: TorProcess, onion: str, port: int, timeout: float = 120) -> int | None:
    """tor's SOCKS5 reply code for onion:port (None: it connected)."""
    try:
        s = socks_connect(tor, onion, port, timeout=timeout)
    except socks.ProxyError as e:
        m = re.search(r"\b0x([0-9a-f]{2}):", str(e))
        assert m is not None, f"not a SOCKS5 reply: {e}"
        return int(m.group(1), 16)
    s.close()
    return None


@dataclass
class AuthClient:
    """A client machine whose tor holds onion client-authorization keys: that
    tor (``ClientOnionAuthDir``, extended SOCKS errors) and the private
    namespace where the stock client runs behind it."""

    tor: TorProcess
    auth_dir: Path
    netns: PrivateNetns
    env: NetnsAnnexEnv


@contextlib.contextmanager
def auth_client(net: TestNet, name: str, root: Path, env: AnnexEnv) -> Iterator[AuthClient]:
    """Start an :class:`AuthClient` (tor ``name``, keys in ``root/client-auth``);
    stopped and removed on exit, whatever happened."""
    socks_dir = Path(tempfile.mkdtemp(prefix="tb-socks-", dir="/tmp"))  # short: a unix path
    os.chmod(socks_dir, 0o700)
    auth_dir = root / "client-auth"
    auth_dir.mkdir(mode=0o700)
    unix_socks = socks_dir / "socks.sock"
    tor = None
    netns = None
    try:
        tor = net.start_client(
            name,
            extra=[f"SocksPort unix:{unix_socks} ExtendedErrors", f"ClientOnionAuthDir {auth_dir}"],
        )
        netns = PrivateNetns()
        netns.start_forwarder(unix_socks)
        yield AuthClient(tor, auth_dir, netns, NetnsAnnexEnv.inside(env, netns))
    finally:
        if netns is not None:
            netns.close()
        if tor is not None and tor.process.poll() is None:
            stop_tor(net, tor)
        shutil.rmtree(socks_dir, ignore_errors=True)


def echo_roundtrip(client: TorProcess, onion: str, port: int, payload: bytes) -> bytes:
    with socks_connect(client, onion, port) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


# --------------------------------------------------------------------------
# the end-of-session check


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def tor_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "tor"], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def leftovers() -> list[str]:
    """What this process started and is still there: tors of our testnets,
    daemons and forwarders, network namespaces."""
    found = []
    for pid in tor_pids():
        cmd = _cmdline(pid)
        if any(w in cmd for w in STARTED["workdirs"]):
            found.append(f"tor process {pid}: {cmd}")
    found += [f"process {pid}: {_cmdline(pid)}" for pid in STARTED_PIDS if _alive(pid)]
    found += [f"network namespace {n}" for n in STARTED["netns"] if PrivateNetns.exists(n)]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.tor")
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="127.0.0.1:PORT (inside NETNS) -> a unix socket")
    fwd.add_argument("--netns", required=True)
    fwd.add_argument("--port", type=int, required=True)
    fwd.add_argument("--unix", required=True)
    fwd.add_argument("--isolate", action="store_true", help="a SOCKS username per connection")
    args = parser.parse_args(argv)
    return forward_main(args.netns, args.port, args.unix, args.isolate)


if __name__ == "__main__":
    sys.exit(main())
