"""Fixtures for the Tor tier: one private Tor network (127.0.0.1 only) per session.

``testnet`` starts once per test session and stops at its end; ``client_tor``
and ``service_tor`` run on it for the whole session too. Tests that publish
onion services keep their own control connection open (the service lives as
long as it does). To use these fixtures from another test directory, import
them into its conftest (``from tests.tor.conftest import testnet, ...``);
for one network shared by several directories, move them to tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import socks  # type: ignore[import-untyped]

from torbridge.testnet import TestNet, TorProcess

log = logging.getLogger("tests.tor")

FIRST_CONNECT_TIMEOUT = 45.0  # a first connection to a new onion takes 8-11 s at times


def require_tor() -> None:
    for tool in ("tor", "tor-gencert"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (Debian: apt-get install tor)")


@pytest.fixture(scope="session")
def testnet() -> Iterator[TestNet]:
    """Authorities and relays, up for the whole session."""
    require_tor()
    with TestNet(progress=log.info) as net:
        net.start()
        yield net


@pytest.fixture(scope="session")
def client_tor(testnet: TestNet) -> TorProcess:
    """A bootstrapped client tor; ``client_tor.socks`` is "127.0.0.1:PORT"."""
    return testnet.start_client("client")


@pytest.fixture(scope="session")
def service_tor(testnet: TestNet) -> TorProcess:
    """A bootstrapped tor for ADD_ONION services (``service_tor.controller()``)."""
    return testnet.start_service_tor("service")


# --------------------------------------------------------------------------
# echo servers and a SOCKS client


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _TCPEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixEcho(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def tcp_echo() -> Iterator[str]:
    """An echo server; yields its "127.0.0.1:PORT"."""
    server = _TCPEcho(("127.0.0.1", 0), _Echo)
    thread = _serve(server)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def unix_echo() -> Iterator[Path]:
    """An echo server on a unix socket (a short path: sun_path is 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="tb-echo-"))
    path = directory / "echo.sock"
    server = _UnixEcho(str(path), _Echo)
    thread = _serve(server)
    yield path
    server.shutdown()
    server.server_close()
    thread.join()
    shutil.rmtree(directory, ignore_errors=True)


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
# the bridge over Tor (test_bridge_over_tor.py): logs on failure, and a leak
# check once the session (and its testnet) is over


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach what a fixture value offers as ``failure_sections()``
    (TorWorld: the daemons' logs and the tail of its tors' logs)."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            sections = getattr(value, "failure_sections", None)
            if callable(sections):
                with contextlib.suppress(Exception):
                    report.sections.extend(sections())
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down: no tor of our testnets, no daemon or
    forwarder and no network namespace that torpath started may be left."""
    from tests.harness import tor as torpath

    left = torpath.leftovers()
    if left:
        writer = session.config.get_terminal_writer()
        writer.line("tests/tor: left behind after the session:\n  " + "\n  ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
