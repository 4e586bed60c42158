"""The TOML config: a good file, every kind of error, paths, dump/load."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from torbridge.config import Config, ConfigError, Expose, Limits, dump_config, load_config

GOOD = """\
repository = "/srv/annex/hub"
state_dir  = "/var/lib/torbridge"
socket_dir = "/run/torbridge"
socket_mode = "0640"
log_format = "json"

[[expose]]
name   = "hub"
remote = "."
port   = 5000

[[expose]]
name = "backup"
remote = "cluster.main"
port = 5001

[limits]
auth_timeout = 5
idle_timeout = 120.5
peer_timeout = 60
stall_timeout = 30
max_unauthenticated = 8
max_sessions_per_token = 2
"""

MINIMAL = """\
repository = "/srv/annex/hub"
state_dir = "/var/lib/torbridge"
socket_dir = "/run/torbridge"

[[expose]]
name = "hub"
remote = "."
port = 5000
"""


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "torbridge.toml"
    path.write_text(text)
    return load_config(path)


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "torbridge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --- good files ------------------------------------------------------------------


def test_good_file(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    assert cfg.path == tmp_path / "torbridge.toml"
    assert cfg.repository == Path("/srv/annex/hub")
    assert cfg.state_dir == Path("/var/lib/torbridge")
    assert cfg.socket_dir == Path("/run/torbridge")
    assert cfg.socket_mode == 0o640
    assert cfg.log_format == "json"
    assert cfg.expose == (
        Expose(name="hub", remote=".", port=5000),
        Expose(name="backup", remote="cluster.main", port=5001),
    )
    assert cfg.limits == Limits(
        auth_timeout=5.0,
        idle_timeout=120.5,
        peer_timeout=60.0,
        stall_timeout=30.0,
        max_unauthenticated=8,
        max_sessions_per_token=2,
    )
    # Timeouts are floats even when written as integers.
    assert isinstance(cfg.limits.auth_timeout, float)
    assert isinstance(cfg.limits.max_unauthenticated, int)


def test_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL)
    assert cfg.socket_mode == 0o660
    assert cfg.log_format == "text"
    assert cfg.limits == Limits()
    assert cfg.limits.auth_timeout == 10.0
    assert cfg.limits.max_sessions_per_token == 100
    assert cfg.limits.idle_timeout == 0.0  # none: pooled connections stay open


def test_zero_switches_off_the_idle_timeouts_only(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + "[limits]\nidle_timeout = 0\npeer_idle = 0\n")
    assert (cfg.limits.idle_timeout, cfg.limits.peer_idle) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="must be 0 \\(none\\) or more"):
        _load(tmp_path, MINIMAL + "[limits]\npeer_idle = -1\n")
    with pytest.raises(ConfigError, match="must be greater than 0"):
        _load(tmp_path, MINIMAL + "[limits]\nsession_wait = 0\n")


def test_no_peer_deadline_by_default(tmp_path: Path) -> None:
    """git-annex waits on a working peer as long as it takes: so does the default."""
    limits = _load(tmp_path, MINIMAL).limits
    assert limits.peer_timeout == 0
    assert limits.peer_wait == math.inf
    assert limits.client_stall == limits.stall_timeout > 0


@pytest.mark.parametrize("key", ["peer_timeout", "stall_timeout"])
def test_zero_is_no_limit(tmp_path: Path, key: str) -> None:
    limits = _load(tmp_path, MINIMAL + f"[limits]\n{key} = 0\n").limits
    assert getattr(limits, key) == 0
    assert math.inf in (limits.peer_wait, limits.client_stall)
    limits = _load(tmp_path, MINIMAL + f"[limits]\n{key} = 7\n").limits
    assert 7.0 in (limits.peer_wait, limits.client_stall)


def test_partial_limits_keep_other_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL + "[limits]\nidle_timeout = 60\n")
    assert cfg.limits == dataclasses.replace(Limits(), idle_timeout=60.0)


@pytest.mark.parametrize(("text", "mode"), [("660", 0o660), ("0600", 0o600), ("0777", 0o777)])
def test_socket_mode_forms(tmp_path: Path, text: str, mode: int) -> None:
    cfg = _load(tmp_path, f'socket_mode = "{text}"\n' + MINIMAL)
    assert cfg.socket_mode == mode


def test_socket_path_and_endpoint(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    backup = cfg.endpoint("backup")
    assert backup == Expose(name="backup", remote="cluster.main", port=5001)
    assert cfg.socket_path(backup) == Path("/run/torbridge/backup.sock")
    with pytest.raises(KeyError):
        cfg.endpoint("nope")


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "tb.toml").write_text(
        MINIMAL.replace('"/srv/annex/hub"', '"annex/hub"')
        .replace('"/var/lib/torbridge"', '"../state"')
        .replace('"/run/torbridge"', '"/abs/sockets"')
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (conf_dir / "tb.toml", Path("../etc/tb.toml")):
        cfg = load_config(given)
        assert cfg.path.is_absolute()
        assert cfg.repository == conf_dir / "annex/hub"
        assert cfg.state_dir == conf_dir / "../state"
        assert cfg.state_dir.resolve() == (tmp_path / "state").resolve()
        assert cfg.socket_dir == Path("/abs/sockets")


def test_load_does_not_touch_the_paths(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL.replace('"/srv/annex/hub"', '"no/such/repo"'))
    assert cfg.repository == tmp_path / "no/such/repo"
    assert not cfg.repository.exists()
    assert not (tmp_path / "no").exists()


# --- errors --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: config file not found"


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.toml"
    path.mkdir()
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: cannot read config file: ")


def test_toml_syntax_error(tmp_path: Path) -> None:
    bad = MINIMAL + "oops = \n"
    try:
        tomllib.loads(bad)
    except tomllib.TOMLDecodeError as e:
        tomllib_message = str(e)
    message = _error(tmp_path, bad)
    assert "not valid TOML" in message
    assert tomllib_message in message
    assert "line 9" in message  # the line that was appended


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "torbridge.toml"
    path.write_bytes(b'repository = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML: the file is not UTF-8"):
        load_config(path)


def _without(text: str, line: str) -> str:
    assert line in text
    return text.replace(line, "")


ERRORS = [
    # missing keys
    pytest.param(
        _without(MINIMAL, 'repository = "/srv/annex/hub"\n'),
        ['key "repository"', "required key is missing"],
        id="missing-repository",
    ),
    pytest.param(
        _without(MINIMAL, 'state_dir = "/var/lib/torbridge"\n'),
        ['key "state_dir"', "required key is missing"],
        id="missing-state_dir",
    ),
    pytest.param(
        _without(MINIMAL, 'socket_dir = "/run/torbridge"\n'),
        ['key "socket_dir"', "required key is missing"],
        id="missing-socket_dir",
    ),
    pytest.param(
        MINIMAL.split("[[expose]]")[0],
        ["[[expose]]", "at least one endpoint is required"],
        id="missing-expose",
    ),
    pytest.param(
        MINIMAL.split("[[expose]]")[0] + "expose = []\n",
        ["[[expose]]", "at least one endpoint is required"],
        id="empty-expose",
    ),
    pytest.param(
        _without(MINIMAL, "port = 5000\n"),
        ['key "port" in [[expose]] #1', "required key is missing"],
        id="missing-port",
    ),
    pytest.param(
        _without(MINIMAL, 'remote = "."\n'),
        ['key "remote" in [[expose]] #1', "required key is missing"],
        id="missing-remote",
    ),
    # unknown keys
    pytest.param(
        "reposiotry = 'x'\n" + MINIMAL,
        ['key "reposiotry"', "unknown key"],
        id="unknown-top",
    ),
    pytest.param(
        MINIMAL + "porrt = 1\n",
        ['key "porrt" in [[expose]] #1', "unknown key", "name, remote, port"],
        id="unknown-expose",
    ),
    pytest.param(
        MINIMAL + "[limits]\nidle_timout = 5\n",
        ['key "idle_timout" in [limits]', "unknown key", "idle_timeout"],
        id="unknown-limit",
    ),
    pytest.param(
        MINIMAL + "[extra]\nx = 1\n",
        ['key "extra"', "unknown key"],
        id="unknown-table",
    ),
    # wrong types
    pytest.param(
        MINIMAL.replace('"/srv/annex/hub"', "42"),
        ['key "repository"', "expected a string, got integer"],
        id="type-repository",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", 'port = "5000"'),
        ['key "port" in [[expose]] #1', "expected an integer, got string"],
        id="type-port-string",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", "port = true"),
        ['key "port" in [[expose]] #1', "expected an integer, got boolean"],
        id="type-port-bool",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", "port = 5000.0"),
        ['key "port" in [[expose]] #1', "expected an integer, got float"],
        id="type-port-float",
    ),
    pytest.param(
        MINIMAL.replace('name = "hub"', "name = [1]"),
        ['key "name" in [[expose]] #1', "expected a string, got array"],
        id="type-name",
    ),
    pytest.param(
        MINIMAL.replace("[[expose]]", "[expose]"),
        ['key "expose"', "expected an array of tables ([[expose]]), got table"],
        id="type-expose-table",
    ),
    pytest.param(
        'limits = "fast"\n' + MINIMAL,
        ['key "limits"', "expected a table ([limits]), got string"],
        id="type-limits",
    ),
    pytest.param(
        MINIMAL + '[limits]\nauth_timeout = "10"\n',
        ['key "auth_timeout" in [limits]', "expected a number, got string"],
        id="type-timeout",
    ),
    pytest.param(
        MINIMAL + "[limits]\nmax_unauthenticated = 1.5\n",
        ['key "max_unauthenticated" in [limits]', "expected an integer, got float"],
        id="type-max-float",
    ),
    pytest.param(
        "log_format = 1\n" + MINIMAL,
        ['key "log_format"', "expected a string, got integer"],
        id="type-log_format",
    ),
    pytest.param(
        "log_format = 1979-05-27\n" + MINIMAL,
        ['key "log_format"', "expected a string, got date/time"],
        id="type-date",
    ),
    # bad values
    pytest.param(
        'log_format = "xml"\n' + MINIMAL,
        ['key "log_format"', "'xml' is not one of: text, json"],
        id="bad-log_format",
    ),
    pytest.param(
        MINIMAL.replace('"/srv/annex/hub"', '""'),
        ['key "repository"', "must not be empty"],
        id="empty-path",
    ),
    pytest.param(
        MINIMAL.replace('"/srv/annex/hub"', '"/srv/\\u0000"'),
        ['key "repository"', "NUL"],
        id="nul-in-path",
    ),
    pytest.param(
        MINIMAL + "[limits]\nauth_timeout = 0\n",
        ['key "auth_timeout" in [limits]', "must be greater than 0"],
        id="zero-timeout",
    ),
    pytest.param(
        MINIMAL + "[limits]\npeer_timeout = -1.5\n",
        ['key "peer_timeout" in [limits]', "must be 0 (none) or more"],
        id="negative-timeout",
    ),
    pytest.param(
        MINIMAL + "[limits]\nidle_timeout = inf\n",
        ['key "idle_timeout" in [limits]', "finite"],
        id="inf-timeout",
    ),
    pytest.param(
        MINIMAL + "[limits]\nidle_timeout = nan\n",
        ['key "idle_timeout" in [limits]', "finite"],
        id="nan-timeout",
    ),
    pytest.param(
        MINIMAL + "[limits]\nmax_sessions_per_token = 0\n",
        ['key "max_sessions_per_token" in [limits]', "must be greater than 0"],
        id="zero-max",
    ),
    # socket_mode
    pytest.param(
        "socket_mode = 660\n" + MINIMAL,
        ['key "socket_mode"', 'expected an octal string such as "0660", got integer'],
        id="socket_mode-int",
    ),
    pytest.param(
        'socket_mode = "0680"\n' + MINIMAL,
        ['key "socket_mode"', "'0680' is not an octal permission mode"],
        id="socket_mode-not-octal",
    ),
    pytest.param(
        'socket_mode = "rw-rw----"\n' + MINIMAL,
        ['key "socket_mode"', "is not an octal permission mode"],
        id="socket_mode-symbolic",
    ),
    pytest.param(
        'socket_mode = "4770"\n' + MINIMAL,
        ['key "socket_mode"', "is not an octal permission mode"],
        id="socket_mode-setuid",
    ),
    # endpoint names, remotes, ports
    pytest.param(
        MINIMAL.replace('name = "hub"', 'name = "my hub"'),
        ['key "name" in [[expose]] #1', "'my hub' is not a valid endpoint name"],
        id="bad-name",
    ),
    pytest.param(
        MINIMAL.replace('name = "hub"', f'name = "{"x" * 65}"'),
        ['key "name" in [[expose]] #1', "is not a valid endpoint name"],
        id="long-name",
    ),
    pytest.param(
        MINIMAL.replace('name = "hub"', 'name = "../hub"'),
        ['key "name" in [[expose]] #1', "is not a valid endpoint name"],
        id="slash-name",
    ),
    pytest.param(
        MINIMAL + '[[expose]]\nname = "hub"\nremote = "r"\nport = 5001\n',
        ['key "name" in [[expose]] #2', "duplicate endpoint name 'hub'", "#1"],
        id="duplicate-name",
    ),
    pytest.param(
        MINIMAL + '[[expose]]\nname = "other"\nremote = "r"\nport = 5000\n',
        ['key "port" in [[expose]] #2', "duplicate port 5000", "#1"],
        id="duplicate-port",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", "port = 0"),
        ['key "port" in [[expose]] #1', "0 is not a port number (1 to 65535)"],
        id="port-zero",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", "port = 65536"),
        ['key "port" in [[expose]] #1', "65536 is not a port number"],
        id="port-high",
    ),
    pytest.param(
        MINIMAL.replace("port = 5000", "port = -80"),
        ['key "port" in [[expose]] #1', "-80 is not a port number"],
        id="port-negative",
    ),
    pytest.param(
        MINIMAL.replace('remote = "."', 'remote = "--upload-pack=evil"'),
        ['key "remote" in [[expose]] #1', "'--upload-pack=evil' is not \".\" or a remote name"],
        id="remote-option",
    ),
    pytest.param(
        MINIMAL.replace('remote = "."', 'remote = "a b"'),
        ['key "remote" in [[expose]] #1', 'is not "." or a remote name'],
        id="remote-space",
    ),
    pytest.param(
        MINIMAL.replace('remote = "."', 'remote = ""'),
        ['key "remote" in [[expose]] #1', 'is not "." or a remote name'],
        id="remote-empty",
    ),
    pytest.param(
        MINIMAL.replace('remote = "."', 'remote = "origin/main"'),
        ['key "remote" in [[expose]] #1', 'is not "." or a remote name'],
        id="remote-slash",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = _error(tmp_path, text)
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize("remote", [".", "origin", "my-cluster", "a.b_c", ".hidden", "_x"])
def test_good_remote_names(tmp_path: Path, remote: str) -> None:
    cfg = _load(tmp_path, MINIMAL.replace('remote = "."', f'remote = "{remote}"'))
    assert cfg.expose[0].remote == remote


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_are_inclusive(tmp_path: Path, port: int) -> None:
    cfg = _load(tmp_path, MINIMAL.replace("port = 5000", f"port = {port}"))
    assert cfg.expose[0].port == port


# --- dump / load ---------------------------------------------------------------------


def _roundtrip(tmp_path: Path, cfg: Config) -> Config:
    text = dump_config(cfg)
    out = tmp_path / "dumped" / "torbridge.toml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return load_config(out)


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    again = _roundtrip(tmp_path, cfg)
    assert again == dataclasses.replace(cfg, path=tmp_path / "dumped" / "torbridge.toml")


def test_dump_load_round_trip_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, MINIMAL)
    again = _roundtrip(tmp_path, cfg)
    assert dataclasses.replace(again, path=cfg.path) == cfg


def test_dump_load_round_trip_awkward_values(tmp_path: Path) -> None:
    cfg = Config(
        path=tmp_path / "x.toml",
        repository=Path('/srv/an "annex"\\with\tescapes\x7f'),
        state_dir=Path("/var/lib/tørbridge ☃"),
        socket_dir=Path("/run/tb\nnewline"),
        socket_mode=0o600,
        log_format="text",
        expose=(Expose("a", ".", 1), Expose("b.c", "x-y", 65535)),
        limits=Limits(
            auth_timeout=0.25,
            idle_timeout=1e-05,
            peer_timeout=12345.5,
            stall_timeout=1e20,
            max_unauthenticated=1,
            max_sessions_per_token=999,
        ),
    )
    again = _roundtrip(tmp_path, cfg)
    assert dataclasses.replace(again, path=cfg.path) == cfg


def test_dump_is_commented_and_complete(tmp_path: Path) -> None:
    text = dump_config(_load(tmp_path, GOOD))
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 5
    doc = tomllib.loads(text)
    assert doc["socket_mode"] == "0640"
    assert [e["name"] for e in doc["expose"]] == ["hub", "backup"]
    assert set(doc["limits"]) == {f.name for f in dataclasses.fields(Limits)}


def test_dump_refuses_what_toml_cannot_hold(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        _load(tmp_path, MINIMAL),
        repository=Path("/srv/" + b"\xff".decode("utf-8", "surrogateescape")),
    )
    with pytest.raises(ValueError, match="cannot be written in a TOML file"):
        dump_config(cfg)
