"""Fixtures for the end-to-end tests: real git-annex, real torbridge daemon."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.harness.annex import (
    GIT_ANNEX_BINARY,
    AnnexEnv,
    AnnexRepo,
    Bridge,
    Client,
)

BRIDGES = pytest.StashKey[list[Bridge]]()
"""The daemons a test started, for its failure report."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the daemon's log to the report."""
    report = yield
    if report.failed:
        for b in item.stash.get(BRIDGES, []):
            report.sections.append((f"torbridge daemon log ({b.log_path})", b.log()[-20000:]))
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
def make_bridge(
    request: pytest.FixtureRequest, annex_env: AnnexEnv, proxy_repo: AnnexRepo, tmp_path: Path
) -> Iterator[Callable[..., Bridge]]:
    """Factory: a configured (not yet started) daemon. Stopped cleanly at teardown."""
    bridges: list[Bridge] = []
    request.node.stash[BRIDGES] = bridges

    def make(**kwargs: object) -> Bridge:
        b = Bridge(annex_env, proxy_repo.path, tmp_path / f"bridge{len(bridges)}", **kwargs)  # type: ignore[arg-type]
        bridges.append(b)
        return b

    yield make
    errors: list[str] = []
    for b in bridges:
        try:
            if b.proc is not None and b.returncode is None:  # started, not stopped
                left = b.wait_idle(10)
                if left:
                    errors.append(
                        f"session processes leaked (still running 10 s after the test): {left}"
                    )
                b.stop()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            b.close()
    if errors:
        pytest.fail("daemon did not stop cleanly:\n" + "\n".join(errors), pytrace=False)


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
