"""``torbridge client add | list | revoke``: onion client authorization (v3).

The keys are made and kept by torbridge.tor.clientauth; here they are put
to work: the running daemon publishes its ephemeral onion again with the
new list (and answers once tor has it), or, in torrc mode, tor's
``authorized_clients/`` directory is rewritten and tor reloaded.
"""

from __future__ import annotations

from collections.abc import Callable

from torbridge.config import Config
from torbridge.ops.onionwait import onion_warning
from torbridge.server.control import control_socket, query
from torbridge.server.onion import current_onion
from torbridge.tor.clientauth import (
    ClientAuthError,
    ClientStore,
    KeyPair,
    auth_private_line,
    control_command,
    max_clients,
)
from torbridge.tor.torrcclients import apply_torrc_clients

REPUBLISH_TIMEOUT = 200.0  # the daemon waits up to 120 s for tor's upload


def client_command(
    config: Config, command: str, name: str | None, say: Callable[[str], None]
) -> int:
    store = ClientStore(config.state_dir)
    if command == "list":
        for client in store.list():
            print(f"{client.name}\t{client.created}\t{client.public}")
        return 0
    assert name is not None
    if not config.tor.client_auth:
        raise ClientAuthError(
            "client authorization is off: set client_auth = true in [tor] and restart"
            " torbridge (then nobody but the clients you add can reach the onion)"
        )
    if command == "add":
        # A daemon publishing for the first time makes the onion's key: wait for it.
        onion_warning(config, True, say)
        onion = current_onion(config)
        if onion is None:
            raise ClientAuthError("no onion service is configured ([tor] control or onion)")
        keys = KeyPair.new()
        store.add(name, keys.public_base32, max_clients())
        problem = _apply(config, store, say)
        print(
            f"# Client authorization for {name!r}: give this to that machine's tor. It is"
            " shown only this once.\n"
            f"# Either put this line in <ClientOnionAuthDir>/{name}.auth_private (mode 0600,"
            " owned by the tor user; set ClientOnionAuthDir in its torrc) and reload that tor:\n"
            f"{auth_private_line(onion, keys.private)}\n"
            "# or send this on that tor's control port (add Flags=Permanent to keep it in"
            " ClientOnionAuthDir):\n"
            f"{control_command(onion, keys.private, name)}"
        )
        if problem:
            say(f"warning: {problem}")
        else:
            say(f"client {name!r} authorized; the onion is published with its key")
    else:
        store.revoke(name)
        problem = _apply(config, store, say, cut=True)
        if problem:
            say(f"warning: {problem}")
        else:
            say(
                f"client {name!r} revoked; the onion is published without its key and its"
                " rendezvous circuits are closed (running sessions over Tor were cut)"
            )
            if config.tor.onion == "torrc":
                say(
                    "note: a reload keeps tor's introduction points, so a client tor that kept"
                    " the old descriptor can still introduce itself; restart tor"
                    " (`systemctl restart tor`) to rotate them"
                )
    return 0


def _apply(
    config: Config, store: ClientStore, say: Callable[[str], None], cut: bool = False
) -> str | None:
    """Make tor publish the current list; what went wrong (None: done). ``cut``:
    close the service's rendezvous circuits too, or a revoked client that is
    connected keeps getting in."""
    tor = config.tor
    if tor.onion == "torrc":
        return apply_torrc_clients(tor, store.list(), say, cut=cut)
    try:
        command = "republish cut" if cut else "republish"
        reply = query(control_socket(config), command, timeout=REPUBLISH_TIMEOUT)
    except OSError:
        return "the daemon is not running: it publishes with this list when it starts"
    if reply.strip() != "published":
        return f"the daemon could not publish the onion again: {reply.strip()}"
    return None
