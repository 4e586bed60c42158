"""The fields of git-annex's P2P protocol messages: keys, UUIDs, numbers,
associated files, and how a line splits into them; no I/O.

protocol/messages.py builds each message from these. Fields are split at
single whitespace characters as git-annex's Utility/SimpleProtocol does
(Haskell's ``isSpace``), and bytes are decoded with ``surrogateescape`` so
that any byte sequence round-trips unchanged.
"""

from __future__ import annotations

import re

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class ParseError(ValueError):
    """A line that is not a message: git-annex answers ``ERROR unknown command``."""


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


def number(s: str) -> int:
    if len(s) > _MAX_DIGITS or not _DECIMAL_RE.fullmatch(s):
        raise ParseError("invalid number")
    return int(s)


def split_word(s: str) -> tuple[str, str]:
    """Split at the first whitespace character, as git-annex's splitWord."""
    m = _HS_SPACE_RE.search(s)
    if m is None:
        return s, ""
    return s[: m.start()], s[m.end() :]


def no_more(s: str) -> None:
    if s:
        raise ParseError("unexpected parameter")


def check_key(key: str) -> None:
    if not is_valid_key(key):
        raise ParseError("invalid key")


def check_uuid(uuid: str) -> None:
    if not _UUID_RE.fullmatch(uuid):
        raise ParseError("invalid uuid")


def check_count(n: int) -> None:
    if n < 0:
        raise ParseError("invalid number")


def check_token(token: str) -> None:
    # An empty token is refused: a blank token must never match.
    if not _TOKEN_RE.fullmatch(token):
        raise ParseError("invalid token")


def exit_code(s: str) -> int:
    """A process's exit code (negative: killed by a signal, as git-annex sends)."""
    if len(s) > _MAX_DIGITS or not _EXIT_CODE_RE.fullmatch(s):
        raise ParseError("invalid exit code")
    return int(s)


def words(s: str) -> tuple[str, ...]:
    """``s`` split at runs of whitespace, as Haskell's ``words``."""
    return tuple(w for w in _HS_SPACE_RE.split(s) if w)
