"""``torbridge init``: a first config, written from what the repository says.

It exposes the proxy's own repository, every remote the operator marked
with ``remote.NAME.annex-proxy=true`` (git-annex's own switch) and every
cluster the repository is a gateway for (``git annex initcluster``), each on
its own onion-service port. The text is ``dump_config``'s, after a header that
says what to do next; it is checked by loading it back before it is returned.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from torbridge.annex.host import StartupError, repository_uuid
from torbridge.annex.remotes import read_cluster_names, read_remotes
from torbridge.config import (
    OWN_REPOSITORY,
    Config,
    ConfigError,
    Expose,
    Tor,
    dump_config,
    load_config,
)

DEFAULT_STATE_DIR = Path("/var/lib/torbridge")
DEFAULT_SOCKET_DIR = Path("/run/torbridge")
DEFAULT_CONFIG_PATH = Path("/etc/torbridge/torbridge.toml")
FIRST_PORT = 5000

# What the config accepts (see torbridge.config): endpoint names and remote names.
_NAME_MAX = 64
_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_REMOTE_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


class InitError(ConfigError):
    """No config can be written; one line saying why and what to do."""


def init_config(
    repository: Path,
    *,
    state_dir: Path = DEFAULT_STATE_DIR,
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    tor_control: str | None = None,
) -> str:
    """A commented TOML config for the git-annex repository at *repository*.

    Endpoints: the repository itself on port 5000 (named after its
    directory), then each proxied remote in name order on 5001, 5002, ...
    Paths are made absolute. InitError if *repository* is not a git-annex
    repository or the result would not load.
    """
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise InitError(f"{repository}: no such directory")
    try:
        repository_uuid(repository)
    except StartupError as e:
        raise InitError(str(e)) from None

    remotes = read_remotes(repository)
    proxied = sorted(name for name, remote in remotes.items() if remote.proxy)
    notes: list[str] = []
    used: set[str] = set()
    expose = [Expose(_unique(_endpoint_name(repository.name), used), OWN_REPOSITORY, FIRST_PORT)]
    for name in proxied:
        if not _REMOTE_RE.fullmatch(name):
            notes.append(f"remote {name!r} is proxied, but torbridge cannot expose that name")
            continue
        if not remotes[name].uuid:
            notes.append(
                f"remote {name!r} has no annex-uuid yet: `git annex sync {name}` before starting"
            )
        port = FIRST_PORT + len(expose)
        expose.append(Expose(_unique(_endpoint_name(name), used), name, port))
    for name in sorted(read_cluster_names(repository)):
        if not _REMOTE_RE.fullmatch(name):
            notes.append(f"cluster {name!r}: torbridge cannot expose that name")
            continue
        port = FIRST_PORT + len(expose)
        expose.append(Expose(_unique(_endpoint_name(name), used), name, port))

    config = Config(
        path=DEFAULT_CONFIG_PATH,
        repository=repository,
        state_dir=Path(state_dir).absolute(),
        socket_dir=Path(socket_dir).absolute(),
        socket_mode=0o660,
        log_format="text",
        expose=tuple(expose),
        tor=Tor(control=tor_control),
    )
    text = _header(config, notes) + dump_config(config)
    _check_loads(text)
    return text


def _endpoint_name(text: str) -> str:
    name = _NOT_NAME_CHARS.sub("-", text).strip("-")[:_NAME_MAX]
    return name or "annex"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        suffix = f"-{n}"
        candidate, n = name[: _NAME_MAX - len(suffix)] + suffix, n + 1
    used.add(candidate)
    return candidate


def _header(config: Config, notes: list[str]) -> str:
    own, *others = config.expose
    lines = [
        "# Written by `torbridge init` for the git-annex repository",
        f"#   {config.repository}",
        f'# Endpoint "{own.name}" (port {own.port}) is that repository itself;'
        + (
            " the others are its remotes marked"
            if others
            else " no remote is marked with remote.NAME.annex-proxy=true, so it is the only one."
        ),
    ]
    if others:
        lines.append(
            "# with remote.NAME.annex-proxy=true, in name order, then its clusters"
            " (docs/clusters.md)."
        )
    lines += [
        "#",
        "# Next steps:",
        f"#   1. Review it and install it as {DEFAULT_CONFIG_PATH}",
        "#      (owner root, group torbridge, mode 0640).",
        "#   2. Check the host:        sudo -u torbridge torbridge doctor",
        "#   3. Start the service:     systemctl enable --now torbridge",
        "#   4. Let a client in:       torbridge token add NAME   (prints its addresses)",
        "#      and on the client:     echo 'ADDRESS' | git annex p2p --link --name NAME",
        "# To expose another remote later: git config remote.NAME.annex-proxy true, then add",
        "# an [[expose]] table with the next free port.",
    ]
    if config.tor.control is None:
        lines += [
            "#",
            "# [tor] control is not set: the endpoints are local unix sockets only. To publish",
            '# them as an onion service, set control = "unix:/run/tor/control" (Debian\'s tor).',
        ]
    if notes:
        lines += ["#", "# Before starting:"] + [f"#   - {note}" for note in notes]
    return "\n".join(lines) + "\n#\n"


def _check_loads(text: str) -> None:
    """Load *text* back as a config file; InitError (without the temp path) if it fails."""
    with tempfile.TemporaryDirectory(prefix="torbridge-init-") as tmp:
        path = Path(tmp).resolve() / "torbridge.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as e:
            problem = str(e).removeprefix(f"{path}: ")
            raise InitError(f"the config would not load: {problem}") from None
