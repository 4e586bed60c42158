"""What the daemon serves: one Endpoint per ``[[expose]]``, each with the
transport that reaches its repository (its own, a proxied remote, a cluster).

An ``Endpoint`` is all a session (server/session.py) is given of it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torbridge.annex.host import StartupError, repository_uuid
from torbridge.annex.locationlog import LocationLog
from torbridge.annex.query import AnnexQuery
from torbridge.annex.remotes import (
    Remote,
    RemoteError,
    TorAddress,
    annex_costs,
    parse_p2p_address,
    parse_proxy_log,
    proxied_remote,
    read_annex_log,
    read_cluster,
    read_cluster_names,
    read_token,
    remote_cost,
)
from torbridge.config import OWN_REPOSITORY, Config, Expose, Limits
from torbridge.protocol.cluster import NodeRef
from torbridge.protocol.permissions import Grant
from torbridge.server.admission import Admission, Busy, PendingAuth
from torbridge.server.branchsync import BranchSync
from torbridge.server.gitowner import GitOwner
from torbridge.server.refwatch import RefWatcher
from torbridge.server.status import Registry
from torbridge.transport.base import Transport
from torbridge.transport.cluster import ClusterNode, ClusterTransport
from torbridge.transport.network import SOCKS_CONNECT_TIMEOUT, P2PNetTransport, TorAnnexTransport
from torbridge.transport.process import AnnexShellTransport

log = logging.getLogger("torbridge")


class Gate(Protocol):
    """Who may in: tokens and the caps on connections (the daemon's is
    server/admission.py's ``Admission``)."""

    def authorize(self, endpoint: str, token: str) -> Grant | Busy | None: ...

    async def wait_for_slot(self, endpoint: str, token: str, busy: Busy) -> Grant | Busy | None: ...

    def release(self, grant: Grant) -> None: ...

    def leave_pre_auth(self, connection: PendingAuth) -> None: ...

    def auth_failed(self, circuit: int | None) -> None: ...

    def auth_succeeded(self, circuit: int | None) -> None: ...


@dataclass
class Endpoint:
    """One exposed repository: what clients of one socket (or onion port) reach."""

    name: str
    uuid: str  # announced in AUTH-SUCCESS
    transport: Transport
    repository: Path  # the proxy's own repository, for CONNECT
    admission: Gate
    limits: Limits = field(default_factory=Limits)
    # Where what the relay saw is recorded; None where git-annex records it itself.
    location_log: LocationLog | None = None
    registry: Registry = field(default_factory=Registry)
    # The proxy repository's refs, for NOTIFYCHANGE; None where it is not served.
    refs: RefWatcher | None = None
    # Behind an Onionbalance frontend, on a host that does not own the git
    # repository: CONNECT goes to the owner (server/gitowner.py).
    git_owner: GitOwner | None = None


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
    endpoints = [build_endpoint(config, expose, own_uuid, shared) for expose in config.expose]
    owner = config.balance.git_owner if config.balance is not None else None
    if owner is not None:
        # Behind a frontend, on a host that does not own the git repository.
        for endpoint, expose in zip(endpoints, config.expose, strict=True):
            endpoint.git_owner = GitOwner(owner, expose.port, config.tor.socks, endpoint.uuid)
    return endpoints


def branch_sync(config: Config, shared: Shared) -> BranchSync | None:
    """The git-annex branch sync of a balanced host, if it has one (docs/scale-out.md)."""
    balance = config.balance
    if balance is None or balance.sync_interval <= 0:
        return None
    if balance.git_owner is not None and balance.owner_remote is None:
        log.warning(
            "[balance] git_owner without owner_remote: the git-annex branch is not"
            " synced with the owner's (docs/scale-out.md)"
        )
        return None
    return BranchSync(
        config.repository,
        balance.sync_interval,
        config.tor.socks,
        balance.owner_remote if balance.git_owner is not None else None,
        shared.location_log,
        shared.query,
    )


def build_endpoint(config: Config, expose: Expose, own_uuid: str, shared: Shared) -> Endpoint:
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
        proxied = parse_proxy_log(read_annex_log(config.repository, "proxy.log"))
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
            # tor itself gives up on a stream it cannot attach (SocksTimeout,
            # 120 s): with no peer_timeout, that is the bound.
            connect_timeout=config.limits.peer_timeout or SOCKS_CONNECT_TIMEOUT,
            circuits=config.tor.node_circuits,
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
        read_annex_log(config.repository, "cluster.log"),
        read_annex_log(config.repository, "proxy.log"),
    )
    # The order git-annex's gateway asks holders in: git-annex's own costs.
    remotes = [*cluster.nodes, *(link.remote for link in cluster.via_gateways)]
    costs = annex_costs(config.repository, [r.name for r in remotes])
    for remote in remotes:
        if remote.name not in costs:
            log.warning("cluster %s: git-annex did not tell node %s's cost", name, remote.name)
            costs[remote.name] = remote_cost(remote)
    log.info(
        "cluster %s: node costs %s",
        name,
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
        # A node's answer is waited for as a single peer's is (none by
        # default: a node hashes a big file before its SUCCESS). A node whose
        # part of a DATA body stops moving is different in a cluster: others
        # can go on (GET failover, the rest of a PUT fanout), so it is given
        # up after the stall limit, shorter than the client's own.
        node_timeout=limits.peer_wait * 0.8,
        stall_timeout=min(limits.peer_wait, limits.client_stall) * 0.8,
        members=cluster.members,
        connect_timeout=limits.node_connect_timeout,
    )
