"""A stock client works with each kind of node through the node's own bridge endpoint.

copy --to, get --from, drop --from, fsck --from, move --to / --from; then the
node holds exactly the right objects (checked in the node itself, byte for
byte), and the proxy's location log agrees (for p2p/tor nodes the bridge
writes it with ``setpresentkey --batch``; for a local node git-annex-shell's
own proxying does). A tor node is also reached through a unix-socket
SocksPort; raw protocol sessions check, message by message, what a stock
client does not send (v0, DATA-PRESENT, REMOVE-BEFORE, a node's ERROR).

``git annex testremote`` is not tested: it fails before connecting to a
p2p-annex remote ("failed disabling exportree"), the same way through a
node endpoint as through the bridge's own one (tried on a node endpoint
with git-annex 10.20261026).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import tbnode
from tests.harness.annex import AnnexRepo, Client, whereis_uuids
from tests.harness.bridge import Bridge, Expose
from tests.harness.client import error_naming, p2p_errors
from tests.harness.nodes import KINDS, ONION_PORT, Node, NodeNet, Setup, wait_location
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex

FILES: dict[str, bytes] = {
    "small.txt": b"small content\n",
    "with space.bin": os.urandom(300_000),  # more than one 256 KiB relay chunk
    "empty": b"",
    "moved.dat": os.urandom(70_000),
}


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip(kind: str, setup_node: Callable[..., Setup]) -> None:
    s = setup_node(kind)
    client, node, proxy, remote = s.client, s.node, s.proxy, s.remote
    client.add_files(FILES)
    keys = {name: client.key(name) for name in FILES}
    content = {keys[name]: data for name, data in FILES.items()}

    # copy --to: everything but moved.dat
    copied = [n for n in FILES if n != "moved.dat"]
    client.annex("copy", "--to", remote, "--", *copied)
    node.assert_holds({keys[n]: FILES[n] for n in copied})
    for n in copied:
        assert node.uuid in whereis_uuids(client, keys[n]), f"client does not log {n} on {remote}"
        wait_location(proxy, keys[n], node.uuid, present=True)
    node.assert_sound()

    # copy again: nothing to do (CHECKPRESENT says SUCCESS)
    again = client.annex("copy", "--to", remote, "--debug", "--", *copied)
    assert "PUT " not in again.output, again.describe()

    # drop locally with the node as the only other copy (LOCKCONTENT), get back
    client.annex("drop", "--", "with space.bin", "small.txt")
    assert client.present_here() == set(FILES) - {"with space.bin", "small.txt"}
    client.annex("get", "--from", remote, "--", "with space.bin", "small.txt")
    assert client.read("with space.bin") == FILES["with space.bin"]
    assert client.read("small.txt") == FILES["small.txt"]

    # fsck --from downloads and checks every copy the node has
    fsck = client.annex("fsck", "--from", remote, "--", *copied)
    assert "failed" not in fsck.output, fsck.describe()

    # drop --from (the client's own copy satisfies numcopies)
    client.annex("drop", "--from", remote, "--", "small.txt")
    node.assert_holds({keys[n]: FILES[n] for n in ("with space.bin", "empty")})
    assert node.uuid not in whereis_uuids(client, keys["small.txt"])
    wait_location(proxy, keys["small.txt"], node.uuid, present=False)

    # move --to: the node gets it, the client loses it
    client.annex("move", "--to", remote, "--", "moved.dat")
    assert "moved.dat" not in client.present_here()
    node.assert_holds({keys[n]: FILES[n] for n in ("with space.bin", "empty", "moved.dat")})
    wait_location(proxy, keys["moved.dat"], node.uuid, present=True)

    # move --from: back again
    client.annex("move", "--from", remote, "--", "moved.dat")
    assert client.read("moved.dat") == FILES["moved.dat"]
    final = {keys[n]: FILES[n] for n in ("with space.bin", "empty")}
    node.assert_holds(final)
    wait_location(proxy, keys["moved.dat"], node.uuid, present=False)
    for key in content:
        assert (node.uuid in whereis_uuids(proxy, key)) == (key in final), key

    node.assert_sound()
    s.client.fsck_content()
    assert client.present_here() == set(FILES)
    s.bridge.assert_alive()


def test_bridge_endpoints_side_by_side(setup_node: Callable[..., Setup]) -> None:
    """One p2p node, and the proxy's own endpoint: each gets only its own content."""
    s = setup_node("p2p")
    client = s.client
    client.link(s.bridge.add_token("hub-client", "rw", endpoint="hub").line, "hub")
    client.add_files({"a": b"to the node\n", "b": b"to the proxy\n"})
    ka, kb = client.key("a"), client.key("b")
    client.annex("copy", "--to", s.remote, "a")
    client.annex("copy", "--to", "hub", "b")
    s.node.assert_holds({ka: b"to the node\n"})
    assert s.proxy.has_key(kb) and not s.proxy.has_key(ka)
    wait_location(s.proxy, ka, s.node.uuid, present=True)
    assert s.node.uuid not in whereis_uuids(s.proxy, kb)
    result = client.annex("whereis", "--debug", "a")
    assert not p2p_errors(result), result.describe()


def test_local_node_without_updateproxy_is_explained(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
) -> None:
    """A path remote with annex-proxy=true that the proxy never ran updateproxy for.

    git-annex-shell only proxies remotes listed in the proxy's proxy.log
    (``git annex updateproxy``); the bridge accepts the remote at start-up
    (annex-proxy=true and an annex-uuid is all it checks) and every session
    then fails with git-annex-shell's "expected repository UUID <node> but
    found UUID <proxy>". The operator should be told what to run, at start-up
    or in the client's error.
    """
    node = make_nodes("local", "n-local", update_proxy=False)
    bridge = make_node_bridge([Expose("n-local", "n-local", 5001)])
    try:
        bridge.start()
    except AssertionError:
        assert "n-local" in bridge.log() and "updateproxy" in bridge.log(), bridge.log()
        return
    client = make_client("client")
    client.link(bridge.add_token("client", "rw").line, "n-local")
    client.add_file("f", b"content\n")
    result = client.annex("copy", "--to", "n-local", "--debug", "f", check=False)
    assert not result.ok and not node.objects(), result.describe()
    error_naming(result, "n-local", "updateproxy")


def test_tor_node_through_unix_socks_port(
    make_nodes: Callable[..., Node],
    make_node_bridge: Callable[..., Bridge],
    make_client: Callable[[str], Client],
    node_net: NodeNet,
    socks_server: tbnode.SocksServer,
) -> None:
    """``[tor] socks = "unix:PATH"`` (tor's SocksPort unix:PATH, Debian's /run/tor/socks)."""
    node = make_nodes("tor", "n-tor")
    assert node.onion is not None
    # AF_UNIX paths are short: not under pytest's tmp_path.
    sockdir = Path(tempfile.mkdtemp(prefix="tb-socks-", dir="/tmp"))
    unix = tbnode.SocksServer(f"unix:{sockdir / 'socks'}", 0, node_net.directory)
    unix.routes[node.onion] = node.name
    unix.start()
    try:
        bridge = make_node_bridge([Expose("n-tor", "n-tor", 5001)], socks=unix.address)
        bridge.start()
        client = make_client("client")
        client.link(bridge.add_token("client", "rw").line, "n-tor")
        data = os.urandom(300_000)
        client.add_file("f", data)
        key = client.key("f")
        client.annex("copy", "--to", "n-tor", "f")
        node.assert_holds({key: data})
        client.annex("drop", "f")
        client.annex("get", "--from", "n-tor", "f")
        assert client.read("f") == data
        assert f"{node.onion}:{ONION_PORT}" in unix.requests
        assert not socks_server.requests  # the TCP SocksPort was never dialled
    finally:
        unix.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


# --- the wire, by hand, through a node's endpoint -----------------------------------------


def raw_session(s: Setup) -> RawSession:
    """A raw protocol session with the node's endpoint, past AUTH (the node's UUID)."""
    token = s.bridge.add_token("raw", "rw", endpoint=s.remote)
    r = RawSession(token.socket)
    r.auth(token.token, s.node.uuid)
    return r


def put_raw(r: RawSession, key: str, data: bytes, version: int) -> None:
    r.send_line(f"PUT raw.bin {key}")
    r.expect("PUT-FROM 0")
    r.send_data(data)
    if version >= 1:
        r.send_line("VALID")
    r.expect("SUCCESS")


def test_raw_v0_client_through_node(setup_node: Callable[..., Setup]) -> None:
    """A client that sends no VERSION (git-remote-p2p-annex does not): no VALID anywhere."""
    s = setup_node("p2p")
    data = os.urandom(100_000)
    s.client.add_file("raw.bin", data)
    key = s.client.key("raw.bin")
    with raw_session(s) as r:
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("FAILURE")
        put_raw(r, key, data, version=0)
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("SUCCESS")
        r.send_line(f"GET 0 raw.bin {key}")
        assert r.read_data() == data
        r.send_line("SUCCESS")  # v0: the body is not followed by VALID
        r.send_line(f"GET 1000 raw.bin {key}")  # a resumed download
        assert r.read_data() == data[1000:]
        r.send_line("SUCCESS")
        # A VALID after either body would be read here instead of SUCCESS.
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("SUCCESS")
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    # The node spoke v0 too: right after AUTH came the request, no VERSION.
    assert s.node.server is not None
    lines = re.findall(r"P2P ([<>] \S+)", s.node.server.log())
    first = lines.index("< CHECKPRESENT")
    assert lines[first - 1] == "> AUTH-SUCCESS", lines[: first + 1]


def test_raw_data_present_through_node(setup_node: Callable[..., Setup]) -> None:
    """v4 DATA-PRESENT after PUT-FROM: the node's own presence check is the answer."""
    s = setup_node("p2p")
    data = os.urandom(50_000)
    s.client.add_file("raw.bin", data)
    key = s.client.key("raw.bin")
    with raw_session(s) as r:
        assert r.version(4) == "VERSION 4"
        r.send_line(f"PUT raw.bin {key}")
        r.expect("PUT-FROM 0")
        r.send_line("DATA-PRESENT")
        r.expect("FAILURE")  # the node does not have it
        assert s.node.uuid not in whereis_uuids(s.proxy, key)
        r.send_line(f"PUT raw.bin {key}")
        r.expect("PUT-FROM 0")
        # The content reaches the node by another way meanwhile.
        s.node.repo.add_file("raw.bin", data)
        assert s.node.repo.key("raw.bin") == key
        r.send_line("DATA-PRESENT")
        r.expect("SUCCESS")
        r.send_line(f"PUT raw.bin {key}")
        r.expect("ALREADY-HAVE")
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)


def test_raw_timestamps_through_node(setup_node: Callable[..., Setup]) -> None:
    """GETTIMESTAMP is the node's clock; REMOVE-BEFORE is judged by the node against it."""
    s = setup_node("p2p")
    data = b"remove me before\n"
    s.client.add_file("raw.bin", data)
    key = s.client.key("raw.bin")
    s.client.annex("copy", "--to", s.remote, "raw.bin")
    wait_location(s.proxy, key, s.node.uuid, present=True)
    with raw_session(s) as r:
        assert r.version(4) == "VERSION 4"
        r.send_line("GETTIMESTAMP")
        reply = r.read_line()
        assert re.fullmatch(r"TIMESTAMP \d+", reply), reply
        t = int(reply.split()[1])
        # git-annex's clock: whole seconds of CLOCK_BOOTTIME (same host here).
        assert abs(t - time.clock_gettime(time.CLOCK_BOOTTIME)) < 5
        r.send_line(f"REMOVE-BEFORE {t} {key}")  # the node's clock is at or past it
        r.expect("FAILURE")
        s.node.assert_holds({key: data})
        assert s.node.uuid in whereis_uuids(s.proxy, key)
        r.send_line(f"REMOVE-BEFORE {t + 600} {key}")
        r.expect("SUCCESS")
    s.node.assert_holds({})
    wait_location(s.proxy, key, s.node.uuid, present=False)


def test_raw_get_of_missing_key_through_node(setup_node: Callable[..., Setup]) -> None:
    """The node's own answer to a GET it cannot serve reaches the client; the session goes on."""
    s = setup_node("p2p")
    s.client.add_file("raw.bin", b"not in the node\n")
    key = s.client.key("raw.bin")
    with raw_session(s) as r:
        assert r.version(4) == "VERSION 4"
        r.send_line(f"GET 0 raw.bin {key}")
        # git-annex's way of saying "I have no such content".
        assert r.read_data() == b""
        r.expect("INVALID")
        r.send_line("FAILURE")
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("FAILURE")
        put_raw(r, key, b"not in the node\n", version=4)
    s.node.assert_holds({key: b"not in the node\n"})


def test_raw_node_error_reaches_the_client_without_paths(
    make_node_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, tmp_path: Path
) -> None:
    """A node's own ERROR reaches the client, and the session goes on.

    A remotedaemon node answers every request the bridge lets through
    without ERROR (a GET it cannot serve is DATA 0 + INVALID; a local
    failure drops the connection). A special remote that git-annex proxies
    itself does send one: its failures come back as ``ERROR proxied special
    remote reports: ...``. Here it names the remote's directory on the proxy
    host, so the client is told that it failed and the operator's log keeps
    the words (docs/security.md); a harmless text is passed on verbatim
    (tests/core/test_clienttext.py).
    """
    store = tmp_path / "store"
    store.mkdir()
    uuid = proxy_repo.add_proxied_special_remote("sp", "type=directory", f"directory={store}")
    bridge = make_node_bridge([Expose("sp", "sp", 5002)])
    bridge.start()
    token = bridge.add_token("raw", "rw")
    data = os.urandom(20_000)
    key = f"SHA256E-s{len(data)}--{hashlib.sha256(data).hexdigest()}.bin"
    store.rmdir()  # the special remote's storage is gone
    with RawSession(token.socket) as r:
        r.auth(token.token, uuid)
        assert r.version(4) == "VERSION 4"
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("ERROR sp: failed (the gateway's log has the details)")
        assert f"directory {store} is not accessible" in bridge.log()
        store.mkdir()  # back
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("FAILURE")
        put_raw(r, key, data, version=4)
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("SUCCESS")
    stored = [p for p in store.rglob(key) if p.is_file()]
    assert [p.read_bytes() for p in stored] == [data], stored
