"""Writing a configuration back out as TOML (torbridge init)."""

from __future__ import annotations

from torbridge.config.model import Config
from torbridge.config.parse import LIMIT_KEYS


def _toml_string(s: str) -> str:
    """A TOML basic string holding exactly *s*."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            # A surrogate-escaped byte from a non-UTF-8 path: TOML is UTF-8 only.
            raise ValueError(f"{s!r} cannot be written in a TOML file (not UTF-8)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_number(value: float) -> str:
    # repr of a float is valid TOML (10.0, 1e-05); whole seconds read better as 10.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


_LIMIT_COMMENTS = {
    "auth_timeout": "seconds from accepting a connection to its AUTH",
    "idle_timeout": "seconds of client silence between requests (0 = none)",
    "peer_idle": "seconds before an idle session's peer is closed (reopened on demand)",
    "peer_timeout": "seconds a peer may keep a request waiting (0 = no limit)",
    "stall_timeout": "seconds a client may stop mid-DATA or mid-CONNECT (0 = no limit)",
    "node_connect_timeout": "seconds to reach a cluster node (connect, AUTH, VERSION)",
    "max_unauthenticated": "connections not yet past AUTH, all endpoints together",
    "max_sessions_per_token": "concurrent sessions of one token",
    "max_sessions": "authenticated sessions in all (~16 KiB quiet, ~10 MiB active)",
    "session_wait": "seconds a valid token waits for a session slot at a cap",
    "max_per_circuit": "connections per Tor circuit (with [tor] export_circuit_id)",
    "drain_timeout": "on SIGTERM, seconds the sessions in flight get to finish",
}


def dump_config(cfg: Config) -> str:
    """A commented TOML text that ``load_config`` reads back as *cfg* (paths absolute)."""
    lines = [
        "# torbridge configuration",
        "",
        "# The proxy's own git-annex repository.",
        f"repository = {_toml_string(str(cfg.repository))}",
        "# Hashed tokens and keys; created with mode 0700.",
        f"state_dir = {_toml_string(str(cfg.state_dir))}",
        "# One socket per endpoint: <socket_dir>/<name>.sock",
        f"socket_dir = {_toml_string(str(cfg.socket_dir))}",
        "# Permissions of the sockets, as an octal string.",
        f'socket_mode = "{cfg.socket_mode:04o}"',
        '# "text" or "json"',
        f"log_format = {_toml_string(cfg.log_format)}",
    ]
    for e in cfg.expose:
        lines += [
            "",
            "[[expose]]",
            f"name = {_toml_string(e.name)}",
            '# "." is the proxy\'s own repository; otherwise a git remote or cluster name.',
            f"remote = {_toml_string(e.remote)}",
            "# The onion service's virtual port.",
            f"port = {e.port}",
        ]
    lines += [
        "",
        "[tor]",
        '# tor\'s SocksPort, for tor-annex nodes: "HOST:PORT" or "unix:/path".',
        f"socks = {_toml_string(cfg.tor.socks)}",
        "# tor's control port, to publish the onion service (unset: no onion).",
        (
            f"control = {_toml_string(cfg.tor.control)}"
            if cfg.tor.control
            else '# control = "unix:/run/tor/control"'
        ),
        '# "ephemeral" (ADD_ONION, key kept in state_dir) or "torrc"',
        f"onion = {_toml_string(cfg.tor.onion)}",
        f"max_streams = {cfg.tor.max_streams}",
    ]
    if cfg.tor.password is not None:
        lines.append(f"password = {_toml_string(cfg.tor.password)}")
    if cfg.tor.hidden_service_dir is not None:
        lines.append(f"hidden_service_dir = {_toml_string(str(cfg.tor.hidden_service_dir))}")
    if cfg.tor.export_circuit_id:
        lines.append("export_circuit_id = true")
    lines.append("# tor's proof-of-work defense against introduction floods.")
    lines.append(f"pow_defenses = {'true' if cfg.tor.pow_defenses else 'false'}")
    for key in ("pow_queue_rate", "pow_queue_burst"):
        value = getattr(cfg.tor, key)
        lines.append(f"{key} = {value}" if value is not None else f"# {key} = (tor's default)")
    lines.append("# Onion client authorization: `torbridge client add NAME` per client machine.")
    lines.append(f"client_auth = {'true' if cfg.tor.client_auth else 'false'}")
    lines.append("# tor's MetricsPort, for the proof-of-work figures in `torbridge status`.")
    lines.append(
        f"metrics_port = {_toml_string(cfg.tor.metrics_port)}"
        if cfg.tor.metrics_port
        else '# metrics_port = "127.0.0.1:9035"'
    )
    lines.append("# Circuits that parallel sessions to one tor-annex node spread over.")
    lines.append(f"node_circuits = {cfg.tor.node_circuits}")
    lines += ["", "[limits]"]
    for key in LIMIT_KEYS:
        value = getattr(cfg.limits, key)
        lines.append(f"{key} = {_toml_number(value)}  # {_LIMIT_COMMENTS[key]}")
    return "\n".join(lines) + "\n"
