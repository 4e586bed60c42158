"""Client authorization in torrc mode: tor's ``authorized_clients/`` directory.

In torrc mode tor owns the onion service; torbridge writes one
``NAME.auth`` file per client (``torbridge-nobody.auth`` when there is
none: an empty directory turns authorization off) and, with ``[tor]
control`` set, reloads tor and waits for the new descriptor's upload. Used
by ``torbridge client add|revoke`` and by the daemon at start (so that
``client_auth = true`` holds before the first ``client add``). Blocking.
"""

from __future__ import annotations

from collections.abc import Callable

from torbridge.config import Tor
from torbridge.tor.clientauth import (
    NOBODY_FILE,
    AuthorizedClient,
    authorized_clients_line,
    sync_authorized_clients,
)
from torbridge.tor.onion import ControlSpec, TorError, connect, reload_for_clients, torrc_onion

RELOAD_TIMEOUT = 120.0  # reload -> the new descriptor uploaded


def apply_torrc_clients(
    tor: Tor,
    clients: list[AuthorizedClient],
    say: Callable[[str], None],
    *,
    cut: bool = False,
    always: bool = True,
    timeout: float = RELOAD_TIMEOUT,
) -> str | None:
    """Write ``authorized_clients/`` and reload tor; what went wrong, for the
    operator (None: tor has the new descriptor). ``always``: reload even if
    no file changed (``client add|revoke``); otherwise only on a change (the
    daemon's start). ``cut``: close the rendezvous circuits too."""
    assert tor.hidden_service_dir is not None
    try:
        changed = sync_authorized_clients(tor.hidden_service_dir, clients)
    except PermissionError:
        directory = tor.hidden_service_dir / "authorized_clients"
        files = [(f"{c.name}.auth", authorized_clients_line(c.public)) for c in clients]
        lines = "\n".join(f"  echo '{line}' > {directory / file}" for file, line in files)
        return (
            f"torbridge may not write {directory}: as root, make it hold exactly these"
            f" files (remove the others{', and ' + NOBODY_FILE if clients else ''}),"
            f" chown them to tor's user, then `systemctl reload tor`:\n{lines}"
        )
    if not changed and not always:
        return None
    if tor.control is None:
        return "reload tor now (`systemctl reload tor`): it reads authorized_clients/ then" + (
            "; a revoked client that is connected stays in until tor restarts" if cut else ""
        )
    try:
        controller = connect(ControlSpec(tor.control, tor.password))
    except TorError as e:
        return f"{e}; reload tor by hand (`systemctl reload tor`)"
    try:
        service_id = torrc_onion(tor.hidden_service_dir).removesuffix(".onion")
        reload_for_clients(controller, service_id, cut, timeout)
    except TorError as e:
        return f"tor was reloaded but: {e}"
    finally:
        controller.close()
    say("tor reloaded and uploaded the onion's descriptor with the new client list")
    return None
