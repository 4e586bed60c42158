"""Command line: ``torbridge [--config PATH] serve | token ... | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import trio

from torbridge import __version__
from torbridge.annex.host import StartupError
from torbridge.annex.remotes import RemoteError, parse_remote_log, read_annex_log, read_remotes
from torbridge.config import Config, ConfigError, load_config
from torbridge.ops.balance import BalanceError
from torbridge.ops.clients import client_command
from torbridge.ops.doctor import doctor
from torbridge.ops.init import init_config
from torbridge.ops.onionwait import PUBLISHING, onion_warning
from torbridge.protocol.permissions import GIT_LABELS, MODES, GitAccess
from torbridge.server.control import control_socket, query
from torbridge.server.daemon import run_daemon
from torbridge.server.endpoints import own_endpoints
from torbridge.server.onion import current_onion, onion_ports
from torbridge.server.status import render
from torbridge.tokens import TokenError, TokenInfo, TokenStore
from torbridge.tor.clientauth import ClientAuthError
from torbridge.tor.onion import PowDefenses, TorError, stored_onion, torrc_snippet

DEFAULT_CONFIG = Path("/etc/torbridge/torbridge.toml")
# Errors that are the operator's to fix: one line each, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    StartupError,
    TokenError,
    TorError,
    ClientAuthError,
    BalanceError,
)


def _leaves(error: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, as trio's nurseries raise them."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


def addresses(
    config: Config, token: str, endpoints: tuple[str, ...] | None, onion: str | None
) -> list[str]:
    """One address per endpoint the token reaches, as `git annex p2p --link` reads them.

    With Tor, tor-annex addresses on the bridge's onion; without, the generic
    transport to the endpoint's socket (for clients on the proxy host itself).
    """
    return [
        f"tor-annex::{onion}:{expose.port}:{token}"
        if onion
        else f"p2p-annex::torbridge:{config.socket_path(expose)}:{token}"
        for expose in config.expose
        if endpoints is None or expose.name in endpoints
    ]


def published_special_endpoints(
    config: Config, endpoints: tuple[str, ...] | None
) -> list[tuple[str, str]]:
    """(endpoint, remote) for each endpoint whose UUID has a remote.log entry.

    A client that merges the proxy's git-annex branch finds that entry and,
    since git-annex 10.20261026, refuses the remote it linked to such an
    endpoint until it is verified (docs/client-guide.md). Anything that
    cannot be read here just gets no hint: the daemon reports it.
    """
    try:
        published = parse_remote_log(read_annex_log(config.repository, "remote.log"))
        remotes = read_remotes(config.repository)
    except (OSError, RemoteError):
        return []
    found = []
    for expose in config.expose:
        if endpoints is not None and expose.name not in endpoints:
            continue
        remote = remotes.get(expose.remote)
        if remote is not None and remote.uuid in published:
            found.append((expose.name, expose.remote))
    return found


def verification_hint(endpoint: str, remote: str) -> str:
    """What `token add` tells the operator to pass on for such an endpoint."""
    return (
        f"endpoint {endpoint!r} is the proxy's special remote {remote!r}: a client that"
        " merges the proxy's git-annex branch must mark it verified once, after linking it"
        f" (with --name {endpoint}; use the name it chose otherwise):\n"
        f"  git config remote.{endpoint}.annex-verified verified\n"
        "  (safe: through torbridge the remote runs on the proxy, never on the client;"
        " see the client guide)"
    )


_JOURNAL_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_JOURNAL_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        )


def setup_logging(level: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald stamps lines itself; a <priority> prefix lets it grade them.
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("stem").setLevel(logging.WARNING)  # it logs every command at DEBUG
    # ... and stem resets its logger's level when it is first imported (lazily, later).
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith("stem"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torbridge", description="git-annex P2P proxy behind a Tor onion service"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the TOML config")
    p.add_argument("-v", "--verbose", action="store_true", help="log every relayed request")
    p.add_argument("--version", action="version", version=f"torbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon in the foreground")
    sub.add_parser(
        "onion-snippet", help='print the torrc lines for [tor] onion = "torrc" (torrc.d)'
    )
    token = sub.add_parser("token", help="manage client tokens").add_subparsers(
        dest="token_command", required=True
    )
    add = token.add_parser("add", help="create a token and print its addresses")
    add.add_argument("name")
    add.add_argument("--mode", choices=MODES, default="rw")
    add.add_argument(
        "--endpoint", action="append", help="limit the token to this endpoint (repeatable)"
    )
    add.add_argument(
        "--git",
        choices=GIT_LABELS,
        help="access to the proxy's git repository (default: write for rw, read for append"
        " and ro, read at most for a token limited to endpoints other than the proxy's own);"
        " rewrite also allows force-pushing and deleting main, git-annex and synced/*",
    )
    add.add_argument(
        "--no-wait",
        action="store_true",
        help="print the addresses at once, even before tor has published the onion",
    )
    token.add_parser(
        "list", help="list tokens (name, mode, git access, created, endpoints; no secrets)"
    )
    revoke = token.add_parser("revoke", help="revoke a token, at once")
    revoke.add_argument("name")
    token.add_parser(
        "export", help="print the token store without secrets (hashes), for other hosts"
    )
    token.add_parser("import", help="replace the token store with an exported one, read from stdin")
    balance = sub.add_parser(
        "balance", help="several hosts behind one Onionbalance address (docs/scale-out.md)"
    ).add_subparsers(dest="balance_command", required=True)
    balance.add_parser(
        "instance-config", help="print this instance's ob_config (for its HiddenServiceDir)"
    )
    balance.add_parser(
        "instance", help="print this instance's line for `balance frontend` (no secret)"
    )
    frontend = balance.add_parser(
        "frontend",
        help="make the frontend key (0600) and print its address; with instance lines,"
        " write Onionbalance's config.yaml",
    )
    frontend.add_argument("--dir", type=Path, required=True, help="the frontend's directory")
    frontend.add_argument("instances", nargs="*", help="lines of `torbridge balance instance`")
    frontend.add_argument(
        "--drain",
        metavar="ONION",
        help="rewrite the configuration without this instance (then restart onionbalance,"
        " keep the instance serving until its clients have moved, then stop it)",
    )
    run = balance.add_parser("run", help="run Onionbalance on a `balance frontend` directory")
    run.add_argument("--dir", type=Path, required=True)
    run.add_argument("--control", required=True, help='its tor\'s control port, "HOST:PORT"')
    run.add_argument(
        "--testnet", action="store_true", help="timings for a private test network only"
    )
    client = sub.add_parser(
        "client", help="onion client authorization ([tor] client_auth): which tors may connect"
    ).add_subparsers(dest="client_command", required=True)
    client.add_parser(
        "add", help="authorize a client machine's tor; prints its key, once"
    ).add_argument("name")
    client.add_parser("list", help="authorized clients (names, dates, public keys)")
    client.add_parser(
        "revoke", help="remove a client's key; the onion is published again"
    ).add_argument("name")
    testnet = sub.add_parser(
        "testnet", help="run a private Tor network on 127.0.0.1 (tests and demos)"
    )
    testnet.add_argument("--dir", type=Path, help="where to keep it (default: a temp dir)")
    testnet.add_argument(
        "--relays",
        type=int,
        default=2,
        help="relays besides the 3 authorities (4 for Onionbalance: it needs 7 HSDirs)",
    )
    status = sub.add_parser("status", help="what the running daemon is doing")
    status.add_argument("--json", action="store_true", help="the raw snapshot")
    status.add_argument("--metrics", action="store_true", help="Prometheus text")
    sub.add_parser("doctor", help="check the host and the config; one line each, with the fix")
    init = sub.add_parser("init", help="print a commented config for a repository")
    init.add_argument("repository", type=Path)
    init.add_argument("--state-dir", type=Path, default=Path("/var/lib/torbridge"))
    init.add_argument("--socket-dir", type=Path, default=Path("/run/torbridge"))
    init.add_argument("--tor-control", help='e.g. "unix:/run/tor/control"')
    demo = sub.add_parser("demo", help="set up a demo proxy repository and serve it")
    demo.add_argument("--dir", type=Path, help="where to put the demo (default: a temp dir)")
    demo.add_argument(
        "--check", action="store_true", help="exit after the self-check instead of serving"
    )
    demo.add_argument("--no-tor", action="store_true", help="the local socket only")
    return p


def _token_command(config: Config, args: argparse.Namespace) -> int:
    store = TokenStore(config.state_dir)
    if args.token_command == "add":
        for name in args.endpoint or ():
            config.endpoint(name)  # KeyError -> reported by main
        # No address handed out before it works (or without saying so); and a
        # daemon publishing for the first time makes the key, not this command.
        warning = onion_warning(config, not args.no_wait, _say)
        if warning == PUBLISHING and stored_onion(config.state_dir) is None:
            raise TokenError(
                "the daemon is publishing the onion for the first time and its address is"
                " not known yet: run token add again without --no-wait"
            )
        onion = current_onion(config)  # before the token: a Tor problem leaves nothing made
        if onion is not None and config.public_onion_override is not None:
            onion = config.public_onion_override  # clients link the frontend, never an instance
        git = None if args.git is None else GitAccess.parse(args.git)
        token = store.add(args.name, args.mode, args.endpoint, git)
        endpoints = tuple(args.endpoint) if args.endpoint else None
        for line in addresses(config, token, endpoints, onion):
            print(line, flush=True)
        if warning:
            print(f"torbridge: warning: {warning}", file=sys.stderr)
        info = TokenInfo(args.name, args.mode, "", endpoints, git)
        print(
            f"token {args.name!r} ({args.mode}, git {_git_text(config, info)}) created;"
            " it is shown only this once.\n"
            "On a client: echo 'ADDRESS' | git annex p2p --link --name NAME",
            file=sys.stderr,
        )
        for endpoint, remote in published_special_endpoints(config, endpoints):
            print(verification_hint(endpoint, remote), file=sys.stderr)
    elif args.token_command == "list":
        for info in store.list():
            where = ",".join(info.endpoints) if info.endpoints else "all endpoints"
            access = _git_text(config, info)
            print(f"{info.name}\t{info.mode}\tgit={access}\t{info.created}\t{where}")
    elif args.token_command == "export":
        sys.stdout.buffer.write(store.export())
    elif args.token_command == "import":
        count = store.import_(sys.stdin.buffer.read())
        print(f"token store replaced: {count} tokens", file=sys.stderr)
    else:
        store.revoke(args.name)
        print(f"token {args.name!r} revoked", file=sys.stderr)
    return 0


def _balance_command(args: argparse.Namespace) -> int:
    from torbridge.ops import balance

    if args.balance_command == "frontend":
        instances = [balance.Instance.parse(line) for line in args.instances]
        if args.drain is not None:
            if instances:
                raise balance.BalanceError("--drain takes no instance lines")
            address, stay = balance.drain(args.dir, args.drain)
            print(f"frontend: {address}")
            print(
                f"wrote {args.dir / balance.CONFIG_FILE} ({len(stay)} instances):"
                " restart onionbalance on it, keep the drained instance serving until"
                " its log shows no new sessions, then stop it (docs/scale-out.md)",
                file=sys.stderr,
            )
        elif instances:
            address = balance.write_frontend_config(args.dir, instances)
            print(f"frontend: {address}")
            print(
                f"wrote {args.dir / balance.CONFIG_FILE} ({len(instances)} instances)",
                file=sys.stderr,
            )
        else:
            address, made = balance.ensure_frontend_key(args.dir)
            print(f"frontend: {address}")
            key = args.dir / balance.KEY_FILE
            print(f"{'made' if made else 'kept'} {key} (0600)", file=sys.stderr)
        return 0
    if args.balance_command == "run":
        from torbridge.ops.frontend import run_frontend

        return run_frontend(args.dir, args.control, testnet=args.testnet)
    config = load_config(args.config)
    if config.balance is None:
        raise balance.BalanceError("no [balance] section in the config")
    if args.balance_command == "instance-config":
        print(balance.ob_config_text(config.balance.frontend), end="")
        return 0
    onion = current_onion(config)
    assert onion is not None  # torrc mode: read from hostname, or TorError
    print(balance.instance_of(config, onion).line())
    return 0


def _git_text(config: Config, info: TokenInfo) -> str:
    """A token's git access, with "(default)" when the operator gave none."""
    level = info.git_access(own_endpoints(config)).label
    return level if info.git is not None else f"{level}(default)"


def _say(text: str) -> None:
    print(f"torbridge: {text}", file=sys.stderr, flush=True)


def _status(config: Config, args: argparse.Namespace) -> int:
    path = control_socket(config)
    try:
        text = query(path, "metrics" if args.metrics else "status")
    except OSError as e:
        print(
            f"torbridge: cannot reach the daemon at {path}: {e.strerror}; is it running?",
            file=sys.stderr,
        )
        return 1
    print(text if args.json or args.metrics else render(json.loads(text)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    try:
        if args.command == "demo":
            from torbridge.demo import run_demo

            setup_logging(level)
            return run_demo(args.dir, check_only=args.check, use_tor=not args.no_tor)
        if args.command == "doctor":  # a config that does not load is one of its findings
            return doctor(args.config)
        if args.command == "init":
            text = init_config(
                args.repository.resolve(),
                state_dir=args.state_dir,
                socket_dir=args.socket_dir,
                tor_control=args.tor_control,
            )
            print(text, end="")
            return 0
        if args.command == "testnet":
            from torbridge.testnet.cli import cli_main

            setup_logging(level)
            return cli_main(args.dir, relays=args.relays)
        if args.command == "balance":
            return _balance_command(args)
        config = load_config(args.config)
        setup_logging(level, config.log_format)
        if args.command == "serve":
            trio.run(run_daemon, config)
            return 0
        if args.command == "status":
            return _status(config, args)
        if args.command == "client":
            return client_command(config, args.client_command, getattr(args, "name", None), _say)
        if args.command == "onion-snippet":
            hs_dir = config.tor.hidden_service_dir or Path("/var/lib/tor/torbridge")
            snippet = torrc_snippet(
                hs_dir,
                onion_ports(config),
                config.tor.max_streams,
                config.tor.export_circuit_id,
                PowDefenses.of(config.tor),
                onionbalance_instance=config.balance is not None,
            )
            print(snippet, end="")
            return 0
        return _token_command(config, args)
    except USER_ERRORS as e:
        print(f"torbridge: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(leaf, USER_ERRORS) for leaf in leaves):
            raise
        for leaf in leaves:
            print(f"torbridge: {leaf}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"torbridge: no endpoint named {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
