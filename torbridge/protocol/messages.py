"""Messages of git-annex's P2P protocol: parsing and serialising, no I/O.

One line of the wire is one message. Fields are split at single spaces, the
last field takes the rest of the line (so a key may hold spaces), exactly as
git-annex's Utility/SimpleProtocol does. Bytes are decoded with
``surrogateescape`` so that any byte sequence round-trips unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_LINE = 32768
"""Longest line git-annex accepts, in bytes, newline excluded."""

MAX_VERSION = 4
"""Highest protocol version torbridge (and git-annex 10.20261026) speaks."""

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


def _key(s: str) -> str:
    if not is_valid_key(s):
        raise ParseError("invalid key")
    return s


def _uuid(s: str) -> str:
    if not _UUID_RE.fullmatch(s):
        raise ParseError("invalid uuid")
    return s


def _uuids(s: str) -> tuple[str, ...]:
    """Haskell's ``words``: split at runs of (Haskell) whitespace."""
    return tuple(_uuid(u) for u in _HS_SPACE_RE.split(s) if u)


def _number(s: str) -> int:
    if len(s) > _MAX_DIGITS or not _DECIMAL_RE.fullmatch(s):
        raise ParseError("invalid number")
    return int(s)


def _exit_code(s: str) -> int:
    # git-annex sends a negative code for a process killed by a signal.
    if len(s) > _MAX_DIGITS or not _EXIT_CODE_RE.fullmatch(s):
        raise ParseError("invalid exit code")
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


@dataclass(frozen=True)
class Message:
    """Base of every message; ``fields()`` gives the wire fields."""

    def fields(self) -> list[str]:
        return [_COMMAND_OF[type(self)]]


@dataclass(frozen=True)
class Auth(Message):
    uuid: str
    token: str = field(repr=False)  # never printed, never logged

    def fields(self) -> list[str]:
        return ["AUTH", self.uuid, self.token]


@dataclass(frozen=True)
class AuthSuccess(Message):
    uuid: str

    def fields(self) -> list[str]:
        return ["AUTH-SUCCESS", self.uuid]


@dataclass(frozen=True)
class AuthFailure(Message):
    pass


@dataclass(frozen=True)
class Version(Message):
    version: int

    def fields(self) -> list[str]:
        return ["VERSION", str(self.version)]


@dataclass(frozen=True)
class Connect(Message):
    service: str  # "git-upload-pack" | "git-receive-pack"

    def fields(self) -> list[str]:
        return ["CONNECT", self.service]


@dataclass(frozen=True)
class ConnectDone(Message):
    exit_code: int

    def fields(self) -> list[str]:
        return ["CONNECTDONE", str(self.exit_code)]


@dataclass(frozen=True)
class NotifyChange(Message):
    pass


@dataclass(frozen=True)
class Changed(Message):
    refs: str

    def fields(self) -> list[str]:
        return ["CHANGED", self.refs]


@dataclass(frozen=True)
class CheckPresent(Message):
    key: str

    def fields(self) -> list[str]:
        return ["CHECKPRESENT", self.key]


@dataclass(frozen=True)
class LockContent(Message):
    key: str

    def fields(self) -> list[str]:
        return ["LOCKCONTENT", self.key]


@dataclass(frozen=True)
class UnlockContent(Message):
    pass


@dataclass(frozen=True)
class Remove(Message):
    key: str

    def fields(self) -> list[str]:
        return ["REMOVE", self.key]


@dataclass(frozen=True)
class RemoveBefore(Message):
    timestamp: int
    key: str

    def fields(self) -> list[str]:
        return ["REMOVE-BEFORE", str(self.timestamp), self.key]


@dataclass(frozen=True)
class GetTimestamp(Message):
    pass


@dataclass(frozen=True)
class Timestamp(Message):
    timestamp: int

    def fields(self) -> list[str]:
        return ["TIMESTAMP", str(self.timestamp)]


@dataclass(frozen=True)
class Get(Message):
    offset: int
    af: str | None
    key: str

    def fields(self) -> list[str]:
        return ["GET", str(self.offset), escape_af(self.af), self.key]


@dataclass(frozen=True)
class Put(Message):
    af: str | None
    key: str

    def fields(self) -> list[str]:
        return ["PUT", escape_af(self.af), self.key]


@dataclass(frozen=True)
class PutFrom(Message):
    offset: int

    def fields(self) -> list[str]:
        return ["PUT-FROM", str(self.offset)]


@dataclass(frozen=True)
class AlreadyHave(Message):
    pass


@dataclass(frozen=True)
class AlreadyHavePlus(Message):
    uuids: tuple[str, ...]

    def fields(self) -> list[str]:
        return ["ALREADY-HAVE-PLUS", *self.uuids]


@dataclass(frozen=True)
class Success(Message):
    pass


@dataclass(frozen=True)
class SuccessPlus(Message):
    uuids: tuple[str, ...]

    def fields(self) -> list[str]:
        return ["SUCCESS-PLUS", *self.uuids]


@dataclass(frozen=True)
class Failure(Message):
    pass


@dataclass(frozen=True)
class FailurePlus(Message):
    uuids: tuple[str, ...]

    def fields(self) -> list[str]:
        return ["FAILURE-PLUS", *self.uuids]


@dataclass(frozen=True)
class Bypass(Message):
    uuids: tuple[str, ...]

    def fields(self) -> list[str]:
        return ["BYPASS", *self.uuids]


@dataclass(frozen=True)
class Data(Message):
    length: int

    def fields(self) -> list[str]:
        return ["DATA", str(self.length)]


@dataclass(frozen=True)
class DataPresent(Message):
    pass


@dataclass(frozen=True)
class Valid(Message):
    pass


@dataclass(frozen=True)
class Invalid(Message):
    pass


@dataclass(frozen=True)
class Error(Message):
    text: str

    def fields(self) -> list[str]:
        return ["ERROR", self.text]


def _parse_auth(rest: str) -> Message:
    uuid, token = _split(rest)
    # An empty token is refused here already: a blank token must never match.
    if not _TOKEN_RE.fullmatch(token):
        raise ParseError("invalid token")
    return Auth(_uuid(uuid), token)


def _parse_connect(rest: str) -> Message:
    if rest not in ("git-upload-pack", "git-receive-pack"):
        raise ParseError("unknown service")
    return Connect(rest)


def _parse_get(rest: str) -> Message:
    offset, rest = _split(rest)
    af, key = _split(rest)
    return Get(_number(offset), unescape_af(af), _key(key))


def _parse_put(rest: str) -> Message:
    af, key = _split(rest)
    return Put(unescape_af(af), _key(key))


def _parse_remove_before(rest: str) -> Message:
    ts, key = _split(rest)
    return RemoveBefore(_number(ts), _key(key))


_PARSERS: dict[str, object] = {
    "AUTH": _parse_auth,
    "AUTH-SUCCESS": lambda r: AuthSuccess(_uuid(r)),
    "VERSION": lambda r: Version(_number(r)),
    "CONNECT": _parse_connect,
    "CONNECTDONE": lambda r: ConnectDone(_exit_code(r)),
    "CHANGED": lambda r: Changed(r),
    "CHECKPRESENT": lambda r: CheckPresent(_key(r)),
    "LOCKCONTENT": lambda r: LockContent(_key(r)),
    "REMOVE": lambda r: Remove(_key(r)),
    "REMOVE-BEFORE": _parse_remove_before,
    "TIMESTAMP": lambda r: Timestamp(_number(r)),
    "GET": _parse_get,
    "PUT": _parse_put,
    "PUT-FROM": lambda r: PutFrom(_number(r)),
    "ALREADY-HAVE-PLUS": lambda r: AlreadyHavePlus(_uuids(r)),
    "SUCCESS-PLUS": lambda r: SuccessPlus(_uuids(r)),
    "FAILURE-PLUS": lambda r: FailurePlus(_uuids(r)),
    "BYPASS": lambda r: Bypass(_uuids(r)),
    "DATA": lambda r: Data(_number(r)),
    "ERROR": lambda r: Error(r),
}

_NULLARY: dict[str, type[Message]] = {
    "AUTH-FAILURE": AuthFailure,
    "NOTIFYCHANGE": NotifyChange,
    "UNLOCKCONTENT": UnlockContent,
    "GETTIMESTAMP": GetTimestamp,
    "ALREADY-HAVE": AlreadyHave,
    "SUCCESS": Success,
    "FAILURE": Failure,
    "DATA-PRESENT": DataPresent,
    "VALID": Valid,
    "INVALID": Invalid,
}

_COMMAND_OF: dict[type[Message], str] = {cls: name for name, cls in _NULLARY.items()}


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
    nullary = _NULLARY.get(command)
    if nullary is not None:
        _none(rest)
        return nullary()
    parser = _PARSERS.get(command)
    if parser is None:
        raise ParseError("unknown command")
    result = parser(rest)  # type: ignore[operator]
    assert isinstance(result, Message)
    return result


def serialise(message: Message) -> bytes:
    """The wire form of a message, newline included."""
    return (" ".join(message.fields()) + "\n").encode(ENCODING, ERRORS)


def redacted(message: Message) -> str:
    """A message as it may appear in a log: tokens are never shown."""
    if isinstance(message, Auth):
        return f"AUTH {message.uuid} <token>"
    text = " ".join(message.fields())
    return text if len(text) <= 200 else text[:200] + "..."
