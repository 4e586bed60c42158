"""Fixtures for the load tests: those of tests/e2e (tests/harness/fixtures.py),
more descriptors, and a longer teardown for hundreds of sessions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness.bridge import Bridge
from tests.harness.fixtures import (  # noqa: F401 (fixtures and the report hook)
    annex_env,
    client,
    make_bridge,
    make_client,
    proxy_repo,
    pytest_runtest_makereport,
)
from tests.harness.load import raise_nofile

IDLE_WAIT = 30.0  # seconds the session helpers may take to exit after a test


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    # Each session is a socket here and a socket plus pipes in the daemon,
    # which inherits this limit.
    raise_nofile(16384)


@pytest.fixture
def bridge_teardown() -> tuple[float, float]:
    """Hundreds of session helpers take longer to exit than e2e's few."""
    return IDLE_WAIT, 30.0


@pytest.fixture
def make_load_bridge(make_bridge: Callable[..., Bridge]) -> Callable[..., Bridge]:  # noqa: F811
    """Factory: a configured (not started) daemon with ``limits``; stopped at
    teardown as in tests/e2e (``make_bridge``), with ``IDLE_WAIT``."""

    def make(limits: dict[str, float] | None = None) -> Bridge:
        return make_bridge(limits=limits)

    return make
