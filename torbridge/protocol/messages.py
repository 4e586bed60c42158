"""Messages of git-annex's P2P protocol: parsing and serialising, no I/O.

One line of the wire is one message. Fields are split at single spaces, the
last field takes the rest of the line (so a key may hold spaces), exactly as
git-annex's Utility/SimpleProtocol does. Bytes are decoded with
``surrogateescape`` so that any byte sequence round-trips unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

# What each version supports is protocol/versions.py; the name stays here too.
from torbridge.protocol.versions import MAX_VERSION as MAX_VERSION

MAX_LINE = 32768
"""Longest line git-annex accepts, in bytes, newline excluded."""

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class ParseError(ValueError):
    """A line that is not a message: git-annex answers ``ERROR unknown command``."""


# --- field types -------------------------------------------------------------

# Numbers are ASCII digits only (attoparsec's decimal, Haskell's reads): the
# Unicode digits that ``\d`` and ``int()`` accept are not numbers on the wire.
# More digits than Python's int() converts by default are refused outright.
_MAX_DIGITS = 4000
_KEY_RE = re.compile(
    r"(?P<backend>[^-]+)"
    r"(?:-s(?P<size>[0-9]+))?"
    r"(?:-m(?P<mtime>[0-9]+))?"
    r"(?:-S(?P<chunksize>[0-9]+))?"
    r"(?:-C(?P<chunknum>[0-9]+))?"
    r"--(?P<name>.+)",
    re.DOTALL,
)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Haskell's isControl (category Cc): C0, DEL and the C1 controls.
_HS_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Haskell's isSpace, which git-annex's splitWord and words use: narrower than
# Python's str.isspace (no \x1c-\x1f, \x85, \u2028, \u2029).
_HS_SPACES = " \t\n\v\f\r\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
_HS_SPACE_RE = re.compile(f"[{_HS_SPACES}]")
_UUID_RE = re.compile(r"[^\s\x00-\x1f\x7f]+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+")
_DECIMAL_RE = re.compile(r"[0-9]+")
_EXIT_CODE_RE = re.compile(r"-?[0-9]+")
_EXTENSION_MAX = 64  # git-annex's validKeyName bound on a key's extension


def is_valid_key(key: str) -> bool:
    """True for a key git-annex would parse, minus the strange corners.

    Stricter than git-annex: no control characters and a non-empty name, so a
    key can never smuggle a line break or a NUL into a log or an argv.
    """
    if _CONTROL_RE.search(key):
        return False
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return False
    if any(len(m.group(g) or "") > _MAX_DIGITS for g in ("size", "mtime", "chunksize", "chunknum")):
        return False  # int() would refuse them
    backend, name = m.group("backend"), m.group("name")
    # GITBUNDLE is the one known variety ending in E that has no extension.
    if backend.endswith("E") and backend != "GITBUNDLE":
        dot = name.find(".")
        if dot >= 0 and len(name[dot:].encode(ENCODING, ERRORS)) > _EXTENSION_MAX:
            return False
    return True


def key_size(key: str) -> int | None:
    """The ``-sSIZE`` field of a valid key, if it has one."""
    m = _KEY_RE.fullmatch(key)
    if m is None or m.group("size") is None:
        return None
    return int(m.group("size"))


def escape_af(af: str | None) -> str:
    """Serialise an associated file: ``%`` -> ``%%``, any whitespace -> ``%``.

    Whitespace is Haskell's ``isSpace``: exactly what the receiver splits at.
    """
    if not af:
        return ""
    out = []
    for c in af:
        if c == "%":
            out.append("%%")
        elif _HS_SPACE_RE.match(c):
            out.append("%")
        else:
            out.append(c)
    return "".join(out)


def unescape_af(s: str) -> str | None:
    """Deserialise an associated file as git-annex does.

    ``%%`` -> ``%``, a lone ``%`` -> ``_``, control characters -> ``_``.
    An absolute path is not an associated file: ``ParseError``.
    """
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            if s.startswith("%%", i):
                out.append("%")
                i += 2
                continue
            out.append("_")
        elif _HS_CONTROL_RE.match(c):
            out.append("_")
        else:
            out.append(c)
        i += 1
    af = "".join(out)
    if not af:
        return None
    if af.startswith("/"):
        raise ParseError("absolute associated file")
    return af


def _number(s: str) -> int:
    if len(s) > _MAX_DIGITS or not _DECIMAL_RE.fullmatch(s):
        raise ParseError("invalid number")
    return int(s)


def _split(s: str) -> tuple[str, str]:
    """Split at the first whitespace character, as git-annex's splitWord."""
    m = _HS_SPACE_RE.search(s)
    if m is None:
        return s, ""
    return s[: m.start()], s[m.end() :]


def _none(s: str) -> None:
    if s:
        raise ParseError("unexpected parameter")


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
        _none(rest)
        return cls()


def _check_key(key: str) -> None:
    if not is_valid_key(key):
        raise ParseError("invalid key")


def _check_uuid(uuid: str) -> None:
    if not _UUID_RE.fullmatch(uuid):
        raise ParseError("invalid uuid")


def _check_count(n: int) -> None:
    if n < 0:
        raise ParseError("invalid number")


class _KeyMessage(Message):
    """A message whose one field is a key (the last field: it may hold spaces)."""

    key: str

    def _check(self) -> None:
        _check_key(self.key)

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
            _check_uuid(uuid)

    def args(self) -> list[str]:
        return list(self.uuids)

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(tuple(u for u in _HS_SPACE_RE.split(rest) if u))  # type: ignore[call-arg]


class _CountMessage(Message):
    """A message whose one field is a non-negative number."""

    def count(self) -> int:
        raise NotImplementedError

    def _check(self) -> None:
        _check_count(self.count())

    def args(self) -> list[str]:
        return [str(self.count())]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(_number(rest))  # type: ignore[call-arg]


@dataclass(frozen=True)
class Auth(Message, command="AUTH"):
    uuid: str
    token: str = field(repr=False)  # never printed, never logged

    def _check(self) -> None:
        _check_uuid(self.uuid)
        # An empty token is refused: a blank token must never match.
        if not _TOKEN_RE.fullmatch(self.token):
            raise ParseError("invalid token")

    def args(self) -> list[str]:
        return [self.uuid, self.token]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        return cls(*_split(rest))


@dataclass(frozen=True)
class AuthSuccess(Message, command="AUTH-SUCCESS"):
    uuid: str

    def _check(self) -> None:
        _check_uuid(self.uuid)

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
        if len(rest) > _MAX_DIGITS or not _EXIT_CODE_RE.fullmatch(rest):
            raise ParseError("invalid exit code")
        return cls(int(rest))


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
        _check_count(self.timestamp)
        _check_key(self.key)

    def args(self) -> list[str]:
        return [str(self.timestamp), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        ts, key = _split(rest)
        return cls(_number(ts), key)


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
        _check_count(self.offset)
        _check_key(self.key)

    def args(self) -> list[str]:
        return [str(self.offset), escape_af(self.af), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        offset, rest = _split(rest)
        af, key = _split(rest)
        return cls(_number(offset), unescape_af(af), key)


@dataclass(frozen=True)
class Put(Message, command="PUT"):
    af: str | None
    key: str

    def _check(self) -> None:
        _check_key(self.key)

    def args(self) -> list[str]:
        return [escape_af(self.af), self.key]

    @classmethod
    def _from_wire(cls, rest: str) -> Message:
        af, key = _split(rest)
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
    command, rest = _split(text)
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
