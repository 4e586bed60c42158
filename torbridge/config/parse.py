"""Reading the TOML configuration file into config/model.py's dataclasses."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torbridge.config.model import (
    LOG_FORMATS,
    ONION_RE,
    OWN_REPOSITORY,
    Balance,
    Config,
    ConfigError,
    Expose,
    Limits,
    Tor,
)

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A git remote or cluster name; never starts with "-" so it can't be read as
# an option when it ends up in a git-annex argv.
_REMOTE_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_SOCKET_MODE_RE = re.compile(r"0?[0-7]{3}")
_INT_LIMITS = frozenset(
    {"max_unauthenticated", "max_sessions_per_token", "max_sessions", "max_per_circuit"}
)
# Timeouts an operator may switch off with 0 (none).
_ZERO_MEANS_NONE = frozenset({"idle_timeout", "peer_idle", "peer_timeout", "stall_timeout"})
LIMIT_KEYS = tuple(f.name for f in fields(Limits))
_TOP_KEYS = (
    "repository",
    "state_dir",
    "socket_dir",
    "socket_mode",
    "log_format",
    "expose",
    "limits",
    "tor",
    "balance",
)
_BALANCE_KEYS = ("frontend", "git_owner", "owner_remote", "sync_interval", "frontend_dir")
_TOR_KEYS = (
    "socks",
    "control",
    "password",
    "onion",
    "hidden_service_dir",
    "max_streams",
    "export_circuit_id",
    "pow_defenses",
    "pow_queue_rate",
    "pow_queue_burst",
    "client_auth",
    "metrics_port",
    "node_circuits",
)
_ONION_MODES = ("ephemeral", "torrc")
_POW_QUEUE_MAX = 2**31 - 1  # tor's HiddenServicePoWQueueRate/Burst are 32-bit
_SOCKS_RE = re.compile(r"unix:/.+|[A-Za-z0-9.-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}")
_EXPOSE_KEYS = ("name", "remote", "port")
_LOOPBACK_PORT_RE = re.compile(r"(127\.0\.0\.1|\[::1\]):\d{1,5}")


def _type_name(value: object) -> str:
    # TOML's names for the types, as the user wrote them.
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return "date/time"


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def error(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {problem}")

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], section: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    _where(key, section),
                    f"unknown key (expected one of: {', '.join(allowed)})",
                )

    def get(self, table: Mapping[str, Any], key: str, section: str = "") -> Any:
        if key not in table:
            raise self.error(_where(key, section), "required key is missing")
        return table[key]

    def string(self, value: Any, key: str, section: str = "") -> str:
        if not isinstance(value, str):
            raise self.error(_where(key, section), f"expected a string, got {_type_name(value)}")
        if "\0" in value:
            raise self.error(_where(key, section), "must not contain a NUL character")
        return value

    def path_value(self, table: Mapping[str, Any], key: str) -> Path:
        value = self.string(self.get(table, key), key)
        if not value:
            raise self.error(_where(key), "must not be empty")
        # Relative to the config file, not to wherever the daemon was started.
        return self.base / value

    def integer(self, value: Any, key: str, section: str) -> int:
        # bool is an int to Python but not to TOML: `port = true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(_where(key, section), f"expected an integer, got {_type_name(value)}")
        return value

    def number(self, value: Any, key: str, section: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(_where(key, section), f"expected a number, got {_type_name(value)}")
        return float(value)


def _where(key: str, section: str = "") -> str:
    return f'key "{key}"' + (f" in {section}" if section else "")


def load_config(path: Path) -> Config:
    """Parse and validate the config file at *path*; ConfigError if it is wrong.

    Checks nothing on disk besides reading the file itself: whether the
    repository exists is the daemon's business.
    """
    path = Path(path)
    # Resolve the directory (so "../etc/tb.toml" from anywhere names the right
    # place) but not the file name: relative paths in the file are relative to
    # where the operator put it, even if that is a symlink.
    path = path.absolute().parent.resolve() / path.name
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None

    p = _Parser(path)
    p.check_keys(doc, _TOP_KEYS, "")
    repository = p.path_value(doc, "repository")
    state_dir = p.path_value(doc, "state_dir")
    socket_dir = p.path_value(doc, "socket_dir")

    socket_mode = 0o660
    if "socket_mode" in doc:
        raw_mode = doc["socket_mode"]
        if not isinstance(raw_mode, str):
            # An integer is the classic trap: 0660 is not valid TOML and 660 is decimal.
            raise p.error(
                _where("socket_mode"),
                f'expected an octal string such as "0660", got {_type_name(raw_mode)}',
            )
        if not _SOCKET_MODE_RE.fullmatch(raw_mode):
            raise p.error(
                _where("socket_mode"),
                f'{raw_mode!r} is not an octal permission mode such as "0660"',
            )
        socket_mode = int(raw_mode, 8)

    log_format = "text"
    if "log_format" in doc:
        log_format = p.string(doc["log_format"], "log_format")
        if log_format not in LOG_FORMATS:
            raise p.error(
                _where("log_format"),
                f"{log_format!r} is not one of: {', '.join(LOG_FORMATS)}",
            )

    expose = _parse_expose(p, doc.get("expose"))
    limits = _parse_limits(p, doc.get("limits", {}))
    tor = _parse_tor(p, doc.get("tor", {}))
    balance = _parse_balance(p, doc["balance"], tor) if "balance" in doc else None
    return Config(
        path=path,
        repository=repository,
        state_dir=state_dir,
        socket_dir=socket_dir,
        socket_mode=socket_mode,
        log_format=log_format,
        expose=expose,
        limits=limits,
        tor=tor,
        balance=balance,
    )


def _onion(p: _Parser, raw: Mapping[str, Any], key: str) -> str:
    value = p.string(raw[key], key, "balance").lower()
    if not ONION_RE.fullmatch(value):
        raise p.error(
            _where(key, "balance"), f"{value!r} is not a v3 onion address (56 letters + .onion)"
        )
    return value


def _parse_balance(p: _Parser, raw: Any, tor: Tor) -> Balance:
    if not isinstance(raw, dict):
        raise p.error("[balance]", f"expected a table, got {_type_name(raw)}")
    p.check_keys(raw, _BALANCE_KEYS, "balance")
    if "frontend" not in raw:
        raise p.error(_where("frontend", "balance"), "required key is missing")
    frontend = _onion(p, raw, "frontend")
    if tor.onion != "torrc":
        raise p.error(
            _where("frontend", "balance"),
            'needs [tor] onion = "torrc": an Onionbalance instance needs'
            " HiddenServiceOnionBalanceInstance, which ADD_ONION cannot set",
        )
    if tor.client_auth:
        raise p.error(
            _where("frontend", "balance"),
            "cannot be used with [tor] client_auth: the frontend descriptor is not"
            " encrypted to client keys (docs/scale-out.md)",
        )
    git_owner = _onion(p, raw, "git_owner") if "git_owner" in raw else None
    if git_owner == frontend:
        raise p.error(
            _where("git_owner", "balance"),
            "must be the owner's INSTANCE onion, not the frontend (which may lead back here)",
        )
    owner_remote = None
    if "owner_remote" in raw:
        owner_remote = p.string(raw["owner_remote"], "owner_remote", "balance")
        if not _REMOTE_RE.fullmatch(owner_remote):
            raise p.error(
                _where("owner_remote", "balance"), f"{owner_remote!r} is not a remote name"
            )
    sync_interval = Balance.sync_interval
    if "sync_interval" in raw:
        sync_interval = p.number(raw["sync_interval"], "sync_interval", "balance")
        if not 0 <= sync_interval <= 86400:
            raise p.error(_where("sync_interval", "balance"), "must be between 0 and 86400 seconds")
    frontend_dir = None
    if "frontend_dir" in raw:
        value = p.string(raw["frontend_dir"], "frontend_dir", "balance")
        if not value:
            raise p.error(_where("frontend_dir", "balance"), "must not be empty")
        frontend_dir = p.base / value
    return Balance(frontend, git_owner, owner_remote, sync_interval, frontend_dir)


def _parse_tor(p: _Parser, raw: Any) -> Tor:
    if not isinstance(raw, dict):
        raise p.error("[tor]", f"expected a table, got {_type_name(raw)}")
    p.check_keys(raw, _TOR_KEYS, "tor")
    socks = Tor.socks
    if "socks" in raw:
        socks = p.string(raw["socks"], "socks", "tor")
        if not _SOCKS_RE.fullmatch(socks):
            raise p.error(
                _where("socks", "tor"),
                f'{socks!r} is neither "HOST:PORT" nor "unix:/path/to/socket"',
            )
    control = None
    if "control" in raw:
        control = p.string(raw["control"], "control", "tor")
        if not _SOCKS_RE.fullmatch(control):
            raise p.error(
                _where("control", "tor"),
                f'{control!r} is neither "HOST:PORT" nor "unix:/path/to/socket"',
            )
    password = p.string(raw["password"], "password", "tor") if "password" in raw else None
    onion = p.string(raw.get("onion", "ephemeral"), "onion", "tor")
    if onion not in _ONION_MODES:
        raise p.error(_where("onion", "tor"), f"{onion!r} is not one of: {', '.join(_ONION_MODES)}")
    hs_dir = p.path_value(raw, "hidden_service_dir") if "hidden_service_dir" in raw else None
    if onion == "torrc" and hs_dir is None:
        raise p.error(_where("hidden_service_dir", "tor"), 'required with onion = "torrc"')
    max_streams = Tor.max_streams
    if "max_streams" in raw:
        max_streams = p.integer(raw["max_streams"], "max_streams", "tor")
        if not 0 <= max_streams <= 65535:
            raise p.error(_where("max_streams", "tor"), "must be between 0 and 65535")
    export = raw.get("export_circuit_id", False)
    if not isinstance(export, bool):
        raise p.error(
            _where("export_circuit_id", "tor"), f"expected a boolean, got {_type_name(export)}"
        )
    if export and onion != "torrc":
        raise p.error(
            _where("export_circuit_id", "tor"),
            'needs onion = "torrc": tor exports circuit ids only for torrc onion services',
        )
    pow_defenses = raw.get("pow_defenses", Tor.pow_defenses)
    if not isinstance(pow_defenses, bool):
        raise p.error(
            _where("pow_defenses", "tor"), f"expected a boolean, got {_type_name(pow_defenses)}"
        )
    queue: dict[str, int | None] = {}
    for key in ("pow_queue_rate", "pow_queue_burst"):
        queue[key] = None
        if key in raw:
            queue[key] = value = p.integer(raw[key], key, "tor")
            if not 1 <= value <= _POW_QUEUE_MAX:
                raise p.error(_where(key, "tor"), f"must be between 1 and {_POW_QUEUE_MAX}")
    rate, burst = queue["pow_queue_rate"], queue["pow_queue_burst"]
    client_auth = raw.get("client_auth", Tor.client_auth)
    if not isinstance(client_auth, bool):
        raise p.error(
            _where("client_auth", "tor"), f"expected a boolean, got {_type_name(client_auth)}"
        )
    metrics_port = None
    if "metrics_port" in raw:
        metrics_port = p.string(raw["metrics_port"], "metrics_port", "tor")
        if not _LOOPBACK_PORT_RE.fullmatch(metrics_port):
            raise p.error(
                _where("metrics_port", "tor"),
                f'{metrics_port!r} is not "127.0.0.1:PORT" or "[::1]:PORT" (tor\'s MetricsPort'
                " must not listen beyond this host)",
            )
    node_circuits = Tor.node_circuits
    if "node_circuits" in raw:
        node_circuits = p.integer(raw["node_circuits"], "node_circuits", "tor")
        if not 1 <= node_circuits <= 64:
            raise p.error(_where("node_circuits", "tor"), "must be between 1 and 64")
    return Tor(
        socks,
        control,
        password,
        onion,
        hs_dir,
        max_streams,
        export,
        pow_defenses,
        rate,
        burst,
        client_auth=client_auth,
        metrics_port=metrics_port,
        node_circuits=node_circuits,
    )


def _parse_expose(p: _Parser, raw: Any) -> tuple[Expose, ...]:
    if raw is None:
        raise p.error("[[expose]]", "at least one endpoint is required")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise p.error(
            _where("expose"),
            f"expected an array of tables ([[expose]]), got {_type_name(raw)}",
        )
    if not raw:
        raise p.error("[[expose]]", "at least one endpoint is required")
    result: list[Expose] = []
    by_name: dict[str, int] = {}
    by_port: dict[int, int] = {}
    for i, table in enumerate(raw, start=1):
        section = f"[[expose]] #{i}"
        p.check_keys(table, _EXPOSE_KEYS, section)
        name = p.string(p.get(table, "name", section), "name", section)
        if not _NAME_RE.fullmatch(name):
            raise p.error(
                _where("name", section),
                f"{name!r} is not a valid endpoint name (1 to 64 of A-Z a-z 0-9 . _ -)",
            )
        if name in by_name:
            raise p.error(
                _where("name", section),
                f"duplicate endpoint name {name!r} (also in [[expose]] #{by_name[name]})",
            )
        remote = p.string(p.get(table, "remote", section), "remote", section)
        if remote != OWN_REPOSITORY and not _REMOTE_RE.fullmatch(remote):
            raise p.error(
                _where("remote", section),
                f'{remote!r} is not "." or a remote name (A-Z a-z 0-9 . _ -, not starting with -)',
            )
        port = p.integer(p.get(table, "port", section), "port", section)
        if not 1 <= port <= 65535:
            raise p.error(_where("port", section), f"{port} is not a port number (1 to 65535)")
        if port in by_port:
            raise p.error(
                _where("port", section),
                f"duplicate port {port} (also in [[expose]] #{by_port[port]})",
            )
        by_name[name] = by_port[port] = i
        result.append(Expose(name=name, remote=remote, port=port))
    return tuple(result)


def _parse_limits(p: _Parser, raw: Any) -> Limits:
    if not isinstance(raw, dict):
        raise p.error(_where("limits"), f"expected a table ([limits]), got {_type_name(raw)}")
    section = "[limits]"
    p.check_keys(raw, LIMIT_KEYS, section)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _INT_LIMITS:
            n: float = p.integer(value, key, section)
        else:
            n = p.number(value, key, section)
            # TOML has inf and nan; a timeout must be a real duration.
            if not math.isfinite(n):
                raise p.error(_where(key, section), "must be a finite number")
        if key in _ZERO_MEANS_NONE:
            if n < 0:
                raise p.error(_where(key, section), f"must be 0 (none) or more, got {value}")
        elif not n > 0:
            raise p.error(_where(key, section), f"must be greater than 0, got {value}")
        values[key] = n
    return Limits(**values)
