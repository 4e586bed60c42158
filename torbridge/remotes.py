"""The proxy's remotes, read from its git config the way git-annex reads them.

Only remotes the operator marked with ``remote.NAME.annex-proxy=true``
(git-annex's own switch) can be exposed: a UUID merely listed in the
git-annex branch grants nothing. Names, addresses and tokens are validated
here, before anything of them reaches a subprocess or a socket.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_REMOTE_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_ONION = re.compile(r"[a-z2-7]{16,56}\.onion")
_NET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_TOKEN = re.compile(r"[A-Za-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RemoteError(Exception):
    """A remote that cannot be exposed; the text says why and what to do."""


@dataclass(frozen=True)
class TorAddress:
    onion: str
    port: int

    def __str__(self) -> str:
        return f"tor-annex::{self.onion}:{self.port}"

    @property
    def creds_name(self) -> str:
        # One token per onion, whatever the port, as git-annex keeps them.
        return creds_escape(self.onion)


@dataclass(frozen=True)
class NetAddress:
    net: str
    address: str

    def __str__(self) -> str:
        return f"p2p-annex::{self.net}:{self.address}"

    @property
    def creds_name(self) -> str:
        return creds_escape(f"{self.net}:{self.address}")


P2PAddress = TorAddress | NetAddress


@dataclass(frozen=True)
class Remote:
    name: str
    url: str | None = None
    uuid: str | None = None
    proxy: bool = False
    settings: dict[str, str] = field(default_factory=dict)


def creds_escape(text: str) -> str:
    """git-annex's name for a creds file: every byte but [A-Za-z0-9] as %XX."""
    return "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"%{b:02X}"
        for b in text.encode("utf-8")
    )


def parse_p2p_address(url: str) -> P2PAddress | None:
    """A remote URL that is a P2P address, validated; None for any other URL."""
    for scheme in ("tor-annex::", "p2p-annex::"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            break
    else:
        return None
    first, sep, second = rest.partition(":")
    if not sep or _CONTROL.search(rest):
        raise RemoteError(f"{url!r} is not a valid P2P address")
    if scheme == "tor-annex::":
        if not _ONION.fullmatch(first) or not second.isdigit() or not 0 < int(second) < 65536:
            raise RemoteError(f"{url!r} is not a valid tor-annex address")
        return TorAddress(first, int(second))
    if not _NET.fullmatch(first) or not second or second.startswith("-"):
        raise RemoteError(f"{url!r} is not a valid p2p-annex address")
    return NetAddress(first, second)


def git_dir(repository: Path) -> Path:
    out = subprocess.run(
        ["git", "rev-parse", "--absolute-git-dir"],
        cwd=repository,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise RemoteError(f"{repository} is not a git repository")
    return Path(out.stdout.strip())


def read_remotes(repository: Path) -> dict[str, Remote]:
    out = subprocess.run(
        ["git", "config", "-z", "--get-regexp", r"^remote\."],
        cwd=repository,
        capture_output=True,
        timeout=60,
        check=False,
    )
    found: dict[str, dict[str, str]] = {}
    for entry in out.stdout.split(b"\0"):
        if not entry:
            continue
        key, _, value = entry.decode("utf-8", "surrogateescape").partition("\n")
        name, _, setting = key[len("remote.") :].rpartition(".")
        found.setdefault(name, {})[setting.lower()] = value
    return {
        name: Remote(
            name=name,
            url=s.get("url"),
            uuid=s.get("annex-uuid"),
            proxy=s.get("annex-proxy", "").lower() in ("true", "yes", "on", "1"),
            settings=s,
        )
        for name, s in found.items()
    }


def read_token(repository: Path, address: P2PAddress) -> str:
    """The token git-annex stored for ``address`` when the operator linked it."""
    path = git_dir(repository) / "annex" / "creds" / address.creds_name
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except OSError as e:
        raise RemoteError(
            f"no token for {address} ({path}: {e.strerror}); link it on the proxy with"
            " `git annex p2p --link`"
        ) from None
    token = first[0].strip() if first else ""
    if not _TOKEN.fullmatch(token):
        raise RemoteError(f"the token stored in {path} is not valid")
    return token


def proxied_remote(repository: Path, name: str) -> Remote:
    """The remote called ``name``, checked to be one the operator lets us proxy."""
    if not _REMOTE_NAME.fullmatch(name):
        raise RemoteError(f"{name!r} is not a valid remote name")
    remote = read_remotes(repository).get(name)
    if remote is None:
        raise RemoteError(f"the proxy repository has no remote named {name!r}")
    if not remote.proxy:
        raise RemoteError(
            f"remote {name!r} is not proxied: run `git config remote.{name}.annex-proxy true`"
            " in the proxy repository"
        )
    if not remote.uuid:
        raise RemoteError(
            f"remote {name!r} has no annex-uuid: run `git annex sync {name}` or re-link it"
        )
    return remote
