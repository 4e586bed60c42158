"""The daemon: check the host, bind one unix socket per endpoint, serve."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from torbridge.config import OWN_REPOSITORY, Config, Expose
from torbridge.ops import notify
from torbridge.protocol.cluster import NodeRef
from torbridge.protocol.proxyline import MAX_PROXY_LINE, ProxyLineError, parse_proxy_line
from torbridge.remotes import (
    Remote,
    RemoteError,
    TorAddress,
    annex_costs,
    parse_p2p_address,
    parse_proxy_log,
    proxied_remote,
    read_cluster,
    read_cluster_names,
    read_token,
    remote_cost,
)
from torbridge.server.admission import Admission
from torbridge.server.annexquery import AnnexQuery
from torbridge.server.control import (
    ControlServer,
    control_socket,
    log_progress,
    metrics_socket,
    serve_control,
    serve_metrics,
)
from torbridge.server.fdpass import PassedPipes, accept_stream
from torbridge.server.locationlog import LocationLog
from torbridge.server.refwatch import RefWatcher
from torbridge.server.session import Endpoint, PendingAuth, Session
from torbridge.server.status import Registry
from torbridge.tokens import TokenStore
from torbridge.tor.onion import (
    ControlSpec,
    OnionPublisher,
    PowDefenses,
    connect,
    publish,
    stored_onion,
    torrc_onion,
)
from torbridge.transport.base import Transport
from torbridge.transport.cluster import ClusterNode, ClusterTransport
from torbridge.transport.network import P2PNetTransport, TorAnnexTransport
from torbridge.transport.process import AnnexShellTransport

log = logging.getLogger("torbridge")

MIN_GIT_ANNEX = "10.20240701"  # the first release with P2P protocol v2-v4 proxies
SOCKET_BACKLOG = 128
_UNIX_PATH_MAX = 107


class StartupError(Exception):
    """The daemon cannot start; the text is one line saying why and what to do."""


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def check_git_annex() -> str:
    """The installed git-annex version, if it is new enough."""
    for program in ("git", "git-annex", "git-annex-shell"):
        if shutil.which(program) is None:
            raise StartupError(
                f"{program} not found on PATH: install git-annex {MIN_GIT_ANNEX} or newer"
                " (for instance `pip install git-annex`)"
            )
    version = _run(["git-annex", "version", "--raw"]).stdout.strip()
    if _version_key(version) < _version_key(MIN_GIT_ANNEX):
        raise StartupError(
            f"git-annex {version or '?'} is too old: {MIN_GIT_ANNEX} or newer needed"
        )
    return version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("-")[0])[:2]) or (0,)


def repository_uuid(repository: Path) -> str:
    """The annex UUID of the proxy's own repository."""
    if not repository.is_dir():
        raise StartupError(f"repository {repository} does not exist")
    result = _run(["git", "config", "--get", "annex.uuid"], cwd=repository)
    if "dubious ownership" in result.stderr:
        raise StartupError(
            f"git refuses {repository}: it belongs to another user; run torbridge as the"
            " repository's owner (e.g. sudo -u torbridge)"
        )
    uuid = result.stdout.strip()
    if result.returncode != 0 or not uuid:
        raise StartupError(
            f"{repository} is not a git-annex repository (no annex.uuid): run `git annex init`"
        )
    return uuid


@dataclass
class Shared:
    """What all the endpoints of one daemon share."""

    admission: Admission
    location_log: LocationLog
    registry: Registry
    export_circuit_id: bool = False  # tor prepends a PROXY line with the circuit id
    query: AnnexQuery | None = None  # the location log and preferred content, for clusters
    refs: RefWatcher | None = None  # the proxy repository's refs, for NOTIFYCHANGE


def own_endpoints(config: Config) -> list[str]:
    """The endpoints that serve the proxy's own repository (``remote = "."``): a
    token limited to other endpoints gets read access to git at most."""
    return [x.name for x in config.expose if x.remote == OWN_REPOSITORY]


def build_endpoints(config: Config, shared: Shared) -> list[Endpoint]:
    own_uuid = repository_uuid(config.repository)
    return [_build_endpoint(config, expose, own_uuid, shared) for expose in config.expose]


def _build_endpoint(config: Config, expose: Expose, own_uuid: str, shared: Shared) -> Endpoint:
    def endpoint(uuid: str, transport: Transport, records: bool = False) -> Endpoint:
        return Endpoint(
            expose.name,
            uuid,
            transport,
            config.repository,
            shared.admission,
            config.limits,
            shared.location_log if records else None,
            shared.registry,
        )

    if expose.remote == OWN_REPOSITORY:
        own = endpoint(own_uuid, AnnexShellTransport(expose.name, config.repository, own_uuid))
        # NOTIFYCHANGE is served here only: proxied remotes and clusters
        # answer it with a protocol error, as git-annex's proxy does.
        own.refs = shared.refs
        return own
    try:
        if expose.remote in read_cluster_names(config.repository):
            # The cluster's channel records what its nodes did itself.
            cluster = _cluster_transport(config, expose.remote, own_uuid, shared)
            return endpoint(cluster.uuid, cluster)
        remote = proxied_remote(config.repository, expose.remote)
        transport, records = _remote_transport(config, remote, own_uuid)
    except RemoteError as e:
        raise StartupError(f"expose {expose.name!r}: {e}") from None
    return endpoint(transport.uuid, transport, records)


def _remote_transport(config: Config, remote: Remote, own_uuid: str) -> tuple[Transport, bool]:
    """How to reach one remote, and whether the bridge must keep its location log."""
    assert remote.uuid is not None
    address = parse_p2p_address(remote.url or "")
    if address is None:
        # A remote git-annex can proxy itself (ssh, path, special remote):
        # git-annex-shell reaches it and keeps its location log, but only
        # once `git annex updateproxy` has listed it in proxy.log.
        proxied = parse_proxy_log(_annex_log(config.repository, "proxy.log"))
        if remote.uuid not in proxied.get(own_uuid, frozenset()):
            raise RemoteError(
                f"git-annex does not proxy remote {remote.name!r} yet: run"
                " `git annex updateproxy` in the proxy repository"
            )
        shell = AnnexShellTransport(
            remote.name, config.repository, remote.uuid, remote.uuid, special=remote.is_special
        )
        return shell, False
    token = read_token(config.repository, address)
    if isinstance(address, TorAddress):
        tor = TorAnnexTransport(
            remote.name,
            address,
            remote.uuid,
            token,
            own_uuid,
            config.tor.socks,
            connect_timeout=config.limits.peer_timeout,
        )
        return tor, True
    net = P2PNetTransport(remote.name, address, remote.uuid, token, own_uuid, config.repository)
    return net, True


def _cluster_transport(
    config: Config, name: str, own_uuid: str, shared: Shared
) -> ClusterTransport:
    cluster = read_cluster(
        config.repository,
        name,
        _annex_log(config.repository, "cluster.log"),
        _annex_log(config.repository, "proxy.log"),
    )
    # The order git-annex's gateway asks holders in: git-annex's own costs.
    remotes = [*cluster.nodes, *(link.remote for link in cluster.via_gateways)]
    costs = annex_costs(config.repository, [r.name for r in remotes])
    for remote in remotes:
        if remote.name not in costs:
            log.warning("cluster %s: git-annex did not tell node %s's cost", name, remote.name)
            costs[remote.name] = remote_cost(remote)
    log.info(
        "cluster %s: node costs %s", name,
        ", ".join(f"{r.name} {costs[r.name]:g}" for r in remotes),
    )
    nodes = []
    for remote in cluster.nodes:
        transport, _ = _remote_transport(config, remote, own_uuid)
        assert remote.uuid is not None
        ref = NodeRef(remote.uuid, remote.name, costs[remote.name])
        nodes.append(ClusterNode(ref, transport))
    for link in cluster.via_gateways:
        transport, _ = _remote_transport(config, link.remote, own_uuid)
        ref = NodeRef(cluster.uuid, link.remote.name, costs[link.remote.name], link.nodes)
        nodes.append(ClusterNode(ref, transport, gateway=link.gateway_uuid))
    limits = config.limits
    assert shared.query is not None
    return ClusterTransport(
        name,
        cluster.uuid,
        own_uuid,
        nodes,
        shared.query,
        shared.location_log,
        # Shorter than the session's own deadlines: a slow node is dropped
        # before the session gives up on the whole cluster.
        node_timeout=limits.peer_timeout * 0.8,
        stall_timeout=limits.stall_timeout * 0.8,
        members=cluster.members,
        connect_timeout=limits.node_connect_timeout,
    )


def _annex_log(repository: Path, name: str) -> str:
    """A log file of the git-annex branch, as committed ("" if there is none)."""
    return _run(["git", "cat-file", "-p", f"git-annex:{name}"], cwd=repository).stdout


def _make_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create state_dir {path}: {e.strerror}") from e


def onion_ports(config: Config) -> dict[int, Path]:
    return {expose.port: config.socket_path(expose) for expose in config.expose}


async def _publish_onion(config: Config, nursery: trio.Nursery) -> str | None:
    """Publish (or find) the onion service; returns its address, None without Tor."""
    tor = config.tor
    if tor.onion == "torrc":
        assert tor.hidden_service_dir is not None
        return torrc_onion(tor.hidden_service_dir)
    if tor.control is None:
        return None
    publisher = OnionPublisher(
        ControlSpec(tor.control, tor.password),
        config.state_dir,
        onion_ports(config),
        max_streams=tor.max_streams or None,
        pow_defenses=PowDefenses.of(tor),
    )
    log.info("publishing the onion service through %s", tor.control)
    onion: str = await nursery.start(publisher.run)
    return onion


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
        _make_state_dir(config.state_dir)
        controller = connect(ControlSpec(tor.control, tor.password))
        try:
            # A moment's service, to learn the address: no defenses needed.
            onion = publish(controller, config.state_dir, onion_ports(config), None, 60,
                            wait=False, pow_defenses=PowDefenses(enabled=False))
            controller.remove_ephemeral_hidden_service(onion.removesuffix(".onion"))
        finally:
            controller.close()
    return onion


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket; refuse one a live daemon is listening on."""
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise StartupError(f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes")
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise StartupError(f"{path} exists and is not a socket; remove it or change socket_dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check socket {path}: {e.strerror}") from e
        path.unlink(missing_ok=True)  # stale: left by a daemon that was killed
        return
    finally:
        probe.close()
    raise StartupError(f"socket {path} is in use: is another torbridge running?")


async def bind_unix(path: Path, mode: int) -> trio.SocketListener:
    """Listen on ``path``; the name appears only once it accepts connections."""
    _claim_socket_path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(staging))
        os.chmod(staging, mode)
        sock.listen(SOCKET_BACKLOG)
        os.replace(staging, path)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return trio.SocketListener(sock)


async def serve(
    config: Config, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled (SIGTERM/SIGINT are handled by run_daemon)."""
    check_git_annex()
    _make_state_dir(config.state_dir)
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
    endpoints = build_endpoints(config, shared)
    for e in endpoints:
        if isinstance(e.transport, ClusterTransport):
            shared.registry.clusters[e.transport.name] = e.transport.status
    shared.registry.endpoints = [
        {
            "name": e.name,
            "port": x.port,
            "target": "own repository" if x.remote == OWN_REPOSITORY else f"remote {x.remote}",
            "socket": str(config.socket_path(x)),
        }
        for e, x in zip(endpoints, config.expose, strict=True)
    ]
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
            nursery.start_soon(shared.location_log.run)
            nursery.start_soon(shared.refs.run)  # idle until a session watches
            nursery.start_soon(log_progress, shared.registry)
            for listener, serve_it in listeners_of_ours:
                nursery.start_soon(serve_it, listener, shared.registry)
            for endpoint, listener in zip(endpoints, listeners, strict=True):
                nursery.start_soon(_accept_loop, listener, endpoint, shared)
            onion = await _publish_onion(config, nursery)
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


async def _accept_loop(listener: trio.SocketListener, endpoint: Endpoint, shared: Shared) -> None:
    admission = shared.admission

    async def handle(stream: trio.SocketStream) -> None:
        accepted_at = trio.current_time()
        pending = PendingAuth()
        if admission.enter_pre_auth(pending):
            log.warning(
                "%s: too many unauthenticated connections, closing the oldest", endpoint.name
            )
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

    async with listener:
        await trio.serve_listeners(handle, [listener])


async def _read_proxy_line(stream: trio.abc.Stream, data: bytes) -> tuple[int, bytes]:
    """tor's PROXY line off the front of the stream: (circuit id, the bytes after it)."""
    while (line := parse_proxy_line(data)) is None:
        more = await stream.receive_some(MAX_PROXY_LINE)
        if not more:
            raise ProxyLineError("closed before the PROXY line ended")
        data += more
    return line.circuit, data[line.length :]


async def run_daemon(config: Config) -> None:
    """``serve`` until SIGTERM or SIGINT, then stop cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            # READY only now: every endpoint listens and the onion is published.
            notify.ready(f"serving {len(config.expose)} endpoint(s)")
            nursery.start_soon(notify.watchdog_loop)
            log.info("torbridge ready")
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                notify.stopping()
                nursery.cancel_scope.cancel()
                break
