"""Who may in: token checks, and caps on connections before and after AUTH."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from torbridge.config import Limits
from torbridge.protocol.permissions import Grant
from torbridge.tokens import TokenStore

log = logging.getLogger("torbridge.admission")


@dataclass(frozen=True)
class Busy:
    """A valid token over a session cap (server/admission.py): the client is
    told ``text`` in an ERROR, never AUTH-FAILURE, and no backoff starts."""

    text: str


class PendingAuth:
    """A connection not yet past AUTH, as the cap on such connections sees it.

    When ``max_unauthenticated`` is reached the oldest one is evicted
    (server/admission.py): whatever it is waiting for is cancelled and it is
    closed at once, and its session ends like one whose client left.
    """

    def __init__(self) -> None:
        self.evicted = False
        self._scope: trio.CancelScope | None = None

    def evict(self) -> None:
        self.evicted = True
        if self._scope is not None:
            self._scope.cancel()

    @contextlib.contextmanager
    def evictable(self) -> Iterator[trio.CancelScope]:
        """A scope that eviction cancels (at once if evicted already)."""
        with trio.CancelScope() as scope:
            if self.evicted:
                scope.cancel()
            self._scope = scope
            try:
                yield scope
            finally:
                self._scope = None


class Evictable(Protocol):
    """A connection not yet past AUTH (PendingAuth)."""

    def evict(self) -> None: ...


class Admission:
    def __init__(
        self, tokens: TokenStore, limits: Limits, own_endpoints: Collection[str] = ()
    ) -> None:
        self.tokens = tokens
        self.limits = limits
        # The endpoints that serve the proxy's own repository (remote = "."):
        # a token limited to others gets no more than read access to git.
        self.own_endpoints = frozenset(own_endpoints)
        # Connections not yet past AUTH, oldest first.
        self._pre_auth: OrderedDict[Evictable, None] = OrderedDict()
        self.sessions: Counter[str] = Counter()
        self.circuits = CircuitGuard(limits.max_per_circuit)
        self.waiting: Counter[str] = Counter()  # valid tokens waiting for a slot
        self._freed = trio.Event()  # set (and replaced) whenever a session ends

    def auth_failed(self, circuit: int | None) -> None:
        if circuit is not None:
            self.circuits.auth_failed(circuit, time.monotonic())

    def auth_succeeded(self, circuit: int | None) -> None:
        if circuit is not None:
            self.circuits.auth_succeeded(circuit)

    @property
    def unauthenticated(self) -> int:
        return len(self._pre_auth)

    def enter_pre_auth(self, connection: Evictable) -> bool:
        """Count a new connection; True if that evicted the oldest one.

        At the cap the NEWEST connection is let in and the oldest is evicted:
        refusing new ones would let a flood of idle connections, renewed
        faster than auth_timeout, lock every real client out. A real client
        sends AUTH at once, so it is never the oldest for long.
        """
        evicted = False
        while len(self._pre_auth) >= self.limits.max_unauthenticated:
            oldest, _ = self._pre_auth.popitem(last=False)
            oldest.evict()
            evicted = True
        self._pre_auth[connection] = None
        return evicted

    def leave_pre_auth(self, connection: Evictable) -> None:
        """The connection authenticated or ended (a no-op once evicted)."""
        self._pre_auth.pop(connection, None)

    def authorize(self, endpoint: str, token: str) -> Grant | Busy | None:
        """A session slot now: None for a token that is not valid here,
        Busy for a valid one over a cap."""
        # The store is re-read when its file changes: a revoke takes effect
        # for the next AUTH, also in a running daemon.
        info = self.tokens.check(token)
        if info is None:
            return None
        if info.endpoints is not None and endpoint not in info.endpoints:
            log.warning("token %s is not valid for endpoint %s", info.name, endpoint)
            return None
        total = sum(self.sessions.values())
        if total >= self.limits.max_sessions:
            return Busy(f"server busy: {total} sessions open; try again later")
        if self.sessions[info.name] >= self.limits.max_sessions_per_token:
            return Busy(
                f"this token already has {self.sessions[info.name]} sessions open;"
                " use fewer parallel jobs (-J) or try again later"
            )
        self.sessions[info.name] += 1
        return Grant(info.name, info.mode, info.git_access(self.own_endpoints))

    async def admit(self, endpoint: str, token: str) -> Grant | Busy | None:
        """``authorize``, waiting up to ``session_wait`` for a slot at a cap.

        The queue is bounded: at most ``max_sessions_per_token`` connections
        of a token, and ``max_sessions`` in all, wait; one more is told Busy
        at once. A waiting connection holds a socket and nothing else.
        """
        answer = self.authorize(endpoint, token)
        if not isinstance(answer, Busy):
            return answer
        return await self.wait_for_slot(endpoint, token, answer)

    async def wait_for_slot(self, endpoint: str, token: str, busy: Busy) -> Grant | Busy | None:
        """After ``authorize`` said ``busy``: wait for a slot (see ``admit``)."""
        answer: Grant | Busy | None = busy
        name = self.tokens.check(token)
        key = name.name if name is not None else ""
        if (
            self.waiting[key] >= self.limits.max_sessions_per_token
            or self.waiting.total() >= self.limits.max_sessions
        ):
            log.warning("token %s: %s; the queue is full", key, busy.text)
            return busy
        log.info("token %s: %s; waiting for a slot", key, busy.text)
        self.waiting[key] += 1
        try:
            with trio.move_on_after(self.limits.session_wait):
                while isinstance(answer, Busy):
                    await self._freed.wait()
                    answer = self.authorize(endpoint, token)
                return answer
        finally:
            self.waiting[key] -= 1
            if self.waiting[key] <= 0:
                del self.waiting[key]
        if isinstance(answer, Busy):
            log.warning(
                "token %s: %s; no slot within %.0fs", key, answer.text, self.limits.session_wait
            )
        return answer

    def release(self, grant: Grant) -> None:
        self.sessions[grant.token_name] -= 1
        self._freed.set()
        self._freed = trio.Event()


class CircuitGuard:
    """Per-circuit caps and failed-AUTH backoff (tor's exported circuit ids).

    A circuit is the only per-client key an onion service sees. Each failed
    AUTH doubles how long that circuit is turned away; memory stays bounded
    however many circuits an attacker builds.
    """

    MAX_TRACKED = 65536

    def __init__(
        self, max_per_circuit: int, backoff_start: float = 1.0, backoff_max: float = 300.0
    ) -> None:
        self.max_per_circuit = max_per_circuit
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.open: Counter[int] = Counter()
        self.failures: Counter[int] = Counter()
        self.blocked_until: dict[int, float] = {}

    def admit(self, circuit: int, now: float) -> str | None:
        """None if the connection may go on, else why not."""
        until = self.blocked_until.get(circuit)
        if until is not None and now < until:
            return f"circuit {circuit} backing off after failed AUTH ({until - now:.0f}s left)"
        if self.open[circuit] >= self.max_per_circuit:
            return f"circuit {circuit} already has {self.open[circuit]} connections"
        self.open[circuit] += 1
        return None

    def leave(self, circuit: int) -> None:
        self.open[circuit] -= 1
        if self.open[circuit] <= 0:
            del self.open[circuit]

    def auth_failed(self, circuit: int, now: float) -> None:
        self.failures[circuit] += 1
        delay = self.backoff_start * 2 ** (self.failures[circuit] - 1)
        self.blocked_until[circuit] = now + min(delay, self.backoff_max)
        if len(self.blocked_until) > self.MAX_TRACKED:
            self._prune(now)

    def auth_succeeded(self, circuit: int) -> None:
        self.failures.pop(circuit, None)
        self.blocked_until.pop(circuit, None)

    def _prune(self, now: float) -> None:
        for circuit, until in list(self.blocked_until.items()):
            if until <= now:
                del self.blocked_until[circuit]
                self.failures.pop(circuit, None)
        # Still too many: forget the ones that would be let in soonest.
        excess = len(self.blocked_until) - self.MAX_TRACKED // 2
        if excess > 0:
            for circuit, _ in sorted(self.blocked_until.items(), key=lambda kv: kv[1])[:excess]:
                del self.blocked_until[circuit]
                self.failures.pop(circuit, None)
