"""tor's own defenses, as torbridge asks for them: config, ADD_ONION, torrc snippet.

No tor here (the real one takes them in tests/tor/test_onion_defenses.py):
what is written, and what ``torbridge onion-snippet`` prints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.core.test_config import MINIMAL
from torbridge.cli import main
from torbridge.config import ConfigError, dump_config, load_config
from torbridge.tor.onion import PowDefenses, add_onion_command, torrc_snippet

CONFIG = (
    MINIMAL
    + """
[[expose]]
name = "node1"
remote = "node1"
port = 5001

[tor]
onion = "torrc"
hidden_service_dir = "/var/lib/tor/torbridge"
"""
)
PORTS = {5000: Path("/run/torbridge/hub.sock"), 5001: Path("/run/torbridge/node1.sock")}


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "torbridge.toml"
    path.write_text(CONFIG + extra)
    return path


def _snippet(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str = "") -> list[str]:
    assert main(["--config", str(_config(tmp_path, extra)), "onion-snippet"]) == 0
    return capsys.readouterr().out.splitlines()


def test_onion_snippet_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _snippet(tmp_path, capsys) == [
        "# torbridge onion service: put this in /etc/tor/torrc.d/torbridge.conf",
        "HiddenServiceDir /var/lib/tor/torbridge",
        "HiddenServiceDirGroupReadable 1",
        "HiddenServicePort 5000 unix:/run/torbridge/hub.sock",
        "HiddenServicePort 5001 unix:/run/torbridge/node1.sock",
        "HiddenServiceMaxStreams 512",
        "HiddenServiceMaxStreamsCloseCircuit 1",
        "HiddenServiceEnableIntroDoSDefense 1",
        "HiddenServicePoWDefensesEnabled 1",
    ]


def test_onion_snippet_tuned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _snippet(
        tmp_path,
        capsys,
        "max_streams = 8\npow_queue_rate = 50\npow_queue_burst = 400\nexport_circuit_id = true\n",
    )
    assert lines[5:] == [
        "HiddenServiceMaxStreams 8",
        "HiddenServiceMaxStreamsCloseCircuit 1",
        "HiddenServiceEnableIntroDoSDefense 1",
        "HiddenServicePoWDefensesEnabled 1",
        "HiddenServicePoWQueueRate 50",
        "HiddenServicePoWQueueBurst 400",
        "HiddenServiceExportCircuitID haproxy",
    ]


def test_onion_snippet_without_pow_or_stream_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _snippet(tmp_path, capsys, "max_streams = 0\npow_defenses = false\n")
    assert lines[-1] == "HiddenServiceEnableIntroDoSDefense 1"
    assert not any("PoW" in ln or "MaxStreams" in ln for ln in lines), lines


def test_add_onion_command() -> None:
    assert add_onion_command(PORTS, "NEW", "ED25519-V3", 32, PowDefenses()) == (
        "ADD_ONION NEW:ED25519-V3 Flags=MaxStreamsCloseCircuit MaxStreams=32"
        " PoWDefensesEnabled=1"
        " Port=5000,unix:/run/torbridge/hub.sock Port=5001,unix:/run/torbridge/node1.sock"
    )
    tuned = add_onion_command(PORTS, "ED25519-V3", "KEY", 8, PowDefenses(True, 10, 20))
    assert tuned.startswith(
        "ADD_ONION ED25519-V3:KEY Flags=MaxStreamsCloseCircuit MaxStreams=8"
        " PoWDefensesEnabled=1 PoWQueueRate=10 PoWQueueBurst=20 Port=5000,"
    )
    # Off: nothing sent, which is tor's default and what a tor before 0.4.9.2 takes.
    off = add_onion_command(PORTS, "NEW", "ED25519-V3", None, PowDefenses(enabled=False))
    assert "PoW" not in off and "MaxStreams" not in off and "Flags" not in off


def test_config_defaults_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path))
    assert PowDefenses.of(cfg.tor) == PowDefenses(True, None, None)
    tuned = load_config(_config(tmp_path, "pow_queue_rate = 5\npow_queue_burst = 9\n"))
    assert PowDefenses.of(tuned.tor) == PowDefenses(True, 5, 9)
    out = tmp_path / "dumped.toml"
    for c in (
        cfg,
        tuned,
        dataclasses.replace(cfg, tor=dataclasses.replace(cfg.tor, pow_defenses=False)),
    ):
        out.write_text(dump_config(c))
        assert load_config(out).tor == c.tor


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("pow_defenses = 1\n", 'key "pow_defenses" in tor: expected a boolean, got integer'),
        ("pow_queue_rate = 0\n", 'key "pow_queue_rate" in tor: must be between 1 and 2147483647'),
        ("pow_queue_burst = 2147483648\n", 'key "pow_queue_burst" in tor: must be between 1 and'),
        (
            'pow_queue_rate = "fast"\n',
            'key "pow_queue_rate" in tor: expected an integer, got string',
        ),
    ],
)
def test_config_errors(tmp_path: Path, extra: str, problem: str) -> None:
    path = _config(tmp_path, extra)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_snippet_function_matches_the_cli_default() -> None:
    text = torrc_snippet(Path("/var/lib/tor/torbridge"), PORTS)
    assert text.endswith(
        "HiddenServiceEnableIntroDoSDefense 1\nHiddenServicePoWDefensesEnabled 1\n"
    )
