"""The daemon: check the host, bind one unix socket per endpoint, serve.

Some 510 lines, left whole: the serve loop, its accept, reload and drain
share one ``Running`` state; what each endpoint serves is built in
server/endpoints.py, and each connection is a server/session.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from torbridge.annex.host import StartupError, check_git_annex, repository_uuid
from torbridge.annex.locationlog import LocationLog
from torbridge.annex.query import AnnexQuery
from torbridge.config import OWN_REPOSITORY, Config, ConfigError, Expose, load_config
from torbridge.protocol.proxyline import MAX_PROXY_LINE, ProxyLineError, parse_proxy_line
from torbridge.server import notify
from torbridge.server.admission import Admission, PendingAuth
from torbridge.server.control import (
    ControlServer,
    control_socket,
    log_progress,
    metrics_socket,
    serve_control,
    serve_metrics,
)
from torbridge.server.endpoints import (
    Endpoint,
    Shared,
    branch_sync,
    build_endpoint,
    build_endpoints,
    own_endpoints,
)
from torbridge.server.fdpass import PassedPipes, accept_stream
from torbridge.server.onion import onion_ports, publish_onion
from torbridge.server.refwatch import RefWatcher
from torbridge.server.session import Session
from torbridge.server.sockets import bind_unix, make_state_dir
from torbridge.server.status import Registry
from torbridge.tokens import TokenStore
from torbridge.tor.onion import PowDefenses
from torbridge.tor.publisher import OnionPublisher
from torbridge.transport.cluster import ClusterTransport

log = logging.getLogger("torbridge")


class Running:
    """A serving daemon, as ``run_daemon`` steers it: stop accepting (drain),
    re-read the configuration (reload). Filled in by ``serve``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shared: Shared | None = None
        self.nursery: trio.Nursery | None = None  # sessions run here
        self.endpoints: dict[str, Endpoint] = {}
        self.accepting: dict[str, trio.CancelScope] = {}
        self.publisher: OnionPublisher | None = None
        self.connections = 0  # accepted and not yet closed (sessions and pre-AUTH)
        self.own_uuid = ""

    # --- drain ---------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close every endpoint's listener (its socket disappears); sessions go on."""
        for scope in self.accepting.values():
            scope.cancel()

    def opened(self) -> None:
        self.connections += 1

    def closed(self) -> None:
        self.connections -= 1

    def in_flight(self) -> int:
        """Sessions in the middle of a request (a transfer, a git service...)."""
        assert self.shared is not None
        sessions = self.shared.registry.sessions.values()
        return sum(1 for s in sessions if s.current_request is not None)

    async def drained(self) -> None:
        """Until no session is in the middle of a request (idle sessions and
        connections still before AUTH are not waited for). No deadline here:
        the caller has one."""
        while True:
            if not self.in_flight():
                return
            await trio.sleep(DRAIN_POLL)

    # --- reload --------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the config file: endpoints added, removed or changed, limits,
        tor options. Sessions keep the endpoint they started with; the onion is
        published again only when its ports change."""
        old = self.config
        try:
            new = load_config(old.path)
        except ConfigError as e:
            log.error("reload: %s; keeping the running configuration", e)
            return
        kept = {
            key: getattr(old, key)
            for key in _RESTART_KEYS
            if getattr(new, key) != getattr(old, key)
        }
        tor_kept = {
            key: getattr(old.tor, key)
            for key in _RESTART_TOR_KEYS
            if getattr(new.tor, key) != getattr(old.tor, key)
        }
        for key in [*kept, *(f"[tor] {k}" for k in tor_kept)]:
            log.warning("reload: %s changed; that takes a restart (keeping the old value)", key)
        new = dataclasses.replace(new, **kept, tor=dataclasses.replace(new.tor, **tor_kept))
        shared = self.shared
        assert shared is not None and self.nursery is not None
        shared.admission.limits = new.limits
        before = {x.name: x for x in old.expose}
        after = {x.name: x for x in new.expose}
        for name in before.keys() - after.keys():
            self.accepting.pop(name).cancel()
            del self.endpoints[name]
            log.info("reload: endpoint %s removed (its sessions go on)", name)
        for name, expose in after.items():
            if name in before and before[name] == expose and new.tor.socks == old.tor.socks:
                self.endpoints[name] = dataclasses.replace(self.endpoints[name], limits=new.limits)
                continue
            try:
                endpoint = await trio.to_thread.run_sync(
                    build_endpoint, new, expose, self.own_uuid, shared
                )
            except StartupError as e:
                log.error("reload: %s; keeping endpoint %s as it was", e, name)
                new = _keep_expose(new, before.get(name), name)
                continue
            if name in before and new.socket_path(expose) == old.socket_path(before[name]):
                self.endpoints[name] = endpoint  # same socket: new sessions get the new one
                log.info("reload: endpoint %s changed", name)
                continue
            if name in before:
                self.accepting.pop(name).cancel()
            path = new.socket_path(expose)
            try:
                listener = await bind_unix(path, new.socket_mode)
            except (OSError, StartupError) as e:
                log.error("reload: cannot listen on %s: %s; endpoint %s not added", path, e, name)
                new = _keep_expose(new, None, name)
                continue
            self.endpoints[name] = endpoint
            await self.nursery.start(self._accept, name, listener, path)
            log.info("reload: endpoint %s listening on %s", name, path)
        shared.registry.endpoints = _endpoint_rows(new, self.endpoints)
        self.config = new
        await self._retune_onion(old, new)
        log.info("configuration reloaded from %s", new.path)

    async def _retune_onion(self, old: Config, new: Config) -> None:
        publisher = self.publisher
        ports = onion_ports(new)
        if publisher is None:
            if new.tor.onion == "torrc" and ports != onion_ports(old):
                log.warning(
                    "reload: the onion's ports changed: install the new"
                    " `torbridge onion-snippet` and reload tor"
                )
            return
        publisher.max_streams = new.tor.max_streams or None
        publisher.pow_defenses = PowDefenses.of(new.tor)
        if ports == publisher.ports:
            if new.tor != old.tor:
                log.info("reload: tor options take effect at the next publication")
            return
        publisher.ports = ports
        log.info("reload: the onion's ports changed; publishing it again")
        error = await publisher.republish()
        if error:
            log.error("reload: publishing the onion again failed: %s", error)

    async def _accept(
        self,
        name: str,
        listener: trio.SocketListener,
        path: Path,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One endpoint's accept loop; sessions run in the daemon's nursery, so
        cancelling this (drain, reload) only closes the listener."""
        assert self.shared is not None and self.nursery is not None
        with trio.CancelScope() as scope:
            self.accepting[name] = scope
            task_status.started()
            try:
                await _accept_loop(
                    listener, lambda: self.endpoints[name], self.shared, self.nursery, self
                )
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _keep_expose(config: Config, old: Expose | None, name: str) -> Config:
    """``config`` with endpoint ``name`` as it was (or without it)."""
    expose = tuple((old if x.name == name else x) for x in config.expose if x.name != name or old)
    return dataclasses.replace(config, expose=tuple(x for x in expose if x is not None))


def _endpoint_rows(config: Config, endpoints: dict[str, Endpoint]) -> list[dict[str, Any]]:
    return [
        {
            "name": x.name,
            "port": x.port,
            "target": "own repository" if x.remote == OWN_REPOSITORY else f"remote {x.remote}",
            "socket": str(config.socket_path(x)),
        }
        for x in config.expose
        if x.name in endpoints
    ]


# Keys a reload cannot change (they name where things are, or how tor is reached).
_RESTART_KEYS = ("repository", "state_dir", "socket_dir", "socket_mode", "log_format")
DRAIN_POLL = 0.2
_RESTART_TOR_KEYS = ("control", "password", "onion", "hidden_service_dir", "export_circuit_id")


async def serve(
    config: Config,
    running: Running | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (SIGTERM/SIGINT/SIGHUP are handled by run_daemon)."""
    running = running or Running(config)
    check_git_annex()
    make_state_dir(config.state_dir)
    shared = Shared(
        Admission(
            TokenStore(config.state_dir),
            config.limits,
            own_endpoints(config),
        ),
        LocationLog(config.repository),
        Registry(),
        config.tor.export_circuit_id,
    )
    shared.query = AnnexQuery(config.repository, shared.location_log, config.state_dir)
    shared.refs = RefWatcher(config.repository)
    shared.registry.ref_watch = shared.refs.status
    running.shared = shared
    running.own_uuid = repository_uuid(config.repository)
    endpoints = build_endpoints(config, shared)
    running.endpoints = {e.name: e for e in endpoints}
    for e in endpoints:
        if isinstance(e.transport, ClusterTransport):
            shared.registry.clusters[e.transport.name] = e.transport.status
    shared.registry.endpoints = _endpoint_rows(config, running.endpoints)
    try:
        config.socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create socket_dir {config.socket_dir}: {e.strerror}") from e
    bound: list[Path] = []
    listeners_of_ours: list[tuple[trio.SocketListener, ControlServer]] = []
    try:
        listeners = []
        for endpoint, expose in zip(endpoints, config.expose, strict=True):
            path = config.socket_path(expose)
            try:
                listeners.append(await bind_unix(path, config.socket_mode))
            except OSError as e:
                raise StartupError(f"cannot listen on {path}: {e.strerror}") from e
            bound.append(path)
            log.info(
                "endpoint %s (repository %s) listening on %s", endpoint.name, endpoint.uuid, path
            )
        ours: list[tuple[Path, int, ControlServer]] = [
            (control_socket(config), 0o600, serve_control),
            (metrics_socket(config), 0o660, serve_metrics),
        ]
        for path, mode, server in ours:
            listeners_of_ours.append((await bind_unix(path, mode), server))
            bound.append(path)
        async with trio.open_nursery() as nursery:
            running.nursery = nursery
            nursery.start_soon(shared.location_log.run)
            nursery.start_soon(shared.refs.run)  # idle until a session watches
            nursery.start_soon(log_progress, shared.registry)
            syncing = branch_sync(config, shared)
            if syncing is not None:
                nursery.start_soon(syncing.run)
            for listener, serve_it in listeners_of_ours:
                nursery.start_soon(serve_it, listener, shared.registry)
            for endpoint, listener, path in zip(endpoints, listeners, bound, strict=False):
                await nursery.start(running._accept, endpoint.name, listener, path)
            onion, running.publisher = await publish_onion(config, nursery, shared.registry)
            shared.registry.onion = onion
            if onion:
                for expose in config.expose:
                    log.info("endpoint %s: tor-annex::%s:%d", expose.name, onion, expose.port)
            task_status.started()
    finally:
        for path in bound:
            path.unlink(missing_ok=True)
        await shared.location_log.flush()
        await shared.query.aclose()


async def _accept_loop(
    listener: trio.SocketListener,
    current: Callable[[], Endpoint],
    shared: Shared,
    sessions: trio.Nursery,
    running: Running,
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        running.opened()
        try:
            await _handle(stream, current(), shared)
        finally:
            running.closed()

    await trio.serve_listeners(handle, [listener], handler_nursery=sessions)


async def _handle(stream: trio.SocketStream, endpoint: Endpoint, shared: Shared) -> None:
    admission = shared.admission
    accepted_at = trio.current_time()
    pending = PendingAuth()
    if admission.enter_pre_auth(pending):
        log.warning("%s: too many unauthenticated connections, closing the oldest", endpoint.name)
        shared.registry.connection_refused()
    circuit = None
    client: trio.abc.Stream = stream
    try:
        with pending.evictable(), trio.fail_after(endpoint.limits.auth_timeout):
            client, initial = await accept_stream(stream)
            if shared.export_circuit_id and not isinstance(client, PassedPipes):
                circuit, initial = await _read_proxy_line(client, initial)
    except (trio.TooSlowError, OSError, ProxyLineError) as e:
        if isinstance(e, ProxyLineError):
            log.warning("%s: %s; closing", endpoint.name, e)
        admission.leave_pre_auth(pending)
        await stream.aclose()
        return
    if pending.evicted:  # before its AUTH could even be read
        admission.leave_pre_auth(pending)
        await client.aclose()
        await stream.aclose()
        return
    if circuit is not None:
        refusal = admission.circuits.admit(circuit, time.monotonic())
        if refusal is not None:
            log.warning("%s: %s; refusing a connection", endpoint.name, refusal)
            shared.registry.connection_refused()
            admission.leave_pre_auth(pending)
            await client.aclose()
            return
    try:
        await Session(client, endpoint, initial, circuit, accepted_at, pending).run()
    except Exception:
        # A bug in one session must never take the others down with it.
        log.exception("%s: session failed", endpoint.name)
    finally:
        if circuit is not None:
            admission.circuits.leave(circuit)


async def _read_proxy_line(stream: trio.abc.Stream, data: bytes) -> tuple[int, bytes]:
    """tor's PROXY line off the front of the stream: (circuit id, the bytes after it)."""
    while (line := parse_proxy_line(data)) is None:
        more = await stream.receive_some(MAX_PROXY_LINE)
        if not more:
            raise ProxyLineError("closed before the PROXY line ended")
        data += more
    return line.circuit, data[line.length :]


async def run_daemon(config: Config) -> None:
    """``serve`` until a signal: SIGHUP re-reads the config; SIGTERM drains (no
    new connections, sessions in flight get up to ``[limits] drain_timeout``)
    and stops; SIGINT, or a second SIGTERM, stops at once."""
    signals_wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*signals_wanted) as signals:
        async with trio.open_nursery() as nursery:
            running = Running(config)
            await nursery.start(serve, config, running)
            # READY only now: every endpoint listens and the onion is published.
            notify.ready(f"serving {len(config.expose)} endpoint(s)")
            nursery.start_soon(notify.watchdog_loop)
            log.info("torbridge ready")
            draining = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if draining:
                        continue
                    log.info("SIGHUP: reloading %s", running.config.path)
                    notify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
                    await running.reload()
                    notify.ready(f"serving {len(running.endpoints)} endpoint(s)")
                    continue
                if signum == signal.SIGTERM and not draining:
                    draining = True
                    grace = running.config.limits.drain_timeout
                    log.info(
                        "SIGTERM: no new connections; %d request(s) in flight get up to"
                        " %.0fs to finish",
                        running.in_flight(),
                        grace,
                    )
                    notify.stopping()
                    running.stop_accepting()
                    nursery.start_soon(_drain_then_stop, running, grace, nursery.cancel_scope)
                    continue
                log.info("%s: stopping", name)
                notify.stopping()
                nursery.cancel_scope.cancel()
                break


async def _drain_then_stop(running: Running, grace: float, scope: trio.CancelScope) -> None:
    with trio.move_on_after(grace) as waited:
        await running.drained()
    if waited.cancelled_caught:
        log.warning(
            "drain: %d request(s) still in flight after %.0fs; stopping anyway",
            running.in_flight(),
            grace,
        )
    else:
        log.info("drain: no request in flight; stopping")
    scope.cancel()
