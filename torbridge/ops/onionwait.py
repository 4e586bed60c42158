"""Whether the bridge's onion can be reached yet, for ``token add`` and ``client add``.

An address handed out before tor has uploaded the descriptor fails when
the client links at once (SOCKS error 0xF0, "descriptor can not be
found"), and the client's tor then does not ask the same directories
again for a while (15 minutes on the real network) unless it restarts or
gets NEWNYM. So the CLI asks the running daemon (its control socket)
whether the onion is published, and waits for it, or says what to do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from torbridge.config import Config
from torbridge.server.control import control_socket, query

# The daemon gives up on the first publication after 120 s (OnionPublisher).
WAIT_SECONDS = 150.0
POLL_SECONDS = 1.0
# tor's REND_HID_SERV_DIR_REQUERY_PERIOD: a failed lookup is not retried at the
# same directories for this long.
REQUERY_MINUTES = 15

NOT_RUNNING = (
    "the onion service is not published: the daemon is not running. Start it"
    " (`systemctl start torbridge` returns once tor has uploaded the descriptor) and hand"
    " the address out only then: a client that links earlier fails (SOCKS error 240,"
    f" descriptor not found) and its tor does not look the address up again for up to"
    f" {REQUERY_MINUTES} minutes (or until that tor restarts)"
)
PUBLISHING = (
    "the onion service is not published yet (tor is uploading its descriptor, usually"
    ' within a minute; `torbridge status` shows "published" when it is done): link only'
    " then, or the client's tor fails and does not look the address up again for up to"
    f" {REQUERY_MINUTES} minutes"
)


def daemon_snapshot(config: Config) -> dict[str, Any] | None:
    """The running daemon's status, or None if no daemon answers."""
    try:
        text = query(control_socket(config), "status", timeout=10)
        snapshot: dict[str, Any] = json.loads(text)
    except (OSError, ValueError):
        return None
    return snapshot


def onion_warning(
    config: Config,
    wait: bool,
    say: Callable[[str], None],
    timeout: float = WAIT_SECONDS,
) -> str | None:
    """None once the onion is published (waiting up to ``timeout`` when ``wait``),
    else why the address does not work yet. Only for an ephemeral onion: in
    torrc mode tor publishes by itself and torbridge cannot see its uploads."""
    if config.tor.onion != "ephemeral" or config.tor.control is None:
        return None
    deadline = time.monotonic() + timeout
    told = False
    while True:
        snapshot = daemon_snapshot(config)
        if snapshot is None:
            return NOT_RUNNING
        if snapshot.get("onion_state") == "published":
            return None
        if not wait or time.monotonic() > deadline:
            return PUBLISHING
        if not told:
            say(
                "waiting for tor to publish the onion service before printing the addresses"
                f" (up to {timeout:.0f}s; --no-wait prints them at once)"
            )
            told = True
        time.sleep(POLL_SECONDS)
