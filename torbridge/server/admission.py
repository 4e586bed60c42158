"""Who may in: token checks, and caps on connections before and after AUTH."""

from __future__ import annotations

import logging
from collections import Counter

from torbridge.config import Limits
from torbridge.protocol.relay import Mode
from torbridge.server.session import Grant
from torbridge.tokens import TokenStore

log = logging.getLogger("torbridge.admission")


class Admission:
    def __init__(self, tokens: TokenStore, limits: Limits) -> None:
        self.tokens = tokens
        self.limits = limits
        self.unauthenticated = 0
        self.sessions: Counter[str] = Counter()

    def enter_pre_auth(self) -> bool:
        """A new connection; False if too many are still unauthenticated."""
        if self.unauthenticated >= self.limits.max_unauthenticated:
            return False
        self.unauthenticated += 1
        return True

    def leave_pre_auth(self) -> None:
        self.unauthenticated -= 1

    def authorize(self, endpoint: str, token: str) -> Grant | None:
        # The store is re-read when its file changes: a revoke takes effect
        # for the next AUTH, also in a running daemon.
        info = self.tokens.check(token)
        if info is None:
            return None
        if info.endpoints is not None and endpoint not in info.endpoints:
            log.warning("token %s is not valid for endpoint %s", info.name, endpoint)
            return None
        if self.sessions[info.name] >= self.limits.max_sessions_per_token:
            log.warning("token %s already has %d sessions", info.name, self.sessions[info.name])
            return None
        self.sessions[info.name] += 1
        return Grant(info.name, Mode(info.mode))

    def release(self, grant: Grant) -> None:
        self.sessions[grant.token_name] -= 1
