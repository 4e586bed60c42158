"""Which nodes a PUT to a cluster lands on: the same as with git-annex's own gateway.

The oracle is git-annex itself. A cluster of local (path) nodes can be
reached through git-annex's own gateway over ``git-annex-shell p2pstdio``;
a second stock client reaches it so, as an ssh remote whose "ssh" is a
script that runs the command on this machine (no network at all). The same
files go through git-annex's gateway, are dropped again, then go through
the bridge's cluster endpoint: each key must land on the same nodes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge
from tests.harness.clusters import CLUSTER, ENDPOINT, ClusterSetup, setup_cluster
from tests.harness.nodes import Node, NodeNet
from tests.harness.process import wait_for
from torbridge.annex.preferred import PreferredContent

pytestmark = pytest.mark.annex

# A stand-in for ssh to "localhost": skips ssh's options and the host, and
# runs the command here.
FAKE_SSH = """#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-S|-l|-i|-F|-O|-c|-m|-b|-e|-L|-R|-D|-J|-W|-Q) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
[ "$1" = localhost ] || { echo "fake ssh: only localhost" >&2; exit 255; }
shift
exec sh -c "$*"
"""


def gateway_client(annex_env: AnnexEnv, proxy: AnnexRepo, root: Path) -> Client:
    """A stock client whose remote ``origin`` is the proxy over (fake) ssh:
    ``origin-CLUSTER`` is then git-annex's own gateway to the cluster."""
    ssh = root / "fake-ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    env = dataclasses.replace(
        annex_env, env={**annex_env.env, "GIT_SSH": str(ssh), "GIT_ANNEX_USE_GIT_SSH": "1"}
    )
    path = root / "via-git-annex"
    env.run(["git", "clone", "-q", f"ssh://localhost{proxy.path}", str(path)], check=False)
    client = Client(env, path)
    client.annex("init", "via-git-annex")
    client.annex("pull", "--no-content", "origin")
    # The proxied remotes git-annex makes of proxy.log are not git remotes.
    info = client.annex("info", "--fast").output
    assert f"[origin-{CLUSTER}]" in info, info
    return client


def placements(s: ClusterSetup, keys: dict[str, str]) -> dict[str, set[str]]:
    return {name: s.holding(key) for name, key in keys.items()}


def compare_with_git_annex(
    s: ClusterSetup, oracle: Client, files: dict[str, bytes]
) -> dict[str, set[str]]:
    """The files go through git-annex's gateway, then through the bridge:
    where each lands, which must be the same both times."""
    oracle.add_files(files)
    s.client.add_files(files)
    keys = {name: s.client.key(name) for name in files}
    assert keys == {name: oracle.key(name) for name in files}

    oracle.annex("copy", "--to", f"origin-{CLUSTER}", "--", *files)
    by_git_annex = placements(s, keys)
    # Back to nothing: dropped through git-annex's gateway (every node, logged).
    oracle.annex("drop", "--from", f"origin-{CLUSTER}", "--", *files)
    for name, key in keys.items():
        assert s.holding(key) == set(), name

        def logged_nowhere(key: str = key) -> bool:
            return s.logged(key) == set()

        wait_for(f"{name} logged nowhere", logged_nowhere, 30)

    s.client.annex("copy", "--to", ENDPOINT, "--", *files)
    by_bridge = placements(s, keys)
    assert by_bridge == by_git_annex, f"bridge {by_bridge} != git-annex {by_git_annex}"
    return by_bridge


@pytest.fixture
def cluster_of_paths(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    proxy_repo: AnnexRepo,
    node_net: NodeNet,
) -> Callable[[Callable[[AnnexRepo], None]], ClusterSetup]:
    def make(configure: Callable[[AnnexRepo], None]) -> ClusterSetup:
        return setup_cluster(
            make_nodes,
            make_node_bridge,
            make_client,
            proxy_repo,
            node_net,
            kinds=("local", "local", "local"),
            before_start=lambda nodes: configure(proxy_repo),
        )

    return make


def test_standard_groups_as_git_annex_gateway(
    cluster_of_paths: Callable[[Callable[[AnnexRepo], None]], ClusterSetup],
    annex_env: AnnexEnv,
    proxy_repo: AnnexRepo,
    tmp_path: Path,
) -> None:
    def configure(proxy: AnnexRepo) -> None:
        proxy.annex("group", "c1-local", "archive")
        proxy.annex("wanted", "c1-local", "standard")
        proxy.annex("group", "c2-local", "manual")
        proxy.annex("wanted", "c2-local", "standard")
        proxy.annex("group", "c3-local", "docs")
        proxy.annex("groupwanted", "docs", "include=*.txt or largerthan=100kb")
        proxy.annex("wanted", "c3-local", "groupwanted")

    s = cluster_of_paths(configure)
    oracle = gateway_client(annex_env, proxy_repo, tmp_path)
    files = {
        "a.txt": b"text\n",
        "b.bin": b"small binary\n",
        "c.bin": os.urandom(150_000),
        "d/e.txt": b"nested text\n",
    }
    got = compare_with_git_annex(s, oracle, files)
    # What git-annex decided, spelled out: an archive wants what no archive
    # has, a manual repository only what it has, the group's own expression.
    assert got == {
        "a.txt": {"c1-local", "c3-local"},
        "b.bin": {"c1-local"},
        "c.bin": {"c1-local", "c3-local"},
        "d/e.txt": {"c1-local", "c3-local"},
    }


def test_balanced_as_git_annex_gateway(
    cluster_of_paths: Callable[[Callable[[AnnexRepo], None]], ClusterSetup],
    annex_env: AnnexEnv,
    proxy_repo: AnnexRepo,
    tmp_path: Path,
) -> None:
    def configure(proxy: AnnexRepo) -> None:
        for node in ("c1-local", "c2-local", "c3-local"):
            proxy.annex("group", node, "spread")
            proxy.annex("wanted", node, "balanced=spread")

    s = cluster_of_paths(configure)
    oracle = gateway_client(annex_env, proxy_repo, tmp_path)
    files = {f"f{i}.dat": os.urandom(1000 + i) for i in range(9)}
    got = compare_with_git_annex(s, oracle, files)
    # balanced= puts each key on one node of the group, and spreads them.
    assert all(len(nodes) == 1 for nodes in got.values()), got
    assert len(set().union(*got.values())) >= 2, got


async def test_evaluation_leaves_the_proxy_untouched(
    make_nodes: Callable[..., Node], proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """The query's scratch work tree and index are its own: the proxy's index,
    work tree and object store do not change, and unsafe file names are sent."""
    for name in ("n1", "n2"):
        make_nodes("local", name)
    proxy_repo.annex("group", "n1", "archive")
    proxy_repo.annex("wanted", "n1", "standard")
    proxy_repo.annex("wanted", "n2", "include=*.jpg")
    client = AnnexRepo.create(proxy_repo.env, tmp_path / "c", "c")
    client.add_file("x.jpg", b"jpeg?\n")
    key = client.key("x.jpg")

    def snapshot() -> tuple[str, str, int]:
        index = proxy_repo.path / ".git" / "index"
        objects = sum(1 for _ in (proxy_repo.path / ".git" / "objects").rglob("*"))
        return (
            index.read_bytes().hex() if index.exists() else "",
            proxy_repo.git("status", "--porcelain").stdout,
            objects,
        )

    before = snapshot()
    scratch = tmp_path / "scratch"
    preferred = PreferredContent(proxy_repo.path, scratch)
    old_env = dict(os.environ)
    os.environ.clear()
    os.environ.update(proxy_repo.env.env)
    try:
        assert await preferred.wanted(["n1", "n2"], key, "x.jpg") == {"n1": True, "n2": True}
        assert await preferred.wanted(["n2"], key, "sub/x.png") == {"n2": False}
        # Not a name inside a work tree: sent (git-annex's gateway would
        # evaluate the file terms as false; an extra copy is the safe side).
        for bad in ("../x.png", "/etc/x.png", "a/.git/x.png", "a//x.png", "x\n.png"):
            assert await preferred.wanted(["n2"], key, bad) == {"n2": True}, bad
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    after = snapshot()
    assert after[:2] == before[:2]
    # git-annex may commit its own branch meanwhile; the symlink blobs are not there.
    assert not proxy_repo.git("cat-file", "-e", _link_blob(key), check=False).ok
    preferred.close()
    assert list(scratch.iterdir()) == []


def _link_blob(key: str) -> str:
    import hashlib

    target = f".git/annex/objects/00/00/{key}/{key}".encode()
    return hashlib.sha1(b"blob %d\0" % len(target) + target).hexdigest()
