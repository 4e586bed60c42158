"""Relay and authority keys: made with tor-gencert and ``tor
--list-fingerprint`` (no connection opened), cached between runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import tempfile
from pathlib import Path

AUTH_CERT_MIN_VALIDITY = datetime.timedelta(days=7)


class KeyCache:
    """Relay and authority keys, kept between runs (tor-gencert is slow).

    One directory per node nickname; an authority's entry is used only while
    its certificate has more than a week left.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def restore(self, nickname: str, datadir: Path, *, authority: bool) -> bool:
        src = self.root / nickname
        needed = ["fingerprint", "keys/secret_id_key", "keys/ed25519_master_id_secret_key"]
        if authority:
            needed += ["keys/authority_certificate", "keys/authority_signing_key"]
        if not all((src / name).is_file() for name in needed):
            return False
        if authority and not _certificate_fresh(src / "keys" / "authority_certificate"):
            return False
        shutil.copytree(src / "keys", datadir / "keys", dirs_exist_ok=True)
        shutil.copy(src / "fingerprint", datadir / "fingerprint")
        os.chmod(datadir / "keys", 0o700)
        return True

    def save(self, nickname: str, datadir: Path) -> None:
        with contextlib.suppress(OSError):  # a cache, best effort
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = Path(tempfile.mkdtemp(prefix=f".{nickname}-", dir=self.root))
            try:
                shutil.copytree(datadir / "keys", tmp / "keys")
                shutil.copy(datadir / "fingerprint", tmp / "fingerprint")
                dest = self.root / nickname
                if dest.exists():
                    shutil.rmtree(dest)  # stale (an expiring certificate)
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


def _certificate_fresh(path: Path) -> bool:
    match = re.search(r"^dir-key-expires (\S+ \S+)$", path.read_text(), re.M)
    if match is None:
        return False
    expires = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=datetime.UTC
    )
    return expires - datetime.datetime.now(datetime.UTC) > AUTH_CERT_MIN_VALIDITY


def default_key_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torbridge" / "testnet-keys"
