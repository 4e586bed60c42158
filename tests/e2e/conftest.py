"""Fixtures for the end-to-end tests: real git-annex, real torbridge daemon
(tests/harness/fixtures.py)."""

from tests.harness.fixtures import (  # noqa: F401 (fixtures and the report hook)
    annex_env,
    bridge,
    bridge_teardown,
    client,
    make_bridge,
    make_client,
    proxy_repo,
    pytest_runtest_makereport,
    rw_client,
)
