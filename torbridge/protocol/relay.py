"""The server side of a bridged P2P session, as a state machine with no I/O.

One ``Relay`` follows one client connection: authentication, version
negotiation, server modes, and each request's whole exchange with the peer
that serves the endpoint (a local ``git-annex-shell``, a tor-annex node, a
cluster...). It is fed events and answers with ``Action`` objects that the
I/O layer carries out in order; it never decides anything by looking at I/O.
Those events and actions are protocol/relayactions.py; the state machine
itself stays whole here (some 600 lines), one phase table and the
transitions between its phases, which read best side by side.

The loop is strictly request-synchronous, as git-annex's own proxy: one
client request, its complete exchange with the peer, then the next request.
``next_reader`` says whose line to read next (``None``: carry out actions
first). Bodies of DATA messages are copied by the I/O layer (``CopyBody``)
and it reports back with ``body_done``, so no line is read from a side while
a body from it is still in flight (the waitv rule).
"""

from __future__ import annotations

import enum

from torbridge.protocol import gitaccess as g
from torbridge.protocol import messages as m
from torbridge.protocol import versions
from torbridge.protocol.clienttext import UNREACHABLE, peer_reason, relayed_error
from torbridge.protocol.framing import BadLine, EndOfStream, LineTooLong
from torbridge.protocol.permissions import GitAccess, Mode
from torbridge.protocol.relayactions import (
    Action,
    CheckAuth,
    ClosePeer,
    CopyBody,
    DiscardBody,
    EndSession,
    InEvent,
    OpenPeer,
    RefuseService,
    Removed,
    RunService,
    Send,
    Side,
    Stored,
    WatchRefs,
)
from torbridge.protocol.versions import Feature, supports

READ_ONLY_ERROR = "this repository is read-only; write access denied"
APPEND_ONLY_ERROR = "this repository is append-only; removal denied"


class Phase(enum.Enum):
    AUTH = "auth"  # waiting for the client's AUTH
    AUTHENTICATING = "authenticating"  # waiting for CheckAuth's answer
    IDLE = "idle"  # waiting for the client's next request
    OPENING = "opening"  # waiting for OpenPeer's answer
    PEER_REPLY = "peer-reply"  # waiting for the peer's answer to the request
    CLIENT_UNLOCK = "client-unlock"  # LOCKCONTENT held: UNLOCKCONTENT must come
    CLIENT_PUT_DATA = "client-put-data"  # after PUT-FROM: DATA or DATA-PRESENT
    CLIENT_VALIDITY = "client-validity"  # after a PUT body (v1+): VALID/INVALID
    PEER_PUT_RESULT = "peer-put-result"  # after a PUT body: SUCCESS/FAILURE
    PEER_VALIDITY = "peer-validity"  # after a GET body (v1+): VALID/INVALID
    CLIENT_GET_RESULT = "client-get-result"  # after a GET: the client's verdict
    BODY = "body"  # a DATA body is being copied
    SERVICE = "service"  # CONNECT: git runs, the session ends after
    WATCHING = "watching"  # NOTIFYCHANGE: waiting for the refs to change
    DONE = "done"


# What the peer may answer, per request type, while in PEER_REPLY.
_PEER_REPLIES: dict[type[m.Message], tuple[type[m.Message], ...]] = {
    m.CheckPresent: (m.Success, m.Failure, m.Error),
    m.LockContent: (m.Success, m.Failure, m.Error),
    m.Remove: (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus, m.Error),
    m.RemoveBefore: (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus, m.Error),
    m.GetTimestamp: (m.Timestamp, m.Error),
    m.Put: (m.AlreadyHave, m.AlreadyHavePlus, m.PutFrom, m.Failure, m.Error),
    m.Get: (m.Data, m.Error),
}
_RESULTS = (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus, m.Error)
_CLIENT_VERDICTS = (m.Success, m.Failure, m.SuccessPlus, m.FailurePlus)
_VALIDITY = (m.Valid, m.Invalid)
_WRITES: dict[type[m.Message], dict[Mode, str]] = {
    m.Put: {Mode.READ_ONLY: READ_ONLY_ERROR},
    m.Remove: {Mode.READ_ONLY: READ_ONLY_ERROR, Mode.APPEND_ONLY: APPEND_ONLY_ERROR},
    m.RemoveBefore: {Mode.READ_ONLY: READ_ONLY_ERROR, Mode.APPEND_ONLY: APPEND_ONLY_ERROR},
}


class RelayError(RuntimeError):
    """The I/O layer called the state machine out of turn (a bug, not input)."""


class Relay:
    """State of one client session bridged to one peer."""

    def __init__(
        self,
        server_uuid: str,
        peer_name: str,
        notifies: bool = False,
        peer_max_version: int | None = None,
    ) -> None:
        self.server_uuid = server_uuid  # what AUTH-SUCCESS tells the client
        self.peer_name = peer_name  # for error texts: which peer failed
        # NOTIFYCHANGE is served (the proxy's own repository), not a protocol error.
        self.notifies = notifies
        # The highest version the peer agrees to, when known without asking it
        # (see _answer_version); None: VERSION opens the peer to ask.
        self.peer_max_version = peer_max_version
        self.phase = Phase.AUTH
        self.mode = Mode.READ_ONLY  # until AUTH says otherwise
        self.git = GitAccess.NONE  # likewise
        self.client_uuid: str | None = None
        self.version = versions.DEFAULT_VERSION  # agreed with the client
        self.negotiated = False  # VERSION is only valid as the first request
        self.bypass: tuple[str, ...] = ()
        self.peer_open = False
        self.request: m.Message | None = None  # the request in progress
        self._after_body = Phase.IDLE
        self._pending: list[Action] = []  # to send once the peer is open
        self._retry_allowed = False  # the request went out on a reused connection
        self._remove_unanswered = False  # a REMOVE reached the peer, its answer has not
        # A PUT was answered with neither PUT-FROM nor ALREADY-HAVE: the stock
        # client then sends ERROR back, and is ready for its next request.
        self._put_refused = False

    # --- who speaks next --------------------------------------------------

    @property
    def next_reader(self) -> Side | None:
        if self.phase in (
            Phase.AUTH,
            Phase.IDLE,
            Phase.CLIENT_UNLOCK,
            Phase.CLIENT_PUT_DATA,
            Phase.CLIENT_VALIDITY,
            Phase.CLIENT_GET_RESULT,
        ):
            return Side.CLIENT
        if self.phase in (Phase.PEER_REPLY, Phase.PEER_PUT_RESULT, Phase.PEER_VALIDITY):
            return Side.PEER
        return None

    @property
    def _validity(self) -> bool:
        """Whether this conversation has VALID/INVALID after a DATA body."""
        return supports(self.version, Feature.VALIDITY)

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    # --- inputs -----------------------------------------------------------

    def receive(self, side: Side, event: InEvent) -> list[Action]:
        """An event read from ``side``, which must be ``next_reader``."""
        if side is not self.next_reader:
            raise RelayError(f"read from {side.value} in phase {self.phase.value}")
        if side is Side.CLIENT:
            return self._from_client(event)
        return self._from_peer(event)

    def auth_accepted(self, mode: Mode, git: GitAccess | None = None) -> list[Action]:
        """``git``: the token's access to the proxy's git repository (None: the mode's)."""
        self._expect(Phase.AUTHENTICATING)
        self.mode = mode
        self.git = g.default_for(mode) if git is None else git
        self.phase = Phase.IDLE
        return [Send(Side.CLIENT, m.AuthSuccess(self.server_uuid))]

    def auth_busy(self, text: str) -> list[Action]:
        """The token is valid, but no session slot came free in time."""
        self._expect(Phase.AUTHENTICATING)
        return self._end(f"busy: {text}", [Send(Side.CLIENT, m.Error(text))])

    def auth_rejected(self) -> list[Action]:
        self._expect(Phase.AUTHENTICATING)
        return self._end("authentication failed", [Send(Side.CLIENT, m.AuthFailure())], 1.0)

    def peer_opened(self, version: int) -> list[Action]:
        self._expect(Phase.OPENING)
        self.peer_open = True
        self._retry_allowed = False  # a request on a new connection is never retried
        pending, self._pending = self._pending, []
        if not self.negotiated:
            # The client's VERSION opened the peer: tell it what the peer agreed.
            self.negotiated = True
            self.version = versions.agreed(self.version, version)
            self.phase = Phase.IDLE
            return [Send(Side.CLIENT, m.Version(self.version)), *pending]
        if version != self.version:
            self.peer_open = False
            self.phase = Phase.IDLE
            return [
                *self._remove_in_doubt(),
                ClosePeer("version changed"),
                Send(Side.CLIENT, m.Error(f"{self.peer_name}: protocol version changed")),
            ]
        self.phase = Phase.PEER_REPLY
        self._note_remove_sent()
        return pending

    def refs_changed(self, shas: tuple[str, ...]) -> list[Action]:
        """WatchRefs is answered: the refs now point at ``shas`` (never empty)."""
        self._expect(Phase.WATCHING)
        if not shas:
            raise RelayError("refs_changed with no refs")
        self.phase = Phase.IDLE
        return [Send(Side.CLIENT, m.Changed(" ".join(shas)))]

    def body_done(self) -> list[Action]:
        """The body announced by the last CopyBody has been copied."""
        self._expect(Phase.BODY)
        self.phase = self._after_body
        if self.phase is Phase.PEER_PUT_RESULT and not self.peer_open:
            return self._put_failed()
        return []

    def side_lost(
        self, side: Side, reason: str, header_unsent: bool = False, retry: bool = True
    ) -> list[Action]:
        """``side`` failed: EOF, an I/O error, a deadline, or (peer) could not open.

        ``header_unsent``: the peer failed before any byte of a GET body, and
        the I/O layer has not yet sent the client the DATA header.
        """
        if self.phase is Phase.DONE:
            return []
        if side is Side.CLIENT and self.phase is Phase.WATCHING:
            # A remotedaemon that stops closes its connection while it waits:
            # that is how a watching client leaves, not a failure.
            return self._end(f"client left: {reason}", [])
        if side is Side.CLIENT:
            return self._end(f"client lost: {reason}", self._remove_in_doubt(), clean=False)
        if not retry:
            self._retry_allowed = False
        return self._peer_lost(reason, header_unsent=header_unsent)

    # --- the client's messages ------------------------------------------------

    def _from_client(self, event: InEvent) -> list[Action]:
        if isinstance(event, EndOfStream):
            clean = event.clean and self.phase in (Phase.IDLE, Phase.AUTH)
            why = "client closed" if clean else "client closed mid-exchange"
            return self._end(why, [], clean=clean)
        if isinstance(event, LineTooLong):
            return self._end("client sent a line over the limit", [], clean=False)
        if self.phase is Phase.AUTH:
            return self._auth(event)
        if self.phase is Phase.IDLE:
            put_refused, self._put_refused = self._put_refused, False
            if isinstance(event, m.Error) and put_refused:
                # The stock client's "expected PUT_FROM or ALREADY_HAVE": it
                # is back in step, and closing here would fail the next
                # transfer on its pooled connection (git-annex's own server
                # gives up instead).
                return []
        if isinstance(event, m.Error):
            return self._end(f"client error: {event.text}", [])
        if self.phase is Phase.IDLE:
            return self._request(event)
        if self.phase is Phase.CLIENT_UNLOCK:
            self.phase = Phase.IDLE
            if isinstance(event, m.UnlockContent):
                return [Send(Side.PEER, event)] if self.peer_open else []
            release: list[Action] = [Send(Side.PEER, m.UnlockContent())] if self.peer_open else []
            # A DATA's body must be skipped, or its bytes would be read as lines.
            skip: list[Action] = [DiscardBody(event.length)] if isinstance(event, m.Data) else []
            return [*release, Send(Side.CLIENT, m.Error("expected UNLOCKCONTENT")), *skip]
        if self.phase is Phase.CLIENT_PUT_DATA:
            return self._put_data(event)
        if self.phase is Phase.CLIENT_VALIDITY:
            if not isinstance(event, _VALIDITY):
                return self._client_out_of_step(event)
            if not self.peer_open:
                return self._put_failed()
            self.phase = Phase.PEER_PUT_RESULT
            return [Send(Side.PEER, event)]
        if self.phase is Phase.CLIENT_GET_RESULT:
            if not isinstance(event, _CLIENT_VERDICTS):
                return self._client_out_of_step(event)
            self.phase = Phase.IDLE
            return [Send(Side.PEER, event)] if self.peer_open else []
        raise RelayError(f"client event in phase {self.phase.value}")

    def _auth(self, event: InEvent) -> list[Action]:
        if isinstance(event, m.Auth):
            self.client_uuid = event.uuid
            self.phase = Phase.AUTHENTICATING
            return [CheckAuth(event.uuid, event.token)]
        # Stock clients always start with AUTH: anything else is not one.
        text = "unknown command" if isinstance(event, BadLine) else "unexpected command"
        return self._end("no AUTH", [Send(Side.CLIENT, m.Error(text))], linger=1.0)

    def _request(self, event: InEvent) -> list[Action]:
        if isinstance(event, BadLine):
            return [Send(Side.CLIENT, m.Error("unknown command"))]
        if isinstance(event, (LineTooLong, EndOfStream)):
            raise RelayError("handled by caller")
        if isinstance(event, m.Version):
            if self.negotiated:  # only as the first request, as stock clients send it
                return [Send(Side.CLIENT, m.Error("unexpected command"))]
            self.version = versions.agreed(event.version)
            if self.peer_max_version is not None:
                return self._answer_version()
            return self._open([])  # peer_opened answers with the agreed version
        self.negotiated = True
        if isinstance(event, m.Bypass):
            if not supports(self.version, Feature.BYPASS):
                return [Send(Side.CLIENT, m.Error("unexpected command"))]
            self.bypass = tuple(sorted(set(self.bypass) | set(event.uuids)))
            return [Send(Side.PEER, event)] if self.peer_open else []
        if isinstance(event, m.NotifyChange) and self.notifies:
            # As git-annex's own server: CHANGED once the refs change, then
            # the session goes on (the remotedaemon sends NOTIFYCHANGE again).
            self.request = event
            self.phase = Phase.WATCHING
            return [WatchRefs()]
        if isinstance(event, m.NotifyChange):
            # As git-annex's proxy, for proxied remotes and clusters.
            return self._end(
                "NOTIFYCHANGE is not served", [Send(Side.CLIENT, m.Error("protocol error"))]
            )
        if isinstance(event, m.Connect):
            return self._connect(event.service)
        if isinstance(event, m.Data):
            # A stray body must be skipped, or its bytes would be read as lines.
            return [Send(Side.CLIENT, m.Error("unexpected command")), DiscardBody(event.length)]
        if type(event) not in _PEER_REPLIES:
            return [Send(Side.CLIENT, m.Error("unexpected command"))]
        # REMOVE-BEFORE and GETTIMESTAMP pass at any version, as git-annex's server.
        self._put_refused = isinstance(event, m.Put)  # until PUT-FROM or ALREADY-HAVE
        refusal = _WRITES.get(type(event), {}).get(self.mode)
        if refusal is not None:
            return [Send(Side.CLIENT, m.Error(refusal))]
        self.request = event
        if not self.peer_open:
            return self._open([Send(Side.PEER, event)])
        self.phase = Phase.PEER_REPLY
        self._retry_allowed = True
        self._note_remove_sent()
        return [Send(Side.PEER, event)]

    def _connect(self, service: str) -> list[Action]:
        self.phase = Phase.SERVICE
        pushing = service == "git-receive-pack"
        action: Action
        if self.git is GitAccess.NONE:
            action = RefuseService(service, g.NO_GIT_ERROR)
        elif pushing and self.git < GitAccess.WRITE:
            # git-annex's own text where the mode is what forbids it.
            text = READ_ONLY_ERROR if self.mode is not Mode.READ_WRITE else g.GIT_READ_ONLY_ERROR
            action = RefuseService(service, text)
        else:
            action = RunService(service, may_rewrite=pushing and self.git is GitAccess.REWRITE)
        return self._end(f"CONNECT {service} done", [action])

    def _put_data(self, event: InEvent) -> list[Action]:
        if isinstance(event, m.Data):
            if not self.peer_open:
                # The peer went away after PUT-FROM: take the body, then say so.
                if self._validity:
                    self.phase = Phase.CLIENT_VALIDITY
                    return [DiscardBody(event.length)]
                return [DiscardBody(event.length), *self._put_failed()]
            self.phase = Phase.BODY
            self._after_body = Phase.CLIENT_VALIDITY if self._validity else Phase.PEER_PUT_RESULT
            return [Send(Side.PEER, event), CopyBody(Side.CLIENT, event.length)]
        if isinstance(event, m.DataPresent) and supports(self.version, Feature.DATA_PRESENT):
            if not self.peer_open:
                return self._put_failed()
            self.phase = Phase.PEER_PUT_RESULT
            return [Send(Side.PEER, event)]
        return self._client_out_of_step(event)

    def _client_out_of_step(self, event: InEvent) -> list[Action]:
        """The client broke the exchange in the middle: the peer is mid-exchange
        too and cannot be brought back in step, so its connection is dropped."""
        self.phase = Phase.IDLE
        actions: list[Action] = []
        if self.peer_open:
            self.peer_open = False
            actions.append(ClosePeer("client broke the exchange"))
        text = "unknown command" if isinstance(event, BadLine) else "unexpected command"
        actions.append(Send(Side.CLIENT, m.Error(text)))
        if isinstance(event, m.Data):
            actions.append(DiscardBody(event.length))
        return actions

    # --- the peer's messages ------------------------------------------------------

    def _from_peer(self, event: InEvent) -> list[Action]:
        if isinstance(event, EndOfStream):
            return self._peer_lost("connection closed")
        if isinstance(event, LineTooLong):
            return self._peer_lost("line over the limit")
        if isinstance(event, BadLine):
            return self._peer_broke(f"unparsable line ({event.reason})")
        if self.phase is Phase.PEER_REPLY:
            return self._peer_reply(event)
        if self.phase is Phase.PEER_PUT_RESULT:
            if not isinstance(event, _RESULTS):
                return self._peer_broke(f"unexpected {type(event).__name__} after DATA")
            self.phase = Phase.IDLE
            return [*self._observe(event), Send(Side.CLIENT, self._told(event))]
        if self.phase is Phase.PEER_VALIDITY:
            if not isinstance(event, _VALIDITY):
                return self._peer_broke(f"unexpected {type(event).__name__} after DATA")
            self.phase = Phase.CLIENT_GET_RESULT
            return [Send(Side.CLIENT, event)]
        raise RelayError(f"peer event in phase {self.phase.value}")

    def _peer_reply(self, event: m.Message) -> list[Action]:
        request = self.request
        assert request is not None
        self._retry_allowed = False
        self._remove_unanswered = False
        if not isinstance(event, _PEER_REPLIES[type(request)]):
            what = f"unexpected {type(event).__name__} to {type(request).__name__}"
            return self._peer_broke(what)
        if isinstance(request, m.LockContent) and isinstance(event, m.Success):
            self.phase = Phase.CLIENT_UNLOCK
            return [Send(Side.CLIENT, event)]
        if isinstance(request, m.Put) and isinstance(event, (m.AlreadyHave, m.AlreadyHavePlus)):
            self._put_refused = False
        if isinstance(request, m.Put) and isinstance(event, m.PutFrom):
            self._put_refused = False
            self.phase = Phase.CLIENT_PUT_DATA
            return [Send(Side.CLIENT, event)]
        if isinstance(request, m.Get) and isinstance(event, m.Data):
            self.phase = Phase.BODY
            self._after_body = Phase.PEER_VALIDITY if self._validity else Phase.CLIENT_GET_RESULT
            return [Send(Side.CLIENT, event), CopyBody(Side.PEER, event.length)]
        self.phase = Phase.IDLE
        return [*self._observe(event), Send(Side.CLIENT, self._told(event))]

    def _told(self, reply: m.Message) -> m.Message:
        """The peer's reply as the client hears it: its ERROR only if it
        names nothing of the proxy host (clienttext.py)."""
        return relayed_error(self.peer_name, reply) if isinstance(reply, m.Error) else reply

    def _observe(self, result: m.Message) -> list[Action]:
        """What the proxy's location log should learn from a result.

        Put before the result's Send to the client: a client that is gone
        ends the session at that Send, and what the peer did must be
        recorded all the same.
        """
        request = self.request
        ok = isinstance(result, (m.Success, m.SuccessPlus))
        plus = result.uuids if isinstance(result, (m.SuccessPlus, m.FailurePlus)) else ()
        # SUCCESS[-PLUS]: the peer itself, and any others it names; FAILURE-PLUS
        # names the ones that did it although the peer itself failed.
        uuids = tuple(dict.fromkeys((self.server_uuid, *plus) if ok else plus))
        if isinstance(request, m.Put) and ok:
            return [Stored(request.key, uuids)]
        if isinstance(request, (m.Remove, m.RemoveBefore)) and uuids:
            return [Removed(request.key, uuids)]
        return []

    def _peer_broke(self, what: str) -> list[Action]:
        """The peer said something out of protocol: drop it, tell the client."""
        return self._peer_lost(f"protocol error: {what}", close=True)

    def _peer_lost(
        self, reason: str, close: bool = False, header_unsent: bool = False
    ) -> list[Action]:
        was_open, self.peer_open = self.peer_open, False
        actions: list[Action] = [ClosePeer(reason)] if close or was_open else []
        # The client hears what failed; the cause (which may name an onion
        # or a path) is the session's to log.
        error = m.Error(f"{self.peer_name}: {peer_reason(reason)}")
        phase = self.phase
        if phase is Phase.OPENING:
            pending, self._pending = self._pending, []
            if not self.negotiated:
                # No peer to agree a version with. An ERROR alone would leave
                # the client's pooled connection at version 0. It is told why,
                # then closed, as git-annex's proxy closes: the client's
                # request on that new connection fails, and its next one opens
                # another connection.
                told = m.Error(f"{self.peer_name}: {UNREACHABLE}")
                return self._end(
                    f"{self.peer_name} unreachable at VERSION: {reason}",
                    [*actions, *self._remove_in_doubt(), Send(Side.CLIENT, told)],
                    clean=False,
                )
            self.phase = Phase.IDLE
            if not pending:
                raise RelayError("opening with nothing pending")
            return [
                *actions,
                *self._remove_in_doubt(),
                Send(Side.CLIENT, m.Error(f"{self.peer_name}: {UNREACHABLE}")),
            ]
        if phase is Phase.PEER_REPLY:
            if self._retry_allowed and not close and self.request is not None:
                # The connection may simply have gone stale between requests:
                # every request is safe to repeat, so try once on a new one.
                self._retry_allowed = False
                return [*actions, *self._open([Send(Side.PEER, self.request)])]
            self.phase = Phase.IDLE
            return [*actions, *self._remove_in_doubt(), Send(Side.CLIENT, error)]
        if phase is Phase.PEER_PUT_RESULT:
            self.phase = Phase.IDLE
            return [*actions, Send(Side.CLIENT, error)]
        if phase is Phase.PEER_VALIDITY:
            # The body arrived whole but nobody vouches for it: INVALID makes
            # the client verify the content itself before keeping it.
            self.phase = Phase.CLIENT_GET_RESULT
            return [*actions, Send(Side.CLIENT, m.Invalid())]
        getting = self._after_body in (Phase.PEER_VALIDITY, Phase.CLIENT_GET_RESULT)
        if phase is Phase.BODY and getting and header_unsent:
            # The client has not seen DATA yet: it can simply be told.
            self.phase = Phase.IDLE
            return [*actions, Send(Side.CLIENT, error)]
        if phase is Phase.BODY and getting:
            # A GET body cannot be completed: closing is the only honest option.
            return self._end(f"{self.peer_name} lost during GET: {reason}", actions, clean=False)
        # IDLE, a client phase, or the peer failed while a PUT body was copied
        # to it (the body is drained, then the client is told).
        return actions

    def _note_remove_sent(self) -> None:
        if isinstance(self.request, (m.Remove, m.RemoveBefore)):
            self._remove_unanswered = True

    def _remove_in_doubt(self) -> list[Action]:
        """A REMOVE went to the peer and no answer will come: it may have
        removed the object. Logged as missing: a copy not counted is safe, a
        copy counted that is gone could let the last one be dropped."""
        if not self._remove_unanswered:
            return []
        self._remove_unanswered = False
        request = self.request
        assert isinstance(request, (m.Remove, m.RemoveBefore))
        return [Removed(request.key, (self.server_uuid,))]

    def _put_failed(self) -> list[Action]:
        self.phase = Phase.IDLE
        return [Send(Side.CLIENT, m.Error(f"{self.peer_name}: connection lost during transfer"))]

    # --- an idle session holds no peer ------------------------------------------------
    #
    # A peer connection costs: a git-annex-shell is 10-20 MiB, a node's
    # git-annex serves at most 100 connections at a time. Clients keep
    # theirs open for hours (a remotedaemon waiting for changes, a pooled
    # connection of a long-running git-annex), so the peer is opened at the
    # first request that needs it and stopped once the client has been
    # quiet for a while. The next request reopens it at the version the
    # client agreed to, as after a stale connection; the client never knows.

    def _answer_version(self) -> list[Action]:
        """VERSION answered here: the peer's answer is known without asking it.

        A git-annex server agrees to min(theirs, its maximum), whoever asks
        and whenever; the peer is opened at that version by the first
        request that needs it (and a peer that then agrees to another
        version fails that request, as a reopen at another version does).
        """
        assert self.peer_max_version is not None
        self.version = versions.agreed(self.version, self.peer_max_version)
        self.negotiated = True
        return [Send(Side.CLIENT, m.Version(self.version))]

    @property
    def peer_stoppable(self) -> bool:
        """The peer is open and holds nothing the session still needs.

        Only between requests (IDLE) or while waiting for changes (WATCHING):
        never while a LOCKCONTENT lock is held (CLIENT_UNLOCK; the lock lives
        in the peer) or in any part of an exchange (a transfer in progress).
        git-annex servers keep no other state between requests: BYPASS is
        passed again on the reopen, and GETTIMESTAMP's clock is the host's
        (CLOCK_BOOTTIME), the same for a new git-annex-shell.
        """
        return self.peer_open and self.phase in (Phase.IDLE, Phase.WATCHING)

    def peer_idle(self) -> list[Action]:
        """The client has been quiet for the idle period: stop the peer if it may be."""
        if not self.peer_stoppable:
            return []
        self.peer_open = False
        self._retry_allowed = False
        return [ClosePeer("idle")]

    # --- helpers ------------------------------------------------------------------

    def _open(self, pending: list[Action]) -> list[Action]:
        self.phase = Phase.OPENING
        self._pending = pending
        return [OpenPeer(self.version, self.bypass)]

    def _end(
        self, reason: str, actions: list[Action], linger: float = 0.0, clean: bool = True
    ) -> list[Action]:
        self.phase = Phase.DONE
        self.peer_open = False
        return [*actions, EndSession(reason, clean=clean, linger=linger)]

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RelayError(f"expected phase {phase.value}, in {self.phase.value}")
