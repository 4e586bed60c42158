"""Several bridge hosts behind one Onionbalance frontend (docs/scale-out.md).

No I/O beyond the files named: the instance's ``ob_config``, the one-line
instance description a host hands to the frontend host, the frontend key
(PEM, mode 0600) and Onionbalance's ``config.yaml``, and the checks doctor
runs on them. Running Onionbalance itself is ``torbridge.ops.frontend``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torbridge.config import ONION_RE, Config

OB_CONFIG = "ob_config"  # in the instance's HiddenServiceDir, read by tor at start
KEY_FILE = "frontend.key"
CONFIG_FILE = "config.yaml"
INSTANCES_FILE = "instances.json"
_LINE = re.compile(
    r"torbridge-instance (?P<onion>[a-z2-7]{56}\.onion) ports=(?P<ports>\d{1,5}(?:,\d{1,5})*)"
    r" frontend=(?P<frontend>[a-z2-7]{56}\.onion)"
)


class BalanceError(Exception):
    """One line for the user."""


@dataclass(frozen=True)
class Instance:
    """One host as the frontend host sees it: no secret in here."""

    onion: str
    ports: tuple[int, ...]
    frontend: str

    def line(self) -> str:
        ports = ",".join(str(p) for p in self.ports)
        return f"torbridge-instance {self.onion} ports={ports} frontend={self.frontend}"

    @classmethod
    def parse(cls, text: str) -> Instance:
        match = _LINE.fullmatch(text.strip())
        if match is None:
            raise BalanceError(
                f"not an instance line (torbridge balance instance prints them): {text.strip()!r}"
            )
        ports = tuple(sorted(int(p) for p in match.group("ports").split(",")))
        return cls(match.group("onion"), ports, match.group("frontend"))


def ob_config_text(frontend: str) -> str:
    """What tor reads from ``HiddenServiceDir/ob_config`` for an Onionbalance instance."""
    return f"MasterOnionAddress {frontend}\n"


def read_ob_config(hidden_service_dir: Path) -> str | None:
    """The MasterOnionAddress in the instance's ob_config; None if it has none."""
    text = (hidden_service_dir / OB_CONFIG).read_text()
    match = re.search(r"^\s*MasterOnionAddress\s+(\S+)\s*$", text, re.M)
    return match.group(1).lower() if match else None


def instance_of(config: Config, onion: str) -> Instance:
    if config.balance is None:
        raise BalanceError("this host has no [balance] section: it is not an instance")
    ports = tuple(sorted({e.port for e in config.expose}))
    return Instance(onion, ports, config.balance.frontend)


# --------------------------------------------------------------------------
# the frontend key


def onion_of_public_key(public: bytes) -> str:
    from stem.descriptor.hidden_service import (  # type: ignore[import-untyped]
        HiddenServiceDescriptorV3,
    )

    return str(HiddenServiceDescriptorV3.address_from_identity_key(public)).lower()


def _private_key(path: Path) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as e:
        raise BalanceError(f"{path}: not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BalanceError(f"{path}: not an ed25519 key")
    return key


def frontend_address(key_path: Path) -> str:
    """The onion address of the frontend key at ``key_path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _private_key(key_path)
    assert isinstance(key, Ed25519PrivateKey)
    public = key.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
    return onion_of_public_key(public)


def ensure_frontend_key(directory: Path) -> tuple[str, bool]:
    """The frontend address, making the key (0600, in a 0700 directory) if
    there is none. Returns (address, made)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / KEY_FILE
    if path.exists():
        check_key_mode(path)
        return frontend_address(path), False
    pem = Ed25519PrivateKey.generate().private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return frontend_address(path), True


def check_key_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise BalanceError(f"{path} is mode {mode:04o}; the frontend key must be 0600")


# --------------------------------------------------------------------------
# the frontend configuration


def agree(instances: Sequence[Instance], frontend: str) -> None:
    """BalanceError unless every instance names ``frontend`` and the same ports."""
    if not instances:
        raise BalanceError("no instance given")
    seen: set[str] = set()
    for inst in instances:
        if inst.frontend != frontend:
            raise BalanceError(
                f"{inst.onion} is configured for frontend {inst.frontend}, not {frontend}"
            )
        if inst.onion in seen:
            raise BalanceError(f"{inst.onion} is listed twice")
        seen.add(inst.onion)
    first = instances[0]
    for inst in instances[1:]:
        if inst.ports != first.ports:
            raise BalanceError(
                f"ports disagree: {first.onion} serves {list(first.ports)},"
                f" {inst.onion} serves {list(inst.ports)}"
            )


def write_frontend_config(directory: Path, instances: Sequence[Instance]) -> str:
    """config.yaml (JSON is YAML) and instances.json next to the key; the frontend address."""
    frontend, _ = ensure_frontend_key(directory)
    agree(instances, frontend)
    config = {
        "services": [
            {
                "key": KEY_FILE,
                "instances": [
                    {"address": i.onion.removesuffix(".onion"), "name": f"instance{n}"}
                    for n, i in enumerate(instances, 1)
                ],
            }
        ]
    }
    _write_atomic(directory / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    _write_atomic(
        directory / INSTANCES_FILE,
        json.dumps([i.line() for i in instances], indent=1) + "\n",
    )
    return frontend


def drain(directory: Path, onion: str) -> tuple[str, list[Instance]]:
    """Rewrite the frontend configuration without instance ``onion`` (the
    first step of "drain, then stop", docs/scale-out.md): the frontend
    address and the instances that stay."""
    wanted = onion.lower()
    if not wanted.endswith(".onion"):
        wanted += ".onion"
    if not is_onion(wanted):
        raise BalanceError(f"--drain {onion!r}: not an onion address")
    try:
        instances = read_instances(directory)
    except FileNotFoundError:
        raise BalanceError(
            f"{directory / INSTANCES_FILE} not found: no frontend configuration to drain from"
        ) from None
    except (OSError, ValueError) as e:
        raise BalanceError(f"{directory / INSTANCES_FILE}: {e}") from None
    stay = [i for i in instances if i.onion != wanted]
    if len(stay) == len(instances):
        listed = ", ".join(i.onion for i in instances) or "none"
        raise BalanceError(f"{wanted} is not an instance of this frontend (instances: {listed})")
    if not stay:
        raise BalanceError(f"{wanted} is the last instance: draining it leaves no one to serve")
    return write_frontend_config(directory, stay), stay


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_instances(directory: Path) -> list[Instance]:
    raw = json.loads((directory / INSTANCES_FILE).read_text())
    if not isinstance(raw, list):
        raise BalanceError(f"{directory / INSTANCES_FILE}: expected a list of instance lines")
    return [Instance.parse(str(line)) for line in raw]


# --------------------------------------------------------------------------
# doctor


def doctor_checks(config: Config) -> list[tuple[bool, str, str]]:
    """(ok, what, fix) for doctor: the instance's ob_config, and on the
    frontend host the key and the instances' agreement."""
    balance = config.balance
    if balance is None:
        return []
    found: list[tuple[bool, str, str]] = []
    hs_dir = config.tor.hidden_service_dir
    assert hs_dir is not None  # the config requires torrc mode with [balance]
    try:
        master = read_ob_config(hs_dir)
    except OSError as e:
        fix = f"torbridge balance instance-config > {hs_dir / OB_CONFIG}, then restart tor"
        found.append((False, f"cannot read {hs_dir / OB_CONFIG}: {e.strerror}", fix))
    else:
        if master == balance.frontend:
            found.append((True, f"ob_config names the frontend {balance.frontend}", ""))
        else:
            found.append(
                (
                    False,
                    f"{hs_dir / OB_CONFIG} names {master}, not {balance.frontend}",
                    f"torbridge balance instance-config > {hs_dir / OB_CONFIG},"
                    " then restart tor (tor reads it at start only)",
                )
            )
    if balance.frontend_dir is not None:
        found += _frontend_checks(balance.frontend_dir, balance.frontend)
    return found


def _frontend_checks(directory: Path, frontend: str) -> list[tuple[bool, str, str]]:
    key = directory / KEY_FILE
    try:
        check_key_mode(key)
        address = frontend_address(key)
    except OSError as e:
        return [
            (
                False,
                f"cannot read the frontend key {key}: {e.strerror}",
                "run doctor as the user onionbalance runs as; torbridge balance frontend --dir",
            )
        ]
    except BalanceError as e:
        return [(False, str(e), f"chmod 600 {key}")]
    found = [
        (
            address == frontend,
            f"frontend key {key} is {address}",
            "" if address == frontend else f"set [balance] frontend = {address!r}",
        )
    ]
    try:
        instances = read_instances(directory)
        agree(instances, frontend)
    except (OSError, ValueError, BalanceError) as e:
        found.append((False, f"instances: {e}", "torbridge balance frontend --dir DIR LINE..."))
    else:
        found.append(
            (True, f"{len(instances)} instances agree on ports {list(instances[0].ports)}", "")
        )
    return found


def is_onion(text: str) -> bool:
    return ONION_RE.fullmatch(text) is not None
