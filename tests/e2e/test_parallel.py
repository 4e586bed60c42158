"""``-J64`` through one token to the proxy's own endpoint, default limits.

Before: ``max_sessions_per_token = 16`` answered the 17th connection with
AUTH-FAILURE ("Unable to authenticate with peer", 16 files failed of a
``get -J32``). Now one client's ``-J64`` fits, and a connection over a cap
waits for a slot and is never told its token is wrong.
"""

from __future__ import annotations

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.client import JOBS, parallel_files, peak_sessions, run_parallel_workflow

pytestmark = pytest.mark.annex


def test_j64_through_one_token(rw_client: Client, proxy_repo: AnnexRepo, bridge: Bridge) -> None:
    files = parallel_files(rw_client)
    run_parallel_workflow(rw_client, "hub", files, proxy_repo.has_key)
    proxy_repo.fsck_content(timeout=300)
    log = bridge.log()
    assert "authentication failed" not in log
    # Far more than the old cap of 16 were open at once.
    assert 16 < peak_sessions(log) <= JOBS + 1, peak_sessions(log)
    bridge.assert_alive()
