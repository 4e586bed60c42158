"""Onion client authorization without tor: keys, the store, ADD_ONION, torrc files.

The Tor tier (tests/tor/test_client_auth.py) proves it with real tors and
the stock client; here the parts that need no network, and every refusal.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.core.test_config import MINIMAL
from torbridge.config import ConfigError, load_config
from torbridge.tor.clientauth import (
    MAX_DESCRIPTOR,
    NOBODY_FILE,
    ClientAuthError,
    ClientLimit,
    ClientStore,
    KeyPair,
    auth_private_line,
    control_command,
    descriptor_size,
    max_clients,
    sync_authorized_clients,
)
from torbridge.tor.onion import PowDefenses, add_onion_command

ONION = "b" * 56 + ".onion"


def test_keys_are_x25519_and_printed_as_tor_reads_them() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    pair = KeyPair.new()
    assert (
        X25519PrivateKey.from_private_bytes(pair.private).public_key().public_bytes_raw()
        == pair.public
    )
    line = auth_private_line(ONION, pair.private)
    onion_id, kind, algo, key = line.split(":")
    assert (onion_id, kind, algo) == ("b" * 56, "descriptor", "x25519")
    assert base64.b32decode(key + "====") == pair.private and "=" not in key
    command = control_command(ONION, pair.private, "laptop")
    assert command.split(" ")[:2] == ["ONION_CLIENT_AUTH_ADD", "b" * 56]
    assert base64.b64decode(command.split(" ")[2].removeprefix("x25519:")) == pair.private
    assert command.endswith(" ClientName=laptop")
    assert len(pair.public_base32) == 52


def test_store_keeps_names_and_public_keys_only(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    assert store.list() == []
    pair = KeyPair.new()
    store.add("laptop", pair.public_base32, limit=10)
    text = (tmp_path / "onion_clients.json").read_text()
    assert pair.public_base32 in text
    assert base64.b32encode(pair.private).decode().rstrip("=") not in text
    assert (tmp_path / "onion_clients.json").stat().st_mode & 0o777 == 0o600
    assert [c.name for c in store.list()] == ["laptop"]
    assert store.public_keys() == [pair.public_base32]
    store.revoke("laptop")
    assert store.list() == []


@pytest.mark.parametrize("name", ["", "a b", "../x", "x" * 65, "a/b"])
def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ClientAuthError, match="not a valid client name"):
        ClientStore(tmp_path).add(name, KeyPair.new().public_base32, 10)
    assert not (tmp_path / "onion_clients.json").exists()


def test_duplicate_and_unknown_names(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    store.add("a", KeyPair.new().public_base32, 10)
    with pytest.raises(ClientAuthError, match="exists already"):
        store.add("a", KeyPair.new().public_base32, 10)
    with pytest.raises(ClientAuthError, match="no client named 'b'"):
        store.revoke("b")
    assert [c.name for c in store.list()] == ["a"]


def test_the_client_over_the_limit_is_refused_with_the_number_that_fits(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    for i in range(3):
        store.add(f"c{i}", KeyPair.new().public_base32, limit=3)
    with pytest.raises(ClientLimit, match=r"3 clients fit in the onion's descriptor .*50000"):
        store.add("c3", KeyPair.new().public_base32, limit=3)
    assert len(store.list()) == 3


def test_a_damaged_store_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "onion_clients.json"
    for text in (
        "{",
        '{"version": 9}',
        json.dumps({"version": 1, "clients": [{"name": "x"}]}),
        json.dumps(
            {"version": 1, "clients": [{"name": "x", "public": "not base32", "created": "2026"}]}
        ),
    ):
        path.write_text(text)
        with pytest.raises(ClientAuthError, match=r"onion_clients\.json"):
            ClientStore(tmp_path).list()


def test_descriptor_size_limit() -> None:
    n = max_clients()
    assert n % 16 == 0 and n >= 300
    assert descriptor_size(n) <= MAX_DESCRIPTOR < descriptor_size(n + 16)
    assert descriptor_size(0) == descriptor_size(16)  # tor pads the list to groups of 16
    assert max_clients(intro_points=20) < n


def test_add_onion_with_client_auth() -> None:
    ports = {5000: Path("/run/tb/hub.sock")}
    off = add_onion_command(ports, "NEW", "ED25519-V3", 32, PowDefenses(enabled=False))
    assert "V3Auth" not in off and "ClientAuthV3" not in off
    keys = [KeyPair.new().public_base32 for _ in range(2)]
    on = add_onion_command(ports, "NEW", "ED25519-V3", 32, PowDefenses(enabled=False), keys)
    assert " Flags=MaxStreamsCloseCircuit,V3Auth MaxStreams=32 " in on, on
    assert on.endswith(f" ClientAuthV3={keys[0]} ClientAuthV3={keys[1]}"), on
    no_cap = add_onion_command(ports, "NEW", "ED25519-V3", None, PowDefenses(enabled=False), keys)
    assert " Flags=V3Auth " in no_cap and "MaxStreams" not in no_cap


def test_torrc_mode_files(tmp_path: Path) -> None:
    hs = tmp_path / "hs"
    hs.mkdir()
    assert sync_authorized_clients(hs, [])  # changed: tor must be reloaded
    directory = hs / "authorized_clients"
    # tor turns client auth off when the directory is empty: a key nobody has.
    assert [p.name for p in directory.iterdir()] == [NOBODY_FILE]
    nobody = (directory / NOBODY_FILE).read_text()
    # The daemon syncs at every start: the same list changes nothing (no reload).
    assert not sync_authorized_clients(hs, [])
    assert (directory / NOBODY_FILE).read_text() == nobody
    store = ClientStore(tmp_path)
    pair = KeyPair.new()
    store.add("laptop", pair.public_base32, 10)
    assert sync_authorized_clients(hs, store.list())
    assert sorted(p.name for p in directory.iterdir()) == ["laptop.auth"]
    assert (directory / "laptop.auth").read_text() == f"descriptor:x25519:{pair.public_base32}\n"
    assert not sync_authorized_clients(hs, store.list())
    (directory / "stray.auth").write_text("descriptor:x25519:" + "A" * 52 + "\n")
    assert sync_authorized_clients(hs, store.list())  # a file tor would read: removed
    assert sorted(p.name for p in directory.iterdir()) == ["laptop.auth"]
    store.revoke("laptop")
    assert sync_authorized_clients(hs, store.list())
    assert [p.name for p in directory.iterdir()] == [NOBODY_FILE]


def test_config_client_auth(tmp_path: Path) -> None:
    path = tmp_path / "tb.toml"
    path.write_text(MINIMAL + "\n[tor]\nclient_auth = true\n")
    assert load_config(path).tor.client_auth is True
    path.write_text(MINIMAL)
    assert load_config(path).tor.client_auth is False
    path.write_text(MINIMAL + '\n[tor]\nclient_auth = "yes"\n')
    with pytest.raises(ConfigError, match='"client_auth" in tor: expected a boolean'):
        load_config(path)


def test_client_add_with_client_auth_off_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torbridge.cli import main

    path = tmp_path / "tb.toml"
    path.write_text(MINIMAL.replace("/var/lib/torbridge", str(tmp_path / "state")))
    assert main(["--config", str(path), "client", "add", "laptop"]) == 1
    assert "client authorization is off: set client_auth = true" in capsys.readouterr().err
    assert not (tmp_path / "state" / "onion_clients.json").exists()
    assert main(["--config", str(path), "client", "list"]) == 0
    assert capsys.readouterr().out == ""
