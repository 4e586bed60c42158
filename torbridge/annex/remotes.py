"""The proxy's remotes, read from its git config the way git-annex reads them.

Only remotes the operator marked with ``remote.NAME.annex-proxy=true``
(git-annex's own switch) can be exposed: a UUID merely listed in the
git-annex branch grants nothing. Names, addresses and tokens are validated
here, before anything of them reaches a subprocess or a socket.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from torbridge.annex.host import run

_REMOTE_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_ONION = re.compile(r"[a-z2-7]{16,56}\.onion")
_PORT = re.compile(r"[0-9]{1,5}")  # not str.isdigit(): "²" is a digit to it, not to int()
_NET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# A repository UUID goes into argvs (git-annex-shell --uuid) and protocol lines
# (AUTH-SUCCESS): only the shape git-annex makes, as for a client's UUID.
_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")
_TOKEN = re.compile(r"[A-Za-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RemoteError(Exception):
    """A remote that cannot be exposed; the text says why and what to do."""


@dataclass(frozen=True)
class TorAddress:
    onion: str
    port: int

    def __str__(self) -> str:
        return f"tor-annex::{self.onion}:{self.port}"

    @property
    def creds_name(self) -> str:
        # One token per onion, whatever the port, as git-annex keeps them.
        return creds_escape(self.onion)


@dataclass(frozen=True)
class NetAddress:
    net: str
    address: str

    def __str__(self) -> str:
        return f"p2p-annex::{self.net}:{self.address}"

    @property
    def creds_name(self) -> str:
        return creds_escape(f"{self.net}:{self.address}")


P2PAddress = TorAddress | NetAddress


@dataclass(frozen=True)
class Remote:
    name: str
    url: str | None = None
    uuid: str | None = None
    proxy: bool = False
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def is_special(self) -> bool:
        """A special remote: git-annex gives those no URL (or an annex:: one)."""
        return not self.url or self.url.startswith("annex::")


def creds_escape(text: str) -> str:
    """git-annex's name for a creds file: every byte but [A-Za-z0-9] as %XX."""
    return "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"%{b:02X}"
        for b in text.encode("utf-8")
    )


def parse_p2p_address(url: str) -> P2PAddress | None:
    """A remote URL that is a P2P address, validated; None for any other URL."""
    for scheme in ("tor-annex::", "p2p-annex::"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            break
    else:
        return None
    first, sep, second = rest.partition(":")
    if not sep or _CONTROL.search(rest):
        raise RemoteError(f"{url!r} is not a valid P2P address")
    if scheme == "tor-annex::":
        valid_port = _PORT.fullmatch(second) and 0 < int(second) < 65536
        if not _ONION.fullmatch(first) or not valid_port:
            raise RemoteError(f"{url!r} is not a valid tor-annex address")
        return TorAddress(first, int(second))
    if not _NET.fullmatch(first) or not second or second.startswith("-"):
        raise RemoteError(f"{url!r} is not a valid p2p-annex address")
    return NetAddress(first, second)


def check_uuid(uuid: str, what: str) -> str:
    """``uuid``, if it is one; RemoteError naming ``what`` otherwise."""
    if not _UUID.fullmatch(uuid):
        raise RemoteError(f"{what} has annex-uuid {uuid!r}, which is not a valid UUID")
    return uuid


def git_dir(repository: Path) -> Path:
    out = run(["git", "rev-parse", "--absolute-git-dir"], cwd=repository)
    if out.returncode != 0:
        raise RemoteError(f"{repository} is not a git repository")
    return Path(out.stdout.strip())


def read_remotes(repository: Path) -> dict[str, Remote]:
    out = run(["git", "config", "-z", "--get-regexp", r"^remote\."], cwd=repository)
    found: dict[str, dict[str, str]] = {}
    for entry in out.stdout.split("\0"):
        if not entry:
            continue
        key, _, value = entry.partition("\n")
        name, _, setting = key[len("remote.") :].rpartition(".")
        found.setdefault(name, {})[setting.lower()] = value
    return {
        name: Remote(
            name=name,
            url=s.get("url"),
            uuid=s.get("annex-uuid"),
            proxy=s.get("annex-proxy", "").lower() in ("true", "yes", "on", "1"),
            settings=s,
        )
        for name, s in found.items()
    }


def read_token(repository: Path, address: P2PAddress) -> str:
    """The token git-annex stored for ``address`` when the operator linked it."""
    path = git_dir(repository) / "annex" / "creds" / address.creds_name
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except OSError as e:
        raise RemoteError(
            f"no token for {address} ({path}: {e.strerror}); link it on the proxy with"
            " `git annex p2p --link`"
        ) from None
    token = first[0].strip() if first else ""
    if not _TOKEN.fullmatch(token):
        raise RemoteError(f"the token stored in {path} is not valid")
    return token


def proxied_remote(repository: Path, name: str) -> Remote:
    """The remote called ``name``, checked to be one the operator lets us proxy."""
    if not _REMOTE_NAME.fullmatch(name):
        raise RemoteError(f"{name!r} is not a valid remote name")
    remote = read_remotes(repository).get(name)
    if remote is None:
        raise RemoteError(f"the proxy repository has no remote named {name!r}")
    if not remote.proxy:
        raise RemoteError(
            f"remote {name!r} is not proxied: run `git config remote.{name}.annex-proxy true`"
            " in the proxy repository"
        )
    if not remote.uuid:
        raise RemoteError(
            f"remote {name!r} has no annex-uuid: run `git annex sync {name}` or re-link it"
        )
    check_uuid(remote.uuid, f"remote {name!r}")
    return remote


# --- clusters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayLink:
    """The same cluster through another gateway (``git annex extendcluster``)."""

    remote: Remote  # the remote reaching that gateway's cluster endpoint
    gateway_uuid: str  # that gateway's own repository
    # The cluster's nodes behind it, as far as this repository's git-annex
    # branch knows (that gateway's proxy.log and cluster.log); maybe none.
    nodes: frozenset[str]


@dataclass(frozen=True)
class Cluster:
    """A cluster this repository is a gateway for, as git-annex configures it."""

    name: str
    uuid: str  # annex.cluster.NAME
    nodes: tuple[Remote, ...]  # remotes with remote.N.annex-cluster-node naming it
    via_gateways: tuple[GatewayLink, ...] = ()
    members: frozenset[str] = frozenset()  # every node cluster.log records for it


def _newest_per_uuid(text: str) -> dict[str, list[str]]:
    """A UUID-keyed log of the git-annex branch, ``<clock>s <uuid> <value>...``:
    the newest line per UUID wins, as after git-annex's union merges."""
    newest: dict[str, tuple[float, list[str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].endswith("s"):
            continue
        try:
            clock = float(fields[0][:-1])
        except ValueError:
            continue
        uuid = fields[1]
        if uuid not in newest or clock >= newest[uuid][0]:
            newest[uuid] = (clock, fields[2:])
    return {uuid: values for uuid, (_, values) in newest.items()}


def parse_cluster_log(text: str) -> dict[str, frozenset[str]]:
    """cluster.log: ``<clock>s <cluster-uuid> <node-uuid>...``: the nodes of each cluster."""
    return {cluster: frozenset(nodes) for cluster, nodes in _newest_per_uuid(text).items()}


def parse_proxy_log(text: str) -> dict[str, frozenset[str]]:
    """proxy.log: ``<clock>s <proxy-uuid> <uuid>:<remote>...``: what each proxy proxies."""
    return {
        proxy: frozenset(entry.partition(":")[0] for entry in entries)
        for proxy, entries in _newest_per_uuid(text).items()
    }


def _unescape_remote_config(text: str) -> str:
    """git-annex writes ``&NN;`` (a decimal code point) for the bytes of a
    remote.log value that would split it (blanks, ``=``, ``&``)."""
    return re.sub(r"&(\d{1,7});", lambda m: chr(int(m.group(1))), text)


def parse_remote_log(text: str) -> dict[str, dict[str, str]]:
    """remote.log: ``<uuid> key=value... timestamp=<clock>s``, the newest line per UUID.

    This is the special remotes' configuration as the git-annex branch
    publishes it to everyone who fetches the branch.
    """
    newest: dict[str, tuple[float, dict[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        uuid, settings = fields[0], {}
        clock = 0.0
        for item in fields[1:]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                continue
            if key == "timestamp":
                try:
                    clock = float(value.rstrip("s"))
                except ValueError:
                    continue
            else:
                settings[_unescape_remote_config(key)] = _unescape_remote_config(value)
        if uuid not in newest or clock >= newest[uuid][0]:
            newest[uuid] = (clock, settings)
    return {uuid: settings for uuid, (_, settings) in newest.items()}


def read_annex_log(repository: Path, name: str) -> str:
    """A log file of the git-annex branch as committed ("" when there is none)."""
    out = run(["git", "cat-file", "-p", f"git-annex:{name}"], cwd=repository)
    return out.stdout if out.returncode == 0 else ""


def read_cluster_names(repository: Path) -> dict[str, str]:
    """annex.cluster.NAME = UUID: the clusters this repository is a gateway for."""
    out = run(["git", "config", "-z", "--get-regexp", r"^annex\.cluster\."], cwd=repository)
    clusters = {}
    for entry in out.stdout.split("\0"):
        key, _, value = entry.partition("\n")
        if key.startswith("annex.cluster."):
            clusters[key[len("annex.cluster.") :]] = value.strip()
    return clusters


def read_cluster(repository: Path, name: str, cluster_log: str, proxy_log: str = "") -> Cluster:
    """Cluster ``name`` with its nodes, checked against git-annex's cluster.log.

    A node is a remote whose ``annex-cluster-node`` names the cluster and
    which ``git annex updatecluster`` has recorded; the same cluster behind
    another gateway (``git annex extendcluster GW NAME``) is the remote
    ``GW-NAME`` whose UUID is the cluster's, ``GW`` being a remote with
    ``annex-cluster-gateway`` set to it.
    """
    uuid = read_cluster_names(repository).get(name)
    if uuid is None:
        raise RemoteError(f"no cluster named {name!r}: run `git annex initcluster {name}`")
    check_uuid(uuid, f"cluster {name} (annex.cluster.{name})")
    remotes = read_remotes(repository)
    recorded = parse_cluster_log(cluster_log).get(uuid, frozenset())
    nodes = []
    for remote in sorted(remotes.values(), key=lambda r: r.name):
        if name not in remote.settings.get("annex-cluster-node", "").split():
            continue
        if not _REMOTE_NAME.fullmatch(remote.name):
            raise RemoteError(f"cluster {name}: {remote.name!r} is not a valid remote name")
        if not remote.uuid:
            raise RemoteError(f"cluster {name}: node {remote.name!r} has no annex-uuid")
        check_uuid(remote.uuid, f"cluster {name}: node {remote.name!r}")
        if remote.uuid not in recorded:
            raise RemoteError(
                f"cluster {name}: node {remote.name!r} is not in cluster.log yet: run"
                " `git annex updatecluster` in the proxy repository"
            )
        nodes.append(remote)
    gateways = []
    for gateway in sorted(remotes.values(), key=lambda r: r.name):
        if uuid not in gateway.settings.get("annex-cluster-gateway", "").split():
            continue
        via = remotes.get(f"{gateway.name}-{name}")
        if via is None or via.uuid != uuid or not gateway.uuid:
            raise RemoteError(
                f"cluster {name}: gateway {gateway.name!r} needs its cluster endpoint linked"
                f" as remote {gateway.name}-{name} (and its own as {gateway.name}), each with"
                " `git annex p2p --link`"
            )
        check_uuid(gateway.uuid, f"cluster {name}: gateway {gateway.name!r}")
        behind = parse_proxy_log(proxy_log).get(gateway.uuid, frozenset()) & recorded
        gateways.append(GatewayLink(via, gateway.uuid, behind))
    if not nodes and not gateways:
        raise RemoteError(
            f"cluster {name} has no nodes: `git config remote.NODE.annex-cluster-node {name}`"
            " then `git annex updatecluster`"
        )
    return Cluster(name, uuid, tuple(nodes), tuple(gateways), frozenset(recorded))


def remote_cost(remote: Remote, default: float = 200.0) -> float:
    """``remote.NAME.annex-cost``, else ``default``: for when git-annex cannot tell."""
    try:
        return float(remote.settings.get("annex-cost", default))
    except ValueError:
        return default


def annex_costs(repository: Path, names: list[str]) -> dict[str, float]:
    """Each remote's cost as git-annex reckons it (``git annex info --fast --json``).

    git-annex's default for the remote's type (a local git repository 100,
    ssh 200, a P2P address 1000, special remotes by type) unless
    ``annex-cost`` or ``annex-cost-command`` says otherwise. Remotes it
    could not tell are left out.
    """
    if not names:
        return {}
    try:
        done = run(["git", "annex", "info", "--fast", "--json", "--", *names], cwd=repository)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    costs: dict[str, float] = {}
    for line in done.stdout.splitlines():
        try:
            info = json.loads(line)
            costs[str(info["remote"])] = float(info["cost"])
        except (ValueError, KeyError, TypeError):
            continue
    return costs
