"""Faults between the bridge and a node, and clients dying mid-transfer.

Each fault is injected at an exact point of the byte stream by the relay
that carries the node's connection (tbnode.py: the ``git-annex-p2p-tbnode``
program for p2p nodes, the SOCKS server for tor nodes); it SIGKILLs the
node's remotedaemon, the relay itself, or the client's git-annex. Every test
then checks: what the client was told (``P2P < ERROR`` lines of ``--debug``
name the node and the cause, where the protocol allows a message at all),
that no object is corrupt (fsck in the node and the client), what the
proxy's location log says, and that the bridge serves the next session.
Tor's SOCKS refusals (reply codes) are node faults too: the client is told
what tor said, in words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import whereis_uuids
from tests.harness.client import AnnexProcess, error_naming, get_offsets, p2p_errors, put_offsets
from tests.harness.nodes import NodeServer, Setup, relay_helpers, wait_location
from tests.harness.process import Result, wait_for

pytestmark = pytest.mark.annex

MiB = 1024 * 1024
BIG = 50 * MiB
CUT = 20 * MiB  # where a transfer is cut


def server_of(s: Setup) -> NodeServer:
    assert s.node.server is not None
    return s.node.server


def add_big(s: Setup, name: str = "big") -> tuple[str, bytes]:
    data = os.urandom(BIG)
    s.client.add_file(name, data)
    return s.client.key(name), data


def restart_after_kill(s: Setup) -> None:
    server = server_of(s)
    server.wait_dead()
    server.start()


def assert_no_object(s: Setup, key: str) -> None:
    assert key not in s.node.objects(), f"{key} in {s.node.name} after a failed transfer"
    assert s.node.uuid not in whereis_uuids(s.node.repo, key)


def assert_next_session_works(s: Setup) -> None:
    """The bridge is alive and serves a new session to the node."""
    s.bridge.assert_alive()
    result = s.client.annex("copy", "--to", s.remote, "--debug", "--", "probe")
    assert not p2p_errors(result), result.describe()


def add_probe(s: Setup) -> None:
    s.client.add_file("probe", os.urandom(1000))


# --- the node is not there at all ------------------------------------------------------


@pytest.mark.parametrize("kind", ["p2p", "tor"])
def test_node_down_at_session_start(kind: str, setup_node: Callable[..., Setup]) -> None:
    s = setup_node(kind)
    s.client.add_file("f", b"content\n")
    key = s.client.key("f")
    server_of(s).stop()

    down = s.client.annex("copy", "--to", s.remote, "--debug", "f", check=False)
    assert not down.ok, down.describe()
    assert_no_object(s, key)
    assert s.node.uuid not in whereis_uuids(s.proxy, key)
    assert s.node.uuid not in whereis_uuids(s.client, key)

    # The node comes back: the bridge reaches it on the next session.
    server_of(s).start()
    s.client.annex("copy", "--to", s.remote, "f")
    s.node.assert_holds({key: b"content\n"})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    s.node.assert_sound()
    s.bridge.assert_alive()

    # The client hears which node failed; the cause is in the operator's log
    # (protocol/clienttext.py: it may name an onion or a path).
    error_naming(down, s.node.name, "unreachable")
    if kind == "p2p":
        assert "not listening" in s.bridge.log() and "Connection refused" in s.bridge.log()
    else:
        # tor (our SOCKS server) answers 0xF0 for an onion whose service is down.
        assert s.node.onion is not None and f"{s.node.onion}:5555" in s.socks.requests
        assert "descriptor not found" in s.bridge.log()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0xF2, "onion service introduction failed"),
        (0xF6, "invalid onion address"),
        (0x01, "general SOCKS server failure"),
        (0x05, "connection refused"),
    ],
)
def test_socks_reply_codes_are_told(
    code: int, words: str, setup_node: Callable[..., Setup]
) -> None:
    """Tor's answer to the CONNECT, other than success, reaches the operator's log
    in words; the client hears that the node is unreachable."""
    s = setup_node("tor")
    s.client.add_file("f", b"content\n")
    key = s.client.key("f")
    assert s.node.onion is not None
    s.socks.replies[s.node.onion] = code

    down = s.client.annex("copy", "--to", s.remote, "--debug", "f", check=False)
    assert not down.ok, down.describe()
    error_naming(down, s.node.name, "unreachable")
    assert words in s.bridge.log()
    assert_no_object(s, key)
    assert s.node.uuid not in whereis_uuids(s.proxy, key)

    del s.socks.replies[s.node.onion]
    s.client.annex("copy", "--to", s.remote, "f")
    s.node.assert_holds({key: b"content\n"})
    s.bridge.assert_alive()


# --- the node dies in the middle of an exchange ------------------------------------------


@pytest.mark.parametrize(
    ("kind", "victim"),
    [("p2p", "remotedaemon"), ("tor", "remotedaemon"), ("p2p", "relay")],
)
def test_node_killed_mid_put(kind: str, victim: str, setup_node: Callable[..., Setup]) -> None:
    s = setup_node(kind)
    key, data = add_big(s)
    add_probe(s)
    kill = server_of(s).pid if victim == "remotedaemon" else 0
    s.net.set_fault(s.node.name, up_bytes=CUT, kill=kill)

    first = s.client.annex("copy", "--to", s.remote, "--debug", "big", check=False, timeout=180)
    assert s.net.fired(s.node.name), "the fault never fired"
    error_naming(first, s.node.name, "connection lost during transfer")
    if victim == "remotedaemon":
        assert not first.ok, first.describe()
        assert_no_object(s, key)
        partial = s.node.repo.tmp_files().get(key, 0)
        assert 0 < partial < BIG, f"partial upload in the node: {s.node.repo.tmp_files()}"
        assert s.node.uuid not in whereis_uuids(s.proxy, key)
        s.node.assert_sound()
        restart_after_kill(s)
        second = s.client.annex("copy", "--to", s.remote, "--debug", "big", timeout=180)
        # The node kept the partial file: the upload resumes from it.
        assert put_offsets(second) == [partial], second.describe()
    else:
        # Only the relay died: git-annex retried at once, on a new connection
        # through the bridge, and the node resumed from what it had received.
        assert first.ok, first.describe()
        offsets = put_offsets(first)
        assert len(offsets) == 2 and offsets[0] == 0 and 0 < offsets[1] <= CUT, offsets
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    s.node.assert_sound()
    assert_next_session_works(s)


@pytest.mark.parametrize(
    ("kind", "victim"),
    [("p2p", "remotedaemon"), ("tor", "remotedaemon"), ("p2p", "relay")],
)
def test_node_killed_mid_get(kind: str, victim: str, setup_node: Callable[..., Setup]) -> None:
    s = setup_node(kind)
    key, data = add_big(s)
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "big", timeout=180)
    s.client.annex("drop", "big")
    kill = server_of(s).pid if victim == "remotedaemon" else 0
    s.net.set_fault(s.node.name, down_bytes=CUT, kill=kill)

    first = s.client.annex("get", "--from", s.remote, "--debug", "big", check=False, timeout=180)
    assert s.net.fired(s.node.name), "the fault never fired"
    assert not first.ok, first.describe()
    # Inside a DATA body the protocol has no way to say why: the bridge can only
    # close the connection (the client sees "Transfer failed"); its log says why.
    assert f"{s.node.name} lost during GET" in s.bridge.log(), s.bridge.log()[-3000:]
    assert "big" not in s.client.present_here()
    partial = s.client.tmp_files().get(key, 0)
    assert 0 < partial < BIG, f"client's partial download: {s.client.tmp_files()}"
    s.client.fsck_content()
    s.node.assert_holds({key: data})
    s.node.assert_sound()

    if victim == "remotedaemon":
        restart_after_kill(s)
    second = s.client.annex("get", "--from", s.remote, "--debug", "big", timeout=180)
    assert get_offsets(second) == [partial], second.describe()  # resumed
    assert s.client.read("big") == data
    s.client.fsck_content()
    assert_next_session_works(s)


def test_node_killed_right_before_remove(setup_node: Callable[..., Setup]) -> None:
    s = setup_node("p2p")
    s.client.add_file("f", b"keep me\n")
    key = s.client.key("f")
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "f")
    wait_location(s.proxy, key, s.node.uuid, present=True)
    # The REMOVE never reaches the node: its remotedaemon dies first.
    s.net.set_fault(s.node.name, up_line="REMOVE", kill=server_of(s).pid)

    first = s.client.annex("drop", "--from", s.remote, "--debug", "f", check=False)
    assert s.net.fired(s.node.name), "the fault never fired"
    assert not first.ok, first.describe()
    error_naming(first, s.node.name, "unreachable")
    assert "Connection refused" in s.bridge.log()
    s.node.assert_holds({key: b"keep me\n"})
    assert s.node.uuid in whereis_uuids(s.client, key)
    # The bridge wrote the REMOVE and never heard back: for all it knows the
    # node removed the object, so its log stops counting that copy (the safe
    # side: a copy not counted is never the last one dropped elsewhere).
    wait_location(s.proxy, key, s.node.uuid, present=False)
    s.node.assert_sound()

    restart_after_kill(s)
    s.client.annex("drop", "--from", s.remote, "f")
    s.node.assert_holds({})
    wait_location(s.proxy, key, s.node.uuid, present=False)
    assert s.client.read("f") == b"keep me\n"
    assert_next_session_works(s)


def test_node_killed_while_lockcontent_held(setup_node: Callable[..., Setup]) -> None:
    """A local drop with the node as the only other copy; the node dies holding the lock.

    What git-annex does: it locks the content on the node (LOCKCONTENT ->
    SUCCESS), drops its own copy under that lock, then sends UNLOCKCONTENT
    (which goes nowhere). The drop succeeds; the node's content was never at
    risk (a dead node removes nothing; git-annex also leaves ``KEY.rtm``/
    ``.rtl`` beside the object to protect it for 10 minutes after a lock
    holder dies). Nothing is lost: the node still has it, byte for byte.
    """
    s = setup_node("p2p")
    content = os.urandom(100_000)
    s.client.add_file("f", content)
    key = s.client.key("f")
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "f")
    s.net.set_fault(s.node.name, down_after_up_line="LOCKCONTENT", kill=server_of(s).pid)

    drop = s.client.annex("drop", "--debug", "f", check=False)
    assert s.net.fired(s.node.name), "the fault never fired"
    assert "P2P < SUCCESS" in drop.output and "P2P > UNLOCKCONTENT" in drop.output, drop.describe()
    if drop.ok:
        assert "f" not in s.client.present_here()
    else:
        assert s.client.read("f") == content
    # Whatever the client did, the node's copy is there and sound.
    s.node.assert_holds({key: content})
    s.node.assert_sound()
    s.client.fsck_content()

    restart_after_kill(s)
    s.client.annex("get", "--from", s.remote, "f")
    assert s.client.read("f") == content
    assert_next_session_works(s)


# The node dies at a phase boundary: it has done what it was asked (received
# the request, stored or sent the body, removed the object) and is SIGKILLed
# as its answer leaves, so that the answer never reaches the bridge. Which
# copy of the key exists afterwards is then certain.
NODE_PHASES: dict[str, tuple[str, dict[str, object]]] = {
    # PUT received; its PUT-FROM never comes.
    "put-request": ("put", {"down_line": "PUT-FROM"}),
    # Body and VALID received (the node stores the object); SUCCESS never comes.
    "put-result": ("put", {"down_line": "SUCCESS"}),
    # GET received; the DATA never comes.
    "get-request": ("get", {"down_line": "DATA"}),
    # The whole GET body came through; the VALID after it never comes.
    "get-validity": ("get", {"down_line": "VALID"}),
    # REMOVE received (the node removes the object); its SUCCESS never comes.
    "remove-reply": ("remove", {"down_line": "SUCCESS"}),
}
COMMANDS = {"put": ("copy", "--to"), "get": ("get", "--from"), "remove": ("drop", "--from")}


@pytest.mark.parametrize(
    ("kind", "phase"),
    [("p2p", phase) for phase in NODE_PHASES] + [("tor", "put-result"), ("tor", "get-validity")],
)
def test_node_killed_at_phase(kind: str, phase: str, setup_node: Callable[..., Setup]) -> None:
    s = setup_node(kind)
    op, trigger = NODE_PHASES[phase]
    data = os.urandom(2 * MiB - 1) + b"\n"  # so that a VALID after it starts a line
    s.client.add_file("f", data)
    key = s.client.key("f")
    add_probe(s)
    if op != "put":
        s.client.annex("copy", "--to", s.remote, "f")
        wait_location(s.proxy, key, s.node.uuid, present=True)
    if op == "get":
        s.client.annex("drop", "f")
    s.net.set_fault(s.node.name, kill=server_of(s).pid, **trigger)

    first = s.client.annex(*COMMANDS[op], s.remote, "--debug", "f", check=False)
    assert s.net.fired(s.node.name), "the fault never fired"
    server_of(s).wait_dead()
    if phase == "get-validity":
        # The body arrived whole, but nobody vouches for it: the bridge says
        # INVALID and git-annex checks the content itself before keeping it.
        assert "P2P < INVALID" in first.output, first.describe()
        if first.ok:
            assert s.client.read("f") == data
        else:
            assert "f" not in s.client.present_here()
    else:
        assert not first.ok, first.describe()
        # A request's answer lost: the bridge tries once more on a new
        # connection, which finds the node gone. A PUT body is not resent.
        cause = "connection closed" if phase == "put-result" else "unreachable"
        error_naming(first, s.node.name, cause)
    # What the node holds is certain; its fsck and the client's find nothing wrong.
    held = {} if op == "remove" or phase == "put-request" else {key: data}
    s.node.assert_holds(held)
    s.node.assert_sound()
    s.client.fsck_content()
    # The proxy's log never lists the node for an object the node lacks.
    if not held:
        wait_location(s.proxy, key, s.node.uuid, present=False)
    if op == "get":
        assert s.node.uuid in whereis_uuids(s.proxy, key)  # a GET changes nothing

    # The node is back: the bridge serves the next session.
    server_of(s).start()
    if op == "remove":
        s.client.annex("fsck", "--from", s.remote, "--fast", "f", check=False)
        assert s.node.uuid not in whereis_uuids(s.client, key)
        s.client.annex("copy", "--to", s.remote, "f")
        s.node.assert_holds({key: data})
    else:
        s.client.annex(*COMMANDS[op], s.remote, "f")
    assert s.client.read("f") == data
    if op == "put":
        s.node.assert_holds({key: data})
        assert s.node.uuid in whereis_uuids(s.client, key)
    assert_next_session_works(s)


# --- the client dies ------------------------------------------------------------------------


def _kill_client_mid_transfer(s: Setup, tmp_path: Path, *args: str, **fault: object) -> Result:
    """Run ``git-annex ARGS`` and SIGKILL it when the node's relay has seen ``fault``."""
    pidfile = tmp_path / "client.pid"
    s.net.set_fault(s.node.name, kill_file=str(pidfile), stop=False, **fault)
    pidfile.write_text("0")
    proc = AnnexProcess(s.client, *args, "--debug")
    pidfile.write_text(str(proc.pid))
    result = proc.wait(timeout=180)
    assert s.net.fired(s.node.name), "the fault never fired"
    assert result.returncode == -9, result.describe()
    return result


def _session_ended(s: Setup, text: str) -> None:
    """The bridge noticed the dead client and ended its session promptly."""
    wait_for(f"{text!r} in the bridge log", lambda: text in s.bridge.log(), 30)
    left = s.bridge.wait_idle(30)
    assert not left, left
    wait_for("the node connection to close", lambda: not relay_helpers(s.bridge), 30)
    wait_for("torbridge status to show no session", lambda: not live_sessions(s), 30)


def live_sessions(s: Setup) -> list[dict[str, object]]:
    """The sessions ``torbridge status`` shows in flight."""
    sessions: list[dict[str, object]] = json.loads(s.bridge.cli("status", "--json").stdout)[
        "sessions"
    ]
    return sessions


def client_session_end(s: Setup) -> str:
    """The bridge log's line for the end of a session whose client died (waits for it)."""
    found: list[str] = []

    def ended() -> bool:
        found[:] = [
            line
            for line in s.bridge.log().splitlines()
            if "session end" in line and ("client lost" in line or "mid-exchange" in line)
        ]
        return bool(found)

    wait_for("the session of the dead client to end in the bridge log", ended, 30)
    return found[-1]


def test_client_killed_mid_put(setup_node: Callable[..., Setup], tmp_path: Path) -> None:
    s = setup_node("p2p")
    key, data = add_big(s)
    add_probe(s)
    _kill_client_mid_transfer(s, tmp_path, "copy", "--to", s.remote, "big", up_bytes=CUT)
    _session_ended(s, "client lost")
    assert_no_object(s, key)
    assert s.node.uuid not in whereis_uuids(s.proxy, key)
    s.node.assert_sound()
    s.client.fsck_content()

    again = s.client.annex("copy", "--to", s.remote, "--debug", "big", timeout=180)
    offsets = put_offsets(again)
    assert len(offsets) == 1 and CUT <= offsets[0] < BIG, again.describe()  # resumed
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    s.node.assert_sound()
    assert_next_session_works(s)


def test_client_killed_mid_get(setup_node: Callable[..., Setup], tmp_path: Path) -> None:
    s = setup_node("p2p")
    key, data = add_big(s)
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "big", timeout=180)
    s.client.annex("drop", "big")
    _kill_client_mid_transfer(s, tmp_path, "get", "--from", s.remote, "big", down_bytes=CUT)
    _session_ended(s, "client lost")
    s.node.assert_holds({key: data})
    s.node.assert_sound()
    s.client.fsck_content()
    partial = s.client.tmp_files().get(key, 0)

    again = s.client.annex("get", "--from", s.remote, "--debug", "big", timeout=180)
    assert get_offsets(again) == [partial], again.describe()
    assert s.client.read("big") == data
    assert_next_session_works(s)


def test_client_killed_waiting_for_put_from(
    setup_node: Callable[..., Setup], tmp_path: Path
) -> None:
    """The node's PUT-FROM is on its way when the client dies."""
    s = setup_node("p2p")
    data = os.urandom(MiB)
    s.client.add_file("f", data)
    key = s.client.key("f")
    add_probe(s)
    _kill_client_mid_transfer(s, tmp_path, "copy", "--to", s.remote, "f", down_line="PUT-FROM")
    client_session_end(s)
    _session_ended(s, "session end")
    assert_no_object(s, key)
    assert s.node.uuid not in whereis_uuids(s.proxy, key)
    s.node.assert_sound()
    s.client.fsck_content()

    s.client.annex("copy", "--to", s.remote, "f")
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    assert_next_session_works(s)


def test_client_killed_waiting_for_put_result(
    setup_node: Callable[..., Setup], tmp_path: Path
) -> None:
    """The client dies after its VALID: the node still gets it, stores, answers SUCCESS.

    The object is stored whole in the node, and the proxy's log, which saw the
    SUCCESS, says so (the dead client's log does not: it never heard).
    """
    s = setup_node("p2p")
    data = os.urandom(MiB - 1) + b"\n"  # so that VALID starts a line the relay finds
    s.client.add_file("f", data)
    key = s.client.key("f")
    add_probe(s)
    _kill_client_mid_transfer(s, tmp_path, "copy", "--to", s.remote, "f", up_line="VALID")
    client_session_end(s)
    _session_ended(s, "session end")
    s.node.assert_holds({key: data})
    s.node.assert_sound()
    wait_location(s.proxy, key, s.node.uuid, present=True)
    s.client.fsck_content()

    again = s.client.annex("copy", "--to", s.remote, "--debug", "f")
    assert "PUT " not in again.output, again.describe()  # CHECKPRESENT: it is there
    assert s.node.uuid in whereis_uuids(s.client, key)
    assert_next_session_works(s)


def test_client_killed_during_remove(setup_node: Callable[..., Setup], tmp_path: Path) -> None:
    """The client dies as its REMOVE leaves: the node removes, the proxy's log learns it."""
    s = setup_node("p2p")
    s.client.add_file("f", b"remove me\n")
    key = s.client.key("f")
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "f")
    wait_location(s.proxy, key, s.node.uuid, present=True)
    _kill_client_mid_transfer(s, tmp_path, "drop", "--from", s.remote, "f", up_line="REMOVE")
    # The SIGKILL is sent as the REMOVE passes the node's relay and lands a
    # moment later: the node's SUCCESS may reach the client's socket first, and
    # the session then ends as "client closed" between exchanges. Both are right;
    # what matters is below.
    _session_ended(s, "session end")
    s.node.assert_holds({})
    s.node.assert_sound()
    wait_location(s.proxy, key, s.node.uuid, present=False)
    assert s.client.read("f") == b"remove me\n"
    s.client.fsck_content()

    s.client.annex("copy", "--to", s.remote, "f")
    s.node.assert_holds({key: b"remove me\n"})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    assert_next_session_works(s)


# A raw protocol client in a process of its own: it takes a content lock in
# the node through the bridge, says so, and holds it until it is killed.
LOCK_HOLDER = """
import sys
from tests.harness.session import RawSession
path, token, uuid, key = sys.argv[1:]
r = RawSession(path)
r.auth(token, uuid)
assert r.version(4) == "VERSION 4"
r.send_line("LOCKCONTENT " + key)
r.expect("SUCCESS")
print("LOCKED", flush=True)
sys.stdin.read()
"""


def test_client_killed_holding_lockcontent(setup_node: Callable[..., Setup]) -> None:
    """LOCKCONTENT, SUCCESS, then the client is SIGKILLed: the node lets the lock go."""
    s = setup_node("p2p")
    content = b"locked in the node\n"
    s.client.add_file("f", content)
    key = s.client.key("f")
    add_probe(s)
    s.client.annex("copy", "--to", s.remote, "f")
    token = s.bridge.add_token("raw", "rw", endpoint=s.remote)
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(token.socket), token.token, s.node.uuid, key],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        said = holder.stdout.readline()
        assert said == "LOCKED\n", f"{said!r} {holder.communicate(timeout=10)}"
        # The lock is real, in the node: a REMOVE cannot take the content
        # (git-annex's node refuses by hanging up: "content is locked").
        refused = s.client.annex("drop", "--from", s.remote, "--debug", "f", check=False)
        assert not refused.ok, refused.describe()
        error_naming(refused, s.node.name, "connection closed")
        s.node.assert_holds({key: content})
        assert live_sessions(s), "the lock holder's session is not in torbridge status"
    finally:
        holder.kill()
        holder.communicate(timeout=10)
    _session_ended(s, "session end, token raw")
    assert "token raw" in client_session_end(s)

    # Released in the node: a REMOVE through the bridge now succeeds.
    s.client.annex("drop", "--from", s.remote, "f")
    s.node.assert_holds({})
    wait_location(s.proxy, key, s.node.uuid, present=False)
    assert_next_session_works(s)
