"""The token store: which secrets may AUTH, with what access, on which endpoints.

Tokens are kept hashed at rest in ``STATE/tokens.json``; a token is shown once,
when ``add`` makes it, and can never be recovered from the file. The daemon
keeps one ``TokenStore`` and calls ``check`` per AUTH; ``check`` notices when
another process (``torbridge token revoke``) rewrote the file, so a revocation
applies to every new session at once.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from torbridge.protocol import gitaccess
from torbridge.protocol.permissions import GIT_LABELS, MODES, GitAccess, Mode

FILE_NAME = "tokens.json"
LOCK_NAME = "tokens.lock"
FORMAT_VERSION = 1

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+")  # what git-annex accepts as an AuthToken
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ -"

log = logging.getLogger("torbridge.tokens")


class TokenError(Exception):
    """A one-line message for the user (never contains a token)."""


@dataclass(frozen=True)
class TokenInfo:
    """What a token grants. Deliberately holds neither the token nor its hash."""

    name: str
    mode: Mode
    created: str  # ISO 8601 UTC, e.g. 2025-01-31T12:00:00Z
    endpoints: tuple[str, ...] | None  # None = every exposed endpoint
    # Git access given explicitly; None = the default, which follows the mode
    # and the endpoints (protocol/gitaccess.py). Stores from before this
    # field have none, and get the default.
    git: GitAccess | None = None

    def git_access(self, own_endpoints: Collection[str]) -> GitAccess:
        """What this token may do to the proxy's git repository, given the
        endpoints (``own_endpoints``) that serve that repository."""
        return gitaccess.effective(self.mode, self.git, self.endpoints, own_endpoints)


@dataclass(frozen=True)
class _Entry:
    info: TokenInfo
    sha256: str  # lowercase hex


# The identity of one version of the file. os.replace always installs a new
# inode, and mtime/size catch in-place edits; ctime and dev are cheap extras
# that narrow the window where a recycled inode number could fool us.
_Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash(token: str) -> str:
    # git-annex compares tokens case-insensitively, so hash the lowercased form.
    # Tokens are 128 hex digits (512 bits of entropy): nobody can brute-force
    # that, so a fast unsalted hash is enough; a slow KDF would only cost us
    # time on every AUTH.
    return hashlib.sha256(token.lower().encode("ascii")).hexdigest()


def _is_valid_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


class TokenStore:
    """The tokens of one state directory (``state_dir / "tokens.json"``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE_NAME
        # The cache used by check(): the file's signature (None = no file) and
        # its entries (None = the file is corrupt at that signature).
        self._cached_sig: _Signature | None = None
        self._cached: dict[str, _Entry] | None = None
        self._cache_valid = False

    def __repr__(self) -> str:
        return f"TokenStore({str(self.state_dir)!r})"

    # --- public API ----------------------------------------------------------

    def add(
        self,
        name: str,
        mode: Mode | str = Mode.READ_WRITE,
        endpoints: Sequence[str] | None = None,
        git: GitAccess | None = None,
    ) -> str:
        """Make a token named *name*; returns the secret, which is stored only hashed."""
        if not _is_valid_name(name):
            raise TokenError(f"invalid token name: use {_NAME_RULE}")
        try:
            mode = Mode.parse(mode)
        except ValueError as e:
            raise TokenError(str(e)) from None
        if git is not None and not isinstance(git, GitAccess):
            raise TokenError(f"unknown git access {git!r}: use one of {', '.join(GIT_LABELS)}")
        eps = _normalise_endpoints(endpoints)
        # The same format git-annex's own `p2p --gen-addresses` tokens have.
        token = secrets.token_hex(64)
        info = TokenInfo(
            name=name,
            mode=mode,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            endpoints=eps,
            git=git,
        )
        self._ensure_state_dir()
        with self._locked():
            entries = self._load_or_raise()
            if name in entries:
                raise TokenError(f"a token named {name!r} already exists")
            entries[name] = _Entry(info=info, sha256=_hash(token))
            self._write(entries)
        return token

    def revoke(self, name: str) -> None:
        """Remove the token *name*; running daemons refuse it from the next AUTH on."""
        if not _is_valid_name(name):
            # Don't echo it: someone may have pasted the token itself here.
            raise TokenError(f"invalid token name: use {_NAME_RULE}")
        if not self.state_dir.is_dir():
            raise TokenError(f"no token named {name!r}")
        with self._locked():
            entries = self._load_or_raise()
            if name not in entries:
                raise TokenError(f"no token named {name!r}")
            del entries[name]
            self._write(entries)

    def check(self, presented: str) -> TokenInfo | None:
        """The TokenInfo of the token *presented* in an AUTH, or None to refuse.

        Does blocking I/O only when the file changed (a stat otherwise); never
        raises for a bad file: it logs and refuses.
        """
        entries = self._current_entries()
        well_formed = isinstance(presented, str) and _TOKEN_RE.fullmatch(presented) is not None
        # Hash something even for a malformed token so that refusing it takes
        # as long as refusing a well-formed wrong one.
        digest = _hash(presented if well_formed else "-")
        found: TokenInfo | None = None
        # Compare with every entry, never stopping at a match: the time taken
        # must not reveal which entry (if any) matched.
        for entry in entries.values():
            hit = hmac.compare_digest(entry.sha256, digest)
            if hit & well_formed:
                found = entry.info
        return found

    def export(self) -> bytes:
        """The store as a file without secrets (hashes, names, access), for
        other hosts of a balanced service (docs/scale-out.md)."""
        return _serialise(self._load_or_raise())

    def import_(self, data: bytes) -> int:
        """Replace the store with an exported one (every token of this host
        not in it is revoked); the number of tokens. A file that does not
        parse changes nothing."""
        try:
            entries = _parse(data)
        except ValueError as e:
            raise TokenError(f"not a token file (torbridge token export makes one): {e}") from None
        self._ensure_state_dir()
        with self._locked():
            self._write(entries)
        return len(entries)

    def list(self) -> builtins.list[TokenInfo]:
        """Every token's TokenInfo, sorted by name."""
        # No lock needed: writers replace the file atomically.
        entries = self._load_or_raise()
        return [entries[name].info for name in sorted(entries)]

    # --- reading -------------------------------------------------------------

    def _read(self) -> tuple[_Signature | None, dict[str, _Entry]]:
        """The file's signature and entries ({} and None if missing).

        Raises OSError, or ValueError for a file that is not a valid token file.
        The signature comes from the open descriptor, so it describes exactly
        the bytes read even if the file is replaced meanwhile.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, {}
        with os.fdopen(fd, "rb") as f:
            sig = _signature(os.fstat(f.fileno()))
            data = f.read()
        return sig, _parse(data)

    def _load_or_raise(self) -> dict[str, _Entry]:
        try:
            return self._read()[1]
        except ValueError as e:
            raise TokenError(f"token file {self.path} is not valid: {e}") from None
        except OSError as e:
            raise TokenError(f"cannot read token file {self.path}: {e.strerror}") from None

    def _current_entries(self) -> dict[str, _Entry]:
        """The entries for check(), re-read only when the file changed on disk."""
        try:
            sig: _Signature | None = _signature(os.stat(self.path))
        except FileNotFoundError:
            sig = None
        except OSError as e:
            log.error("cannot stat token file %s: %s; refusing every token", self.path, e.strerror)
            return {}
        if self._cache_valid and sig == self._cached_sig:
            return self._cached if self._cached is not None else {}
        try:
            sig, entries = self._read()
        except ValueError as e:
            # Cache the verdict so that this logs once per version of the
            # file, not once per AUTH; refusing beats crashing the daemon.
            log.error("token file %s is not valid: %s; refusing every token", self.path, e)
            self._cached_sig, self._cached, self._cache_valid = sig, None, True
            return {}
        except OSError as e:
            # Transient (e.g. permissions being fixed): don't cache, retry next time.
            log.error("cannot read token file %s: %s; refusing every token", self.path, e.strerror)
            self._cache_valid = False
            return {}
        self._cached_sig, self._cached, self._cache_valid = sig, entries, True
        return entries

    # --- writing -------------------------------------------------------------

    def _ensure_state_dir(self) -> None:
        try:
            self.state_dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.state_dir, 0o700)
        except FileExistsError:
            return  # the operator's directory: leave its permissions alone
        except OSError as e:
            raise TokenError(
                f"cannot create state directory {self.state_dir}: {e.strerror}"
            ) from None
        # mkdir's mode is filtered by the umask; make sure it is exactly 0700.
        os.chmod(self.state_dir, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write between processes (two CLI runs at once)."""
        try:
            fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise TokenError(
                f"cannot open lock file {self.state_dir / LOCK_NAME}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _write(self, entries: Mapping[str, _Entry]) -> None:
        """Replace the file atomically: readers see the old or the new version."""
        data = _serialise(entries)
        tmp = self.state_dir / f".{FILE_NAME}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o600)  # the umask may have cleared bits only
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.state_dir)
        except OSError as e:
            raise TokenError(f"cannot write token file {self.path}: {e.strerror}") from None
        # Our own write changed the file: make check() re-read it.
        self._cache_valid = False


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _normalise_endpoints(endpoints: Sequence[str] | None) -> tuple[str, ...] | None:
    if endpoints is None:
        return None
    # A bare string is a Sequence[str] too, and would become one endpoint per letter.
    if isinstance(endpoints, str):
        raise TokenError("endpoints must be a list of endpoint names, not a string")
    names = tuple(endpoints)
    if not names:
        raise TokenError("a token needs at least one endpoint (or none given, for all)")
    for ep in names:
        if not _is_valid_name(ep):
            raise TokenError(f"invalid endpoint name {ep!r}: use {_NAME_RULE}")
    return tuple(sorted(set(names)))


# --- the file format -------------------------------------------------------------


def _serialise_entry(e: _Entry) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "sha256": e.sha256,
        "mode": e.info.mode.value,
        "created": e.info.created,
        "endpoints": None if e.info.endpoints is None else list(e.info.endpoints),
    }
    if e.info.git is not None:  # absent = the default, as in stores written before it
        raw["git"] = e.info.git.label
    return raw


def _serialise(entries: Mapping[str, _Entry]) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "tokens": {name: _serialise_entry(e) for name, e in sorted(entries.items())},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _parse(data: bytes) -> dict[str, _Entry]:
    """The entries of a token file; ValueError (one line) if it is not one."""
    try:
        doc: Any = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r}, expected {FORMAT_VERSION}")
    tokens = doc.get("tokens")
    if not isinstance(tokens, dict):
        raise ValueError('"tokens" is not an object')
    entries: dict[str, _Entry] = {}
    for name, raw in tokens.items():
        if not _is_valid_name(name):
            raise ValueError(f"bad token name {name[:64]!r}")
        if not isinstance(raw, dict):
            raise ValueError(f"token {name!r} is not an object")
        sha = raw.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise ValueError(f'token {name!r}: "sha256" is not 64 lowercase hex digits')
        mode = raw.get("mode")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f'token {name!r}: unknown "mode" {mode!r}')
        created = raw.get("created")
        if not isinstance(created, str):
            raise ValueError(f'token {name!r}: "created" is not a string')
        eps = raw.get("endpoints")
        if eps is not None and not (
            isinstance(eps, list) and all(_is_valid_name(ep) for ep in eps)
        ):
            raise ValueError(f'token {name!r}: "endpoints" is neither null nor a list of names')
        git = raw.get("git")
        if git is not None and git not in GIT_LABELS:
            raise ValueError(f'token {name!r}: unknown "git" {git!r}')
        info = TokenInfo(
            name=name,
            mode=Mode(mode),
            created=created,
            endpoints=None if eps is None else tuple(eps),
            git=None if git is None else GitAccess.parse(git),
        )
        entries[name] = _Entry(info=info, sha256=sha)
    return entries
