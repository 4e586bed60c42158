"""The pytest fixtures every tier that runs a daemon shares; a tier's
conftest.py imports the ones it uses (``from tests.harness.fixtures import
...``), so they are defined once.

- ``annex_env``, ``proxy_repo``, ``make_client``, ``client``: git-annex.
- ``make_bridge`` (the one daemon fixture), ``bridge``, ``rw_client``:
  daemons stopped cleanly at teardown (session helpers gone within
  ``bridge_teardown``'s wait, exit 0 on SIGTERM); a tier with heavier
  sessions overrides ``bridge_teardown``.
- ``pytest_runtest_makereport``: a failed test's report gets every log
  registered with :func:`report_log` (the daemons' logs are).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.harness.annex import GIT_ANNEX_BINARY, AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge

LogMaker = Callable[[], tuple[str, str]]
LOGS = pytest.StashKey[list[LogMaker]]()
"""Logs to attach to a failed test's report: (title, text) makers."""


def report_log(request: pytest.FixtureRequest, make: LogMaker) -> None:
    """Attach ``make()`` (a title and a text) to the report if the test fails."""
    stash: pytest.Stash = request.node.stash
    logs = stash.get(LOGS, None)
    if logs is None:
        logs = []
        stash[LOGS] = logs
    logs.append(make)


def report_bridge(request: pytest.FixtureRequest, bridge: Bridge) -> None:
    report_log(request, lambda: (f"torbridge daemon log ({bridge.log_path})", bridge.log()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the registered logs (the daemons', the nodes'...)."""
    report = yield
    if report.failed:
        for make in item.stash.get(LOGS, []):
            title, text = make()
            report.sections.append((title, text[-20000:]))
    return report


@pytest.fixture
def annex_env(tmp_path: Path) -> AnnexEnv:
    if not GIT_ANNEX_BINARY.exists():
        pytest.skip(f"git-annex binary not found at {GIT_ANNEX_BINARY}")
    return AnnexEnv.create(tmp_path / "env")


@pytest.fixture
def proxy_repo(annex_env: AnnexEnv, tmp_path: Path) -> AnnexRepo:
    """The proxy's own repository (``git init`` + ``git annex init proxy``)."""
    return AnnexRepo.create(annex_env, tmp_path / "proxy", "proxy")


@pytest.fixture
def bridge_teardown() -> tuple[float, float]:
    """Seconds the session helpers get to exit after a test, and SIGTERM to exit."""
    return 10.0, 15.0


def stop_bridges(bridges: list[Bridge], idle_wait: float, stop_timeout: float) -> None:
    """Teardown: every started daemon must be idle and stop cleanly; all are closed."""
    errors: list[str] = []
    for b in bridges:
        try:
            if b.proc is not None and b.returncode is None:  # started, not stopped
                left = b.wait_idle(idle_wait)
                if left:
                    errors.append(
                        f"{len(left)} session processes still running "
                        f"{idle_wait:.0f} s after the test: {left[:5]}"
                    )
                b.stop(timeout=stop_timeout)
        except AssertionError as exc:
            errors.append(str(exc)[-5000:])
        finally:
            b.close()
    if errors:
        pytest.fail("daemon did not stop cleanly:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def make_bridge(
    request: pytest.FixtureRequest,
    annex_env: AnnexEnv,
    proxy_repo: AnnexRepo,
    tmp_path: Path,
    bridge_teardown: tuple[float, float],
) -> Iterator[Callable[..., Bridge]]:
    """Factory: a configured (not yet started) daemon for the proxy's
    repository; keyword arguments are :class:`Bridge`'s (``exposes``,
    ``limits``, ``tor``...). Stopped cleanly at teardown."""
    bridges: list[Bridge] = []

    def make(**kwargs: object) -> Bridge:
        b = Bridge(annex_env, proxy_repo.path, tmp_path / f"bridge{len(bridges)}", **kwargs)  # type: ignore[arg-type]
        bridges.append(b)
        report_bridge(request, b)
        return b

    yield make
    stop_bridges(bridges, *bridge_teardown)


@pytest.fixture
def bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    """A running daemon exposing the proxy's own repository as ``hub``."""
    b = make_bridge()
    b.start()
    return b


@pytest.fixture
def make_client(annex_env: AnnexEnv, tmp_path: Path) -> Callable[[str], Client]:
    """Factory: a fresh client repository (``git annex init NAME``)."""

    def make(name: str = "client") -> Client:
        return Client.create(annex_env, tmp_path / name, name)

    return make


@pytest.fixture
def client(make_client: Callable[[str], Client]) -> Client:
    return make_client("client")


@pytest.fixture
def rw_client(bridge: Bridge, client: Client) -> Client:
    """``client`` linked to the daemon as remote ``hub`` with a read-write token."""
    client.link(bridge.add_token("client", "rw").line, "hub")
    return client
