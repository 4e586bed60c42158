"""Onion client authorization (v3): which client tors may reach the onion at all.

With ``[tor] client_auth = true`` the onion's descriptor is encrypted to a
list of x25519 public keys: a tor without one of the private keys cannot
decrypt it, so it learns no introduction point and cannot even ask for a
connection. ``torbridge client add NAME`` makes a key pair, keeps only the
public half in ``state_dir/onion_clients.json`` and prints the private half
once, in the two forms a client's tor takes. A key authorizes a client
MACHINE's tor; tokens still decide who may do what.

Every authorized client adds a line to the descriptor, and tor refuses a
descriptor over 50 KB: ``max_clients`` is how many fit (``ClientLimit``).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

FILE_NAME = "onion_clients.json"
LOCK_NAME = "onion_clients.lock"
FORMAT_VERSION = 1
NOBODY_FILE = "torbridge-nobody.auth"  # torrc mode, no client yet
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # also a safe file name, and tor's ClientName
_BASE32_KEY_RE = re.compile(r"[A-Z2-7]{52}")  # 32 bytes, unpadded

# --- the descriptor's size (rend-spec-v3 "HS descriptor format") ----------------
# tor refuses descriptors over HSV3MaxDescriptorSize (50000 bytes by default).
MAX_DESCRIPTOR = 50_000
# The first encryption layer is padded to a multiple of 10000 bytes
# (HS_DESC_SUPERENC_PLAINTEXT_PAD_MULTIPLE) and lists the clients in groups
# of 16 (HS_DESC_AUTH_CLIENT_MULTIPLE; fake ones fill a group).
_PAD_MULTIPLE = 10_000
_CLIENT_GROUP = 16
# "auth-client " + client-id (8 bytes) + iv (16) + encrypted cookie (16), base64.
_AUTH_CLIENT_LINE = len("auth-client ") + 11 + 1 + 22 + 1 + 22 + 1
_FIRST_LAYER_HEAD = 200  # desc-auth-type, desc-auth-ephemeral-key, "encrypted", armour
_OUTER = 2_000  # the outer document: lifetime, signing certificate, revision, signature
# The inner layer: per introduction point (link specifiers, onion-key, auth-key
# and enc-key certificates) and the rest (create2-formats, pow-params, ...);
# measured ~750 and ~150, rounded up.
_PER_INTRO_POINT = 1_000
_INNER_HEAD = 400
DEFAULT_INTRO_POINTS = 3  # tor's HiddenServiceNumIntroductionPoints default


class ClientAuthError(Exception):
    """One line for the operator."""


class ClientLimit(ClientAuthError):
    pass


def _base64_length(n: int, wrapped: bool = True) -> int:
    """Bytes of base64 for n bytes, in tor's 64-column lines when ``wrapped``."""
    chars = 4 * math.ceil(n / 3)
    return chars + (math.ceil(chars / 64) if wrapped else 0)


def descriptor_size(clients: int, intro_points: int = DEFAULT_INTRO_POINTS) -> int:
    """An upper estimate of the descriptor's size with ``clients`` authorized."""
    inner = _INNER_HEAD + _PER_INTRO_POINT * intro_points
    groups = max(1, math.ceil(clients / _CLIENT_GROUP))
    first = (
        _FIRST_LAYER_HEAD
        + _AUTH_CLIENT_LINE * _CLIENT_GROUP * groups
        + _base64_length(16 + inner + 32)  # salt, the encrypted inner layer, MAC
    )
    padded = _PAD_MULTIPLE * math.ceil(first / _PAD_MULTIPLE)
    return _OUTER + _base64_length(16 + padded + 32)


def max_clients(intro_points: int = DEFAULT_INTRO_POINTS) -> int:
    """How many clients fit in one descriptor (a multiple of 16)."""
    n = 0
    while descriptor_size(n + _CLIENT_GROUP, intro_points) <= MAX_DESCRIPTOR:
        n += _CLIENT_GROUP
    return n


# --- keys and what a client's tor takes ---------------------------------------------


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # 32 bytes, x25519
    public: bytes

    @classmethod
    def new(cls) -> KeyPair:
        try:
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
            from cryptography.hazmat.primitives.serialization import (
                Encoding,
                NoEncryption,
                PrivateFormat,
                PublicFormat,
            )
        except ImportError:
            raise ClientAuthError(
                "client authorization needs the Python package `cryptography`"
                " (Debian: apt-get install python3-cryptography)"
            ) from None
        key = X25519PrivateKey.generate()
        private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(private, public)

    @property
    def public_base32(self) -> str:
        return _b32(self.public)


def auth_private_line(onion: str, private: bytes) -> str:
    """The line of ``<ClientOnionAuthDir>/NAME.auth_private`` on the client."""
    return f"{onion.removesuffix('.onion')}:descriptor:x25519:{_b32(private)}"


def control_command(onion: str, private: bytes, name: str) -> str:
    """The same credential through the client tor's control port."""
    blob = base64.b64encode(private).decode()
    return f"ONION_CLIENT_AUTH_ADD {onion.removesuffix('.onion')} x25519:{blob} ClientName={name}"


def authorized_clients_line(public_base32: str) -> str:
    """The line of ``<HiddenServiceDir>/authorized_clients/NAME.auth`` (torrc mode)."""
    return f"descriptor:x25519:{public_base32}"


def dummy_public_key() -> str:
    """A key nobody holds the private half of: the descriptor with no client yet."""
    return KeyPair.new().public_base32


# --- the store ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizedClient:
    name: str
    public: str  # base32, as ClientAuthV3= and authorized_clients/ files take it
    created: str  # ISO 8601 UTC


class ClientStore:
    """``state_dir/onion_clients.json``: names and public keys, nothing secret."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / FILE_NAME

    def list(self) -> builtins.list[AuthorizedClient]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise ClientAuthError(f"cannot read {self.path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ClientAuthError(f"{self.path}: not a torbridge client file (version 1)")
        clients = []
        for entry in raw.get("clients", []):
            try:
                client = AuthorizedClient(entry["name"], entry["public"], entry["created"])
            except (KeyError, TypeError):
                raise ClientAuthError(f"{self.path}: a client entry is malformed") from None
            if not _NAME_RE.fullmatch(client.name) or not _BASE32_KEY_RE.fullmatch(client.public):
                raise ClientAuthError(f"{self.path}: client {client.name!r} is malformed")
            clients.append(client)
        return clients

    def public_keys(self) -> builtins.list[str]:
        return [c.public for c in self.list()]

    def add(self, name: str, public: str, limit: int) -> AuthorizedClient:
        if not _NAME_RE.fullmatch(name):
            raise ClientAuthError(
                f"{name!r} is not a valid client name (1 to 64 of A-Z a-z 0-9 . _ -)"
            )
        with self._locked():
            clients = self.list()
            if any(c.name == name for c in clients):
                raise ClientAuthError(f"client {name!r} exists already; revoke it first")
            if len(clients) >= limit:
                raise ClientLimit(
                    f"cannot authorize client {name!r}: {limit} clients fit in the onion's"
                    f" descriptor (tor's limit is {MAX_DESCRIPTOR} bytes) and {len(clients)}"
                    " are authorized; revoke one first"
                )
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            client = AuthorizedClient(name, public, stamp)
            self._write([*clients, client])
        return client

    def revoke(self, name: str) -> None:
        with self._locked():
            clients = self.list()
            kept = [c for c in clients if c.name != name]
            if len(kept) == len(clients):
                raise ClientAuthError(f"no client named {name!r}")
            self._write(kept)

    def _write(self, clients: builtins.list[AuthorizedClient]) -> None:
        doc = {
            "version": FORMAT_VERSION,
            "clients": [
                {"name": c.name, "public": c.public, "created": c.created} for c in clients
            ],
        }
        tmp = self.path.with_name(f".{FILE_NAME}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            lock = self.state_dir / LOCK_NAME
            raise ClientAuthError(f"cannot lock {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# --- torrc mode: tor's own authorized_clients/ directory --------------------------


def sync_authorized_clients(
    hidden_service_dir: Path,
    clients: builtins.list[AuthorizedClient],
) -> bool:
    """Make ``<hidden_service_dir>/authorized_clients/`` hold exactly ``clients``
    (``NAME.auth`` files); tor reads them when it is reloaded. True when a
    file was written or removed (tor must be reloaded). PermissionError when
    torbridge may not write there."""
    directory = hidden_service_dir / "authorized_clients"
    directory.mkdir(mode=0o700, exist_ok=True)
    wanted = {f"{c.name}.auth": authorized_clients_line(c.public) for c in clients}
    have = {p.name: p.read_text().strip() for p in directory.glob("*.auth")}
    if not wanted:
        # An empty directory turns client authorization off in tor: nobody it is.
        # (Any key nobody holds; one already there is kept.)
        nobody = have.get(NOBODY_FILE, "")
        if not nobody.startswith("descriptor:x25519:"):
            nobody = authorized_clients_line(dummy_public_key())
        wanted[NOBODY_FILE] = nobody
    changed = False
    for name, line in wanted.items():
        if have.get(name) == line:
            continue
        tmp = directory / f".{name}.tmp"
        tmp.write_text(line + "\n")
        os.replace(tmp, directory / name)
        changed = True
    for name in have.keys() - wanted.keys():
        (directory / name).unlink()
        changed = True
    return changed
