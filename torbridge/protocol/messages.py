"""Messages of git-annex's P2P protocol: parsing and serialising, no I/O.

One line of the wire is one message. Fields are split at single spaces, the
last field takes the rest of the line (so a key may hold spaces), exactly as
git-annex's Utility/SimpleProtocol does; the fields themselves (keys, UUIDs,
numbers, associated files) are protocol/fields.py. This module is the table
of messages, one class per command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torbridge.protocol.fields import (
    ENCODING,
    ERRORS,
    check_count,
    check_key,
    check_token,
    check_uuid,
    escape_af,
    exit_code,
    no_more,
    number,
    split_word,
    unescape_af,
    words,
)

# Raised by parse(); the name stays here, where the parsing is.
from torbridge.protocol.fields import ParseError as ParseError

# What each version supports is protocol/versions.py; the name stays here too.
from torbridge.protocol.versions import MAX_VERSION as MAX_VERSION

MAX_LINE = 32768
"""Longest line git-annex accepts, in bytes, newline excluded."""


# --- messages ------------------------------------------------------------------

BY_COMMAND: dict[str, type[Message]] = {}
"""Every message type by its command: filled in by the class statements below."""


def _one_line(value: str, what: str) -> str:
    if "\n" in value:
        raise ParseError(f"{what} holds a line break")
    return value


@dataclass(frozen=True)
class Message:
    """Base of every message.

    A subclass names its command once, in its class statement
    (``class Get(Message, command="GET")``); ``args`` gives the wire fields
    after the command and ``_from_wire`` reads them back. Fields are checked
    when a message is built, from the wire or by hand, so no message can
    serialise to anything but one line of what git-annex parses.
    """

    COMMAND: ClassVar[str] = ""

    def __init_subclass__(cls, command: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if command:
            if command in BY_COMMAND:
                raise TypeError(f"two messages named {command}")
            cls.COMMAND = command
            BY_COMMAND[command] = cls

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Raise ParseError unless the fields make one valid line."""

    def args(self) -> list[str]:
        return []

    def fields(self) -> list[str]:
        return [self.COMMAND, *self.args()]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        """Parse what follows the command (nullary messages take nothing)."""
        no_more(rest)
        return cls()


class _KeyMessage(Message):
    """A message whose one field is a key (the last field: it may hold spaces)."""

    key: str

    def _check(self) -> None:
        check_key(self.key)

    def args(self) -> list[str]:
        return [self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(rest)  # type: ignore[call-arg]


class _UuidsMessage(Message):
    """A message listing repository UUIDs (Haskell's ``words`` splits them)."""

    uuids: tuple[str, ...]

    def _check(self) -> None:
        for uuid in self.uuids:
            check_uuid(uuid)

    def args(self) -> list[str]:
        return list(self.uuids)

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(words(rest))  # type: ignore[call-arg]


class _CountMessage(Message):
    """A message whose one field is a non-negative number."""

    def count(self) -> int:
        raise NotImplementedError

    def _check(self) -> None:
        check_count(self.count())

    def args(self) -> list[str]:
        return [str(self.count())]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(number(rest))  # type: ignore[call-arg]


@dataclass(frozen=True)
class Auth(Message, command="AUTH"):
    uuid: str
    token: str = field(repr=False)  # never printed, never logged

    def _check(self) -> None:
        check_uuid(self.uuid)
        check_token(self.token)

    def args(self) -> list[str]:
        return [self.uuid, self.token]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(*split_word(rest))


@dataclass(frozen=True)
class AuthSuccess(Message, command="AUTH-SUCCESS"):
    uuid: str

    def _check(self) -> None:
        check_uuid(self.uuid)

    def args(self) -> list[str]:
        return [self.uuid]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(rest)


@dataclass(frozen=True)
class AuthFailure(Message, command="AUTH-FAILURE"):
    pass


@dataclass(frozen=True)
class Version(_CountMessage, command="VERSION"):
    version: int

    def count(self) -> int:
        return self.version


@dataclass(frozen=True)
class Connect(Message, command="CONNECT"):
    service: str

    SERVICES: ClassVar[tuple[str, ...]] = ("git-upload-pack", "git-receive-pack")

    def _check(self) -> None:
        if self.service not in self.SERVICES:
            raise ParseError("unknown service")

    def args(self) -> list[str]:
        return [self.service]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(rest)


@dataclass(frozen=True)
class ConnectDone(Message, command="CONNECTDONE"):
    exit_code: int  # negative for a process killed by a signal, as git-annex sends

    def args(self) -> list[str]:
        return [str(self.exit_code)]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(exit_code(rest))


@dataclass(frozen=True)
class NotifyChange(Message, command="NOTIFYCHANGE"):
    pass


@dataclass(frozen=True)
class Changed(Message, command="CHANGED"):
    refs: str

    def _check(self) -> None:
        _one_line(self.refs, "CHANGED")

    def args(self) -> list[str]:
        return [self.refs]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(rest)


@dataclass(frozen=True)
class CheckPresent(_KeyMessage, command="CHECKPRESENT"):
    key: str


@dataclass(frozen=True)
class LockContent(_KeyMessage, command="LOCKCONTENT"):
    key: str


@dataclass(frozen=True)
class UnlockContent(Message, command="UNLOCKCONTENT"):
    pass


@dataclass(frozen=True)
class Remove(_KeyMessage, command="REMOVE"):
    key: str


@dataclass(frozen=True)
class RemoveBefore(Message, command="REMOVE-BEFORE"):
    timestamp: int
    key: str

    def _check(self) -> None:
        check_count(self.timestamp)
        check_key(self.key)

    def args(self) -> list[str]:
        return [str(self.timestamp), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        ts, key = split_word(rest)
        return cls(number(ts), key)


@dataclass(frozen=True)
class GetTimestamp(Message, command="GETTIMESTAMP"):
    pass


@dataclass(frozen=True)
class Timestamp(_CountMessage, command="TIMESTAMP"):
    timestamp: int

    def count(self) -> int:
        return self.timestamp


@dataclass(frozen=True)
class Get(Message, command="GET"):
    offset: int
    af: str | None
    key: str

    def _check(self) -> None:
        check_count(self.offset)
        check_key(self.key)

    def args(self) -> list[str]:
        return [str(self.offset), escape_af(self.af), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        offset, rest = split_word(rest)
        af, key = split_word(rest)
        return cls(number(offset), unescape_af(af), key)


@dataclass(frozen=True)
class Put(Message, command="PUT"):
    af: str | None
    key: str

    def _check(self) -> None:
        check_key(self.key)

    def args(self) -> list[str]:
        return [escape_af(self.af), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        af, key = split_word(rest)
        return cls(unescape_af(af), key)


@dataclass(frozen=True)
class PutFrom(_CountMessage, command="PUT-FROM"):
    offset: int

    def count(self) -> int:
        return self.offset


@dataclass(frozen=True)
class AlreadyHave(Message, command="ALREADY-HAVE"):
    pass


@dataclass(frozen=True)
class AlreadyHavePlus(_UuidsMessage, command="ALREADY-HAVE-PLUS"):
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class Success(Message, command="SUCCESS"):
    pass


@dataclass(frozen=True)
class SuccessPlus(_UuidsMessage, command="SUCCESS-PLUS"):
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class Failure(Message, command="FAILURE"):
    pass


@dataclass(frozen=True)
class FailurePlus(_UuidsMessage, command="FAILURE-PLUS"):
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class Bypass(_UuidsMessage, command="BYPASS"):
    uuids: tuple[str, ...]


@dataclass(frozen=True)
class Data(_CountMessage, command="DATA"):
    length: int

    def count(self) -> int:
        return self.length


@dataclass(frozen=True)
class DataPresent(Message, command="DATA-PRESENT"):
    pass


@dataclass(frozen=True)
class Valid(Message, command="VALID"):
    pass


@dataclass(frozen=True)
class Invalid(Message, command="INVALID"):
    pass


@dataclass(frozen=True)
class Error(Message, command="ERROR"):
    """``ERROR text``: the text is the rest of the line.

    Error texts are often built from other programs' output, so a line
    break in one is folded into a space rather than refused: an error must
    never fail to be sent, and never become two lines.
    """

    text: str

    def __post_init__(self) -> None:
        if "\n" in self.text or self.text.endswith("\r"):
            object.__setattr__(self, "text", " ".join(self.text.splitlines()))

    def args(self) -> list[str]:
        return [self.text]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(rest)


def parse(line: bytes) -> Message:
    """Parse one line (without its ``\\n``; a trailing ``\\r`` is dropped).

    Raises ``ParseError`` for anything git-annex would not parse, and never
    any other exception, whatever the bytes.
    """
    if len(line) > MAX_LINE:
        raise ParseError("line too long")
    if line.endswith(b"\r"):
        line = line[:-1]
    text = line.decode(ENCODING, ERRORS)
    command, rest = split_word(text)
    cls = BY_COMMAND.get(command)
    if cls is None:
        raise ParseError("unknown command")
    return cls._from_wire(rest)


def serialise(message: Message) -> bytes:
    """The wire form of a message, newline included."""
    return (" ".join(message.fields()) + "\n").encode(ENCODING, ERRORS)


def redacted(message: Message) -> str:
    """A message as it may appear in a log: tokens are never shown."""
    if isinstance(message, Auth):
        return f"AUTH {message.uuid} <token>"
    text = " ".join(message.fields())
    return text if len(text) <= 200 else text[:200] + "..."
