"""Several hosts behind one Onionbalance frontend: config, files, doctor, the CONNECT relay.

The Tor tier (tests/tor/test_balance.py) drives all of it with stock
clients; these are the fast checks of each piece, and of every kind of
bad input.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from torbridge.config import ConfigError, load_config
from torbridge.ops import balance
from torbridge.protocol import messages as m
from torbridge.server import gitowner
from torbridge.testnet import check_torrc_safe
from torbridge.tokens import TokenError, TokenStore
from torbridge.tor.onion import torrc_snippet
from torbridge.transport.framed import FramedStream

A = "a" * 56 + ".onion"
B = "b" * 56 + ".onion"
F = "f" * 56 + ".onion"

BASE = """\
repository = "/srv/annex/hub"
state_dir  = "/var/lib/torbridge"
socket_dir = "/run/torbridge"

[[expose]]
name = "cl"
remote = "tbcluster"
port = 5001

[tor]
onion = "torrc"
hidden_service_dir = "hs"
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "torbridge.toml"
    path.write_text(text)
    return path


def test_balance_section_parsed(tmp_path: Path) -> None:
    text = BASE + f'\n[balance]\nfrontend = "{F}"\ngit_owner = "{A}"\nowner_remote = "owner"\n'
    config = load_config(_config(tmp_path, text + "sync_interval = 2.5\n"))
    assert config.balance is not None
    assert (config.balance.frontend, config.balance.git_owner) == (F, A)
    assert config.balance.owner_remote == "owner"
    assert config.balance.sync_interval == 2.5
    assert config.public_onion_override == F


@pytest.mark.parametrize(
    ("extra", "tor", "wanted"),
    [
        ('frontend = "nope.onion"', "", "not a v3 onion address"),
        (f'git_owner = "{A}"', "", "required key is missing"),
        (f'frontend = "{F}"\ngit_owner = "{F}"', "", "INSTANCE onion"),
        (f'frontend = "{F}"\nsync_interval = -1', "", "between 0 and 86400"),
        (f'frontend = "{F}"\nowner_remote = "-x"', "", "not a remote name"),
        (f'frontend = "{F}"\nfrontned = 1', "", "unknown key"),
        (f'frontend = "{F}"', 'onion = "ephemeral"', 'needs [tor] onion = "torrc"'),
        (f'frontend = "{F}"', "client_auth = true", "client_auth"),
    ],
)
def test_balance_section_errors(tmp_path: Path, extra: str, tor: str, wanted: str) -> None:
    text = BASE
    if tor.startswith("onion"):
        text = text.replace('onion = "torrc"\nhidden_service_dir = "hs"\n', tor + "\n")
    elif tor:
        text += tor + "\n"
    with pytest.raises(ConfigError, match="balance") as e:
        load_config(_config(tmp_path, text + "\n[balance]\n" + extra + "\n"))
    assert wanted in str(e.value)


def test_instance_line_round_trip_and_errors() -> None:
    inst = balance.Instance(A, (5001, 5002), F)
    assert balance.Instance.parse(inst.line()) == inst
    for bad in ["", "torbridge-instance x.onion ports=1 frontend=y", inst.line() + " extra"]:
        with pytest.raises(balance.BalanceError, match="not an instance line"):
            balance.Instance.parse(bad)


def test_agree_refuses_disagreement() -> None:
    good = [balance.Instance(A, (5001,), F), balance.Instance(B, (5001,), F)]
    balance.agree(good, F)
    with pytest.raises(balance.BalanceError, match="ports disagree"):
        balance.agree([good[0], balance.Instance(B, (5002,), F)], F)
    with pytest.raises(balance.BalanceError, match="configured for frontend"):
        balance.agree([good[0], balance.Instance(B, (5001,), A)], F)
    with pytest.raises(balance.BalanceError, match="listed twice"):
        balance.agree([good[0], good[0]], F)
    with pytest.raises(balance.BalanceError, match="no instance"):
        balance.agree([], F)


def test_frontend_key_and_config(tmp_path: Path) -> None:
    directory = tmp_path / "ob"
    address, made = balance.ensure_frontend_key(directory)
    assert made and balance.is_onion(address)
    key = directory / balance.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert balance.ensure_frontend_key(directory) == (address, False)  # kept, same address
    instances = [balance.Instance(A, (5001,), address), balance.Instance(B, (5001,), address)]
    assert balance.write_frontend_config(directory, instances) == address
    config = json.loads((directory / balance.CONFIG_FILE).read_text())
    service = config["services"][0]
    assert service["key"] == balance.KEY_FILE
    assert [i["address"] for i in service["instances"]] == ["a" * 56, "b" * 56]
    assert balance.read_instances(directory) == instances
    os.chmod(key, 0o644)
    with pytest.raises(balance.BalanceError, match="must be 0600"):
        balance.ensure_frontend_key(directory)
    key.write_text("not a key")
    os.chmod(key, 0o600)
    with pytest.raises(balance.BalanceError, match="not a PEM private key"):
        balance.frontend_address(key)


def test_drain_rewrites_the_frontend_without_the_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torbridge.cli import main

    directory = tmp_path / "ob"
    address, _ = balance.ensure_frontend_key(directory)
    c = "c" * 56 + ".onion"
    instances = [balance.Instance(o, (5001,), address) for o in (A, B, c)]
    balance.write_frontend_config(directory, instances)
    # by the CLI, the address with or without ".onion", any case
    assert main(["balance", "frontend", "--dir", str(directory), "--drain", B[:-6].upper()]) == 0
    out, err = capsys.readouterr()
    assert out == f"frontend: {address}\n" and "restart onionbalance" in err
    assert balance.read_instances(directory) == [instances[0], instances[2]]
    config = json.loads((directory / balance.CONFIG_FILE).read_text())
    assert [i["address"] for i in config["services"][0]["instances"]] == ["a" * 56, "c" * 56]
    # each kind of bad input: a clear error, the configuration untouched
    before = (directory / balance.CONFIG_FILE).read_text()
    for onion, wanted in (
        (B, "is not an instance of this frontend"),
        ("nonsense", "not an onion address"),
    ):
        with pytest.raises(balance.BalanceError, match=wanted):
            balance.drain(directory, onion)
    assert (directory / balance.CONFIG_FILE).read_text() == before
    balance.drain(directory, A)
    with pytest.raises(balance.BalanceError, match="is the last instance"):
        balance.drain(directory, c)
    assert balance.read_instances(directory) == [instances[2]]
    assert (
        main(["balance", "frontend", "--dir", str(directory), "--drain", c, instances[0].line()])
        == 1
    )
    assert "--drain takes no instance lines" in capsys.readouterr().err
    assert balance.read_instances(directory) == [instances[2]]
    with pytest.raises(balance.BalanceError, match="no frontend configuration"):
        balance.drain(tmp_path / "empty", A)


def test_doctor_checks(tmp_path: Path) -> None:
    ob = tmp_path / "ob"
    frontend, _ = balance.ensure_frontend_key(ob)
    balance.write_frontend_config(ob, [balance.Instance(A, (5001,), frontend)])
    text = BASE + f'\n[balance]\nfrontend = "{frontend}"\nfrontend_dir = "ob"\n'
    config = load_config(_config(tmp_path, text))
    found = balance.doctor_checks(config)
    assert not found[0][0] and "cannot read" in found[0][1]  # no ob_config yet
    assert all(ok for ok, _, _ in found[1:]), found
    hs = tmp_path / "hs"
    hs.mkdir()
    (hs / balance.OB_CONFIG).write_text(balance.ob_config_text(F))
    found = balance.doctor_checks(config)
    assert not found[0][0] and f"names {F}" in found[0][1] and "restart tor" in found[0][2]
    (hs / balance.OB_CONFIG).write_text(balance.ob_config_text(frontend))
    assert all(ok for ok, _, _ in balance.doctor_checks(config))
    # instances that disagree on the frontend host
    lines = [balance.Instance(A, (5001,), frontend), balance.Instance(B, (5002,), frontend)]
    (ob / balance.INSTANCES_FILE).write_text(json.dumps([i.line() for i in lines]))
    found = balance.doctor_checks(config)
    assert [ok for ok, _, _ in found] == [True, True, False] and "ports disagree" in found[2][1]


def test_instance_torrc_passes_the_testnet_checker(tmp_path: Path) -> None:
    snippet = torrc_snippet(
        tmp_path / "hs", {5001: tmp_path / "cl.sock"}, onionbalance_instance=True
    )
    assert "HiddenServiceOnionBalanceInstance 1" in snippet.splitlines()
    head = (
        "TestingTorNetwork 1\nUseDefaultFallbackDirs 0\n"
        "DirAuthority a orport=1 no-v2 v3ident=" + "0" * 40 + " 127.0.0.1:2 " + "0" * 40 + "\n"
    )
    check_torrc_safe(head + snippet)


def test_token_export_import(tmp_path: Path) -> None:
    owner, other = TokenStore(tmp_path / "a"), TokenStore(tmp_path / "b")
    token = owner.add("alice", "append")
    exported = owner.export()
    assert token.encode() not in exported  # hashes only
    assert other.import_(exported) == 1
    info = other.check(token)
    assert info is not None and info.mode == "append"
    owner.revoke("alice")
    other.import_(owner.export())
    assert other.check(token) is None
    with pytest.raises(TokenError, match="not a token file"):
        other.import_(b"{nonsense")


def test_testnet_time_periods_follow_the_consensus() -> None:
    pytest.importorskip("onionbalance")
    from onionbalance.hs_v3 import consensus as ob_consensus

    from torbridge.ops.frontend import TestnetTimings, patch_for_testnet

    patch_for_testnet(TestnetTimings())
    valid_after = datetime.datetime(2025, 1, 1, 0, 3, 20)  # 200 s after midnight
    fake = SimpleNamespace(
        consensus=SimpleNamespace(
            valid_after=valid_after, fresh_until=valid_after + datetime.timedelta(seconds=10)
        ),
        is_live=lambda: True,
    )
    cls = ob_consensus.Consensus
    assert cls.get_time_period_length(fake) == 4  # 24 x 10 s, in minutes
    assert cls._get_srv_phase_duration(fake) == 2
    start = cls.get_start_time_of_current_srv_run(fake)
    begin = int(valid_after.replace(tzinfo=datetime.UTC).timestamp())
    assert start == begin - ((begin // 10) % 24) * 10


# --------------------------------------------------------------------------
# the CONNECT relay's pump, on memory streams


async def _pair() -> tuple[FramedStream, FramedStream]:
    a, b = trio.testing.memory_stream_pair()
    return FramedStream(a), FramedStream(b)


async def test_pump_passes_data_and_connectdone_both_ways() -> None:
    client_side, client = await _pair()  # client_side: what the client's git-annex holds
    owner, owner_side = await _pair()  # owner_side: the owner's bridge
    got: list[object] = []

    async def owner_bridge() -> None:
        event = await owner_side.receive_event()
        assert isinstance(event, m.Data)
        got.append(await owner_side.receive_body(event.length))
        await owner_side.send(m.Data(5))
        await owner_side.send_body(b"PACK!")
        got.append(await owner_side.receive_event())  # the client's CONNECTDONE
        await owner_side.send(m.ConnectDone(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner_bridge)
        await client_side.send(m.Data(4))
        await client_side.send_body(b"want")

        async def client_git() -> None:
            event = await client_side.receive_event()
            assert event == m.Data(5)
            got.append(await client_side.receive_body(5))
            await client_side.send(m.ConnectDone(0))
            got.append(await client_side.receive_event())

        nursery.start_soon(client_git)
        code = await gitowner._pump(client, owner, "git-upload-pack", 30.0, 30.0)
    assert code == 0
    assert got == [b"want", b"PACK!", m.ConnectDone(0), m.ConnectDone(0)]


async def test_pump_owner_lost_fails_the_client() -> None:
    client_side, client = await _pair()
    owner, owner_side = await _pair()
    async with trio.open_nursery() as nursery:

        async def vanish() -> None:
            await owner_side.aclose()

        nursery.start_soon(vanish)
        code = await gitowner._pump(client, owner, "git-receive-pack", 30.0, 30.0)
        assert code == 1
        assert await client_side.receive_event() == m.ConnectDone(1)
        nursery.cancel_scope.cancel()


async def test_relay_unreachable_owner_refuses_with_git_error() -> None:
    client_side, client = await _pair()
    owner = gitowner.GitOwner(A, 5001, "127.0.0.1:1", "u" * 8)  # nothing listens on port 1
    code = await owner.relay(
        client, "00000000-0000-0000-0000-000000000001", "t" * 8, "git-upload-pack", 30.0
    )
    assert code == 1 and owner.failed == 1
    data = await client_side.receive_event()
    assert isinstance(data, m.Data)
    body = await client_side.receive_body(data.length)
    assert gitowner.UNREACHABLE.encode() in body
    assert await client_side.receive_event() == m.ConnectDone(1)
