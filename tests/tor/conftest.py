"""Fixtures for the Tor tier: one private Tor network (127.0.0.1 only) per session.

``testnet`` starts once per test session and stops at its end; ``client_tor``
and ``service_tor`` run on it for the whole session too. Tests that publish
onion services keep their own control connection open (the service lives as
long as it does). The helpers (``require_tor``, ``socks_connect``, the echo
servers, the leak check's ``leftovers``) are in tests/harness/tor.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.harness import tor as torpath
from tests.harness.tor import EchoHandler, TCPEcho, UnixEcho, require_tor, serve_in_thread
from torbridge.testnet import TestNet, TorProcess

log = logging.getLogger("tests.tor")


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
# echo servers (tests/harness/tor.py)


@pytest.fixture
def tcp_echo() -> Iterator[str]:
    """An echo server; yields its "127.0.0.1:PORT"."""
    server = TCPEcho(("127.0.0.1", 0), EchoHandler)
    thread = serve_in_thread(server)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def unix_echo() -> Iterator[Path]:
    """An echo server on a unix socket (a short path: sun_path is 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="tb-echo-"))
    path = directory / "echo.sock"
    server = UnixEcho(str(path), EchoHandler)
    thread = serve_in_thread(server)
    yield path
    server.shutdown()
    server.server_close()
    thread.join()
    shutil.rmtree(directory, ignore_errors=True)


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
    left = torpath.leftovers()
    if left:
        writer = session.config.get_terminal_writer()
        writer.line("tests/tor: left behind after the session:\n  " + "\n  ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
