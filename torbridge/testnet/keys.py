"""Relay and authority keys: made with tor-gencert and ``tor
--list-fingerprint`` (no connection opened), cached between runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torbridge.testnet.process import tor_command
from torbridge.testnet.torrc import Node, keygen_torrc
from torbridge.testnet.torrc_safety import TorTestNetError, write_checked_torrc

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


def make_keys(
    nodes: dict[str, Node],
    or_ports: dict[str, int],
    empty: Path,
    deadline: float,
    key_cache: KeyCache,
    spawn: Callable[[list[str], Path | None], subprocess.Popen[bytes]],
    say: Callable[[str], None],
) -> tuple[dict[str, str], dict[str, str]]:
    """Relay keys for every node, v3 authority keys for the authorities:
    from the cache, or made in parallel (and cached). ``spawn(argv, stdin)``
    starts a helper process (the network tracks it, to stop it). Returns
    (relay fingerprints, v3 identities), by nickname."""
    gencert = shutil.which("tor-gencert") or "tor-gencert"
    made: list[str] = []
    jobs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, node in nodes.items():
        authority = name.startswith("auth")
        if key_cache.restore(name, node.datadir, authority=authority):
            continue
        made.append(name)
        keys = node.datadir / "keys"
        if authority:
            argv = [gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12"]
            argv += ["-i", str(keys / "authority_identity_key")]
            argv += ["-s", str(keys / "authority_signing_key")]
            argv += ["-c", str(keys / "authority_certificate")]
            # stdin: an empty passphrase
            jobs.append((f"tor-gencert for {name}", spawn(argv, empty)))
        torrc = node.datadir / "torrc.keygen"
        write_checked_torrc(torrc, keygen_torrc(node.datadir, name, or_ports[name], empty), empty)
        argv = tor_command(torrc, empty, "--list-fingerprint")
        jobs.append((f"tor --list-fingerprint for {name}", spawn(argv, None)))
    if made:
        say(f"generating keys for {', '.join(made)} (slow; cached afterwards)")
    else:
        say(f"keys for {len(nodes)} tors from {key_cache.root}")
    for what, p in jobs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TorTestNetError(f"{what} timed out") from None
        if p.returncode != 0:
            text = out.decode(errors="replace")[-2000:]
            raise TorTestNetError(f"{what} failed (status {p.returncode}):\n{text}")
    fingerprints, v3idents = {}, {}
    for name, node in nodes.items():
        fingerprints[name] = (node.datadir / "fingerprint").read_text().split()[1]
        if name.startswith("auth"):
            cert = (node.datadir / "keys" / "authority_certificate").read_text()
            match = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.M)
            if match is None:
                raise TorTestNetError(f"no fingerprint in {name}'s authority certificate")
            v3idents[name] = match.group(1)
        if name in made:
            key_cache.save(name, node.datadir)
    return fingerprints, v3idents
