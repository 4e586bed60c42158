"""The daemon's onion service: published through tor's control port (the
ephemeral mode, kept published by tor/publisher.py's OnionPublisher) or read
from tor's HiddenServiceDir (the torrc mode, whose authorized clients are
written before the daemon is ready).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from torbridge.config import Config
from torbridge.server.sockets import make_state_dir
from torbridge.server.status import Registry
from torbridge.tor.clientauth import ClientStore
from torbridge.tor.onion import (
    ControlSpec,
    PowDefenses,
    connect,
    publish,
    stored_onion,
    torrc_onion,
)
from torbridge.tor.publisher import OnionPublisher
from torbridge.tor.torrcclients import apply_torrc_clients

log = logging.getLogger("torbridge")


def onion_ports(config: Config) -> dict[int, Path]:
    return {expose.port: config.socket_path(expose) for expose in config.expose}


async def publish_onion(
    config: Config, nursery: trio.Nursery, registry: Registry
) -> tuple[str | None, OnionPublisher | None]:
    """Publish (or find) the onion service: its address (None without Tor),
    and the publisher that keeps it published (the ephemeral mode only)."""
    tor = config.tor
    if tor.onion == "torrc":
        assert tor.hidden_service_dir is not None
        registry.onion_state = "torrc"
        address = torrc_onion(tor.hidden_service_dir)
        if tor.client_auth:
            await _torrc_clients(config)
        return address, None
    if tor.control is None:
        return None, None
    registry.onion_state = "publishing"
    publisher = OnionPublisher(
        ControlSpec(tor.control, tor.password),
        config.state_dir,
        onion_ports(config),
        max_streams=tor.max_streams or None,
        pow_defenses=PowDefenses.of(tor),
        on_published=registry.onion_published,
        client_keys=ClientStore(config.state_dir).public_keys if tor.client_auth else None,
        metrics_port=tor.metrics_port,
    )
    registry.republish = publisher.republish
    registry.tor_health = publisher.health.snapshot
    log.info("publishing the onion service through %s", tor.control)
    onion: str = await nursery.start(publisher.run)
    return onion, publisher


async def _torrc_clients(config: Config) -> None:
    """torrc mode with client_auth: tor's authorized_clients/ must hold the
    list before the daemon is ready, or the onion stays open to anyone with
    its address until the first `client add` (no client yet: a key nobody
    holds). tor is reloaded only when a file changed."""
    tor = config.tor
    clients = ClientStore(config.state_dir).list()
    if not clients:
        log.warning(
            "client authorization is on and no client is authorized yet: nobody can reach"
            " the onion until `torbridge client add NAME`"
        )
    problem = await trio.to_thread.run_sync(
        lambda: apply_torrc_clients(tor, clients, log.info, always=False),
        abandon_on_cancel=True,
    )
    if problem:
        log.warning("client authorization: %s", problem)


def current_onion(config: Config) -> str | None:
    """The bridge's onion address, creating its key through tor the first time.

    Blocking (it may talk to tor's control port): for the CLI, not the daemon.
    """
    tor = config.tor
    if tor.onion == "torrc":
        assert tor.hidden_service_dir is not None
        return torrc_onion(tor.hidden_service_dir)
    if tor.control is None:
        return None
    onion = stored_onion(config.state_dir)
    if onion is None:
        make_state_dir(config.state_dir)
        controller = connect(ControlSpec(tor.control, tor.password))
        try:
            # A moment's service, to learn the address: no defenses needed.
            onion = publish(
                controller,
                config.state_dir,
                onion_ports(config),
                None,
                60,
                wait=False,
                pow_defenses=PowDefenses(enabled=False),
            )
            controller.remove_ephemeral_hidden_service(onion.removesuffix(".onion"))
        finally:
            controller.close()
    return onion
