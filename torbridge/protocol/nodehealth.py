"""Node health for a cluster gateway: which nodes are down, and when each is
probed next; no I/O.

One ``NodeHealth`` is shared by every session of one cluster
(transport/cluster.py holds it); the gateway (protocol/gateway.py) skips a
node that is down and starts the probes that bring it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROBE_FIRST = 5.0  # seconds a failed node is skipped before the first probe
PROBE_MAX = 300.0  # the backoff's cap


@dataclass
class NodeState:
    up: bool = True
    down_since: float | None = None
    next_probe: float | None = None
    last_error: str | None = None
    failures: int = 0  # in a row
    probing: bool = False


class NodeHealth:
    """Which nodes are down, since when, and when each is probed next.

    Times are one monotonic clock's readings, passed in. A node that failed
    (it could not be opened, or was lost mid-exchange) is down: sessions
    skip it at once instead of paying the connect deadline again. Once its
    backoff has passed, the next session that would use it starts a probe
    (connect, AUTH, VERSION; nobody waits on it), and a probe that answers
    brings it back. The backoff doubles with each failure in a row, up to
    ``PROBE_MAX``.
    """

    def __init__(
        self, names: Sequence[str], first: float = PROBE_FIRST, cap: float = PROBE_MAX
    ) -> None:
        self.first = first
        self.cap = cap
        self.nodes: dict[str, NodeState] = {name: NodeState() for name in names}

    def is_down(self, name: str) -> bool:
        state = self.nodes.get(name)
        return state is not None and not state.up

    def failed(self, name: str, why: str, now: float) -> None:
        state = self.nodes.setdefault(name, NodeState())
        state.probing = False
        state.failures += 1
        state.last_error = why
        if state.up:
            state.up = False
            state.down_since = now
        backoff = min(self.cap, self.first * 2 ** (state.failures - 1))
        state.next_probe = now + backoff

    def succeeded(self, name: str) -> None:
        state = self.nodes.setdefault(name, NodeState())
        state.up = True
        state.down_since = None
        state.next_probe = None
        state.failures = 0
        state.probing = False

    def probe_due(self, name: str, now: float) -> bool:
        """True (once) when a down node should be probed now."""
        state = self.nodes.get(name)
        if state is None or state.up or state.probing:
            return False
        if state.next_probe is not None and now < state.next_probe:
            return False
        state.probing = True
        return True

    def probe_abandoned(self, name: str) -> None:
        """The probe was cancelled (its session ended): the next may start one."""
        state = self.nodes.get(name)
        if state is not None:
            state.probing = False

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {
            name: {
                "up": s.up,
                "down_seconds": None if s.down_since is None else round(now - s.down_since, 1),
                "next_probe_seconds": (
                    None if s.next_probe is None else round(max(0.0, s.next_probe - now), 1)
                ),
                "probing": s.probing,
                "failures_in_a_row": s.failures,
                "last_error": s.last_error,
            }
            for name, s in self.nodes.items()
        }
