"""Opening a peer: AUTH, VERSION, BYPASS as a pure exchange, no I/O.

The bridge is the client of every peer it opens (a local
``git-annex-shell p2pstdio``, a tor-annex or p2p-annex node, a
``git-annex-p2p-NET`` program). A transport sends what ``start`` returns,
then feeds each line event it reads to ``receive`` and sends what that
returns, until ``done``; ``agreed`` is then the version both sides speak.
A peer that refuses, is the wrong repository or answers out of turn raises
``HandshakeFailed`` with the text the client's error is built from.
"""

from __future__ import annotations

import enum

from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream, LineEvent
from torbridge.protocol.versions import DEFAULT_VERSION, Feature, supports


class HandshakeFailed(Exception):
    """The peer refused us or did not follow the handshake; the text says why."""


class _Step(enum.Enum):
    AUTH = enum.auto()  # waiting for AUTH-SUCCESS / AUTH-FAILURE
    VERSION = enum.auto()  # waiting for the peer's VERSION
    DONE = enum.auto()


class Handshake:
    """One peer's opening, from the bridge's side.

    ``auth``: the AUTH to send first, or None for a peer that speaks first
    (git-annex-shell greets with AUTH-SUCCESS unasked). ``version``: the
    version to ask for; at 0 no VERSION is sent (the conversation stays at
    0). ``bypass``: sent once the agreed version has BYPASS, else dropped.
    """

    def __init__(
        self,
        name: str,
        expected_uuid: str,
        version: int,
        bypass: tuple[str, ...],
        auth: m.Auth | None,
    ) -> None:
        self.name = name
        self.expected_uuid = expected_uuid
        self.version = version
        self.bypass = bypass
        self.auth = auth
        self.agreed = DEFAULT_VERSION
        self._step = _Step.AUTH

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def start(self) -> list[m.Message]:
        """What to send before reading anything."""
        return [self.auth] if self.auth is not None else []

    def receive(self, event: LineEvent) -> list[m.Message]:
        """The peer's next line event; what to send in answer."""
        if self._step is _Step.AUTH:
            reply = self._expect(event, m.AuthSuccess, m.AuthFailure)
            if isinstance(reply, m.AuthFailure):
                raise HandshakeFailed(f"{self.name} refused our token (AUTH-FAILURE)")
            assert isinstance(reply, m.AuthSuccess)
            if reply.uuid != self.expected_uuid:
                raise HandshakeFailed(
                    f"{self.name} is repository {reply.uuid}, expected {self.expected_uuid}"
                )
            if self.version != DEFAULT_VERSION:
                self._step = _Step.VERSION
                return [m.Version(self.version)]
            return self._finish()
        if self._step is _Step.VERSION:
            answer = self._expect(event, m.Version)
            assert isinstance(answer, m.Version)
            if answer.version > self.version:
                raise HandshakeFailed(
                    f"{self.name} answered VERSION {answer.version} > {self.version}"
                )
            self.agreed = answer.version
            return self._finish()
        raise RuntimeError("the handshake is over")

    def _finish(self) -> list[m.Message]:
        self._step = _Step.DONE
        if self.bypass and supports(self.agreed, Feature.BYPASS):
            return [m.Bypass(self.bypass)]
        return []

    def _expect(self, event: LineEvent, *types: type[m.Message]) -> m.Message:
        if isinstance(event, types):
            return event
        if isinstance(event, m.Error):
            why = f"peer said ERROR {event.text}"
        elif isinstance(event, EndOfStream):
            why = "peer closed the connection"
        else:
            why = f"unexpected {type(event).__name__} from peer"
        raise HandshakeFailed(f"{self.name}: {why}")
