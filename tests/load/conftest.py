"""Fixtures for the load tests: those of tests/e2e, and a daemon with [limits]."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import BRIDGES
from tests.harness.annex import AnnexEnv, AnnexRepo, Bridge
from tests.harness.load import LoadBridge, raise_nofile

# The fixtures of tests/e2e, and its hook that adds the daemon log to a failure.
annex_env = e2e.annex_env
proxy_repo = e2e.proxy_repo
make_client = e2e.make_client
client = e2e.client
pytest_runtest_makereport = e2e.pytest_runtest_makereport

IDLE_WAIT = 30.0  # seconds the session helpers may take to exit after a test


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    # Each session is a socket here and a socket plus pipes in the daemon,
    # which inherits this limit.
    raise_nofile(16384)


@pytest.fixture
def make_load_bridge(
    request: pytest.FixtureRequest, annex_env: AnnexEnv, proxy_repo: AnnexRepo, tmp_path: Path
) -> Iterator[Callable[..., LoadBridge]]:
    """Factory: a configured (not started) daemon with ``limits``; stopped at teardown.

    Teardown as in tests/e2e: the session helpers must have exited, SIGTERM
    must stop the daemon with exit 0, and whatever is left is killed.
    """
    bridges: list[LoadBridge] = []
    reported: list[Bridge] = []  # the same daemons, for the failure report's logs
    request.node.stash[BRIDGES] = reported

    def make(limits: dict[str, float] | None = None) -> LoadBridge:
        b = LoadBridge(annex_env, proxy_repo.path, tmp_path / f"bridge{len(bridges)}", limits)
        bridges.append(b)
        reported.append(b)
        return b

    yield make
    errors: list[str] = []
    for b in bridges:
        try:
            if b.proc is not None and b.returncode is None:
                left = b.wait_idle(IDLE_WAIT)
                if left:
                    errors.append(
                        f"{len(left)} session processes still running "
                        f"{IDLE_WAIT:.0f} s after the test: {left[:5]}"
                    )
                b.stop(timeout=30)
        except AssertionError as exc:
            errors.append(str(exc)[-5000:])
        finally:
            b.close()
    if errors:
        pytest.fail("daemon did not stop cleanly:\n" + "\n".join(errors), pytrace=False)
