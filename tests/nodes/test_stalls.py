"""A node that stalls (SIGSTOP) at each phase of PUT, GET, REMOVE and LOCKCONTENT,
a client that stalls mid-transfer, and a node whose disk is full.

A stall is injected as the other faults are (tbnode.py): the relay that
carries the node's connection sends SIGSTOP to the node's remotedaemon at an
exact point of the byte stream, and passes on what it holds, so the node
has the line that made it stop. The bridge runs with short deadlines
(``STALLS``: ``peer_timeout`` and ``stall_timeout`` 5 s). Each test checks
what the client was told (the ``P2P < ERROR`` line names the node and the
deadline), that it was told at all (the command returns: the bridge does
not hang on a frozen node), then SIGCONTs the node and checks that it is
consistent (fsck, its objects and its own location log agree), that no
content lock was leaked (a REMOVE, which needs the exclusive lock, succeeds
afterwards) and that the bridge serves the next session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.annex import whereis_uuids
from tests.harness.client import AnnexProcess, error_naming, get_offsets, p2p_errors, put_offsets
from tests.harness.nodes import NodeServer, Setup, relay_helpers, wait_location
from tests.harness.process import Result, wait_for

pytestmark = pytest.mark.annex

MiB = 1024 * 1024
BIG = 24 * MiB
CUT = 8 * MiB  # where a transfer is stalled
STALLS = {"peer_timeout": 5.0, "stall_timeout": 5.0}
# A client command facing a frozen node returns within its deadlines: a few
# of them (git-annex retries a transfer that made progress, and each retry
# meets an OpenPeer deadline), never an unbounded wait.
BOUND = 120.0


def server_of(s: Setup) -> NodeServer:
    assert s.node.server is not None
    return s.node.server


def state(pid: int) -> str:
    """The process state letter (T: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@contextlib.contextmanager
def frozen_node(s: Setup, **trigger: object) -> Iterator[None]:
    """The node's remotedaemon is SIGSTOPped when ``trigger`` passes; SIGCONT at the end."""
    pid = server_of(s).pid
    s.net.set_fault(s.node.name, kill=pid, signal=int(signal.SIGSTOP), stop=False, **trigger)
    try:
        yield
        assert s.net.fired(s.node.name), "the stall never fired"
        assert state(pid) == "T", f"remotedaemon {pid} is not stopped"
    finally:
        os.kill(pid, signal.SIGCONT)


def settle(s: Setup) -> None:
    """After SIGCONT: the bridge's sessions and node connections are gone."""
    left = s.bridge.wait_idle(30)
    assert not left, left
    wait_for("the node connections to close", lambda: not relay_helpers(s.bridge), 30)
    s.bridge.assert_alive()


def timed(run: Callable[[], Result]) -> tuple[Result, float]:
    start = time.monotonic()
    result = run()
    return result, time.monotonic() - start


def told(result: Result, s: Setup, took: float, *causes: str) -> None:
    """The client failed, in time, with an ERROR naming the node and a cause."""
    print(f"\n{result.args[2:4]}: failed after {took:.1f}s with {p2p_errors(result)}")
    assert not result.ok, result.describe()
    assert took < BOUND, f"the client waited {took:.0f}s"
    error_naming(result, s.node.name, *causes)


def node_consistent(s: Setup, expected: dict[str, bytes]) -> None:
    """fsck passes in the node and it holds exactly ``expected`` (objects = its own log)."""
    s.node.assert_sound()
    s.node.assert_holds(expected)


def no_lock_leaked(s: Setup, name: str, key: str) -> None:
    """A REMOVE (git-annex takes the content's exclusive lock) of ``name`` succeeds."""
    if key not in s.node.objects():
        s.client.annex("copy", "--to", s.remote, "--", name, timeout=BOUND)
    s.client.annex("drop", "--from", s.remote, "--", name, timeout=BOUND)
    assert key not in s.node.objects()
    wait_location(s.proxy, key, s.node.uuid, present=False)


def next_session_works(s: Setup) -> None:
    s.client.add_file("probe", os.urandom(1000))
    result = s.client.annex("copy", "--to", s.remote, "--debug", "--", "probe")
    assert not p2p_errors(result), result.describe()
    s.bridge.assert_alive()


# --- the node stalls ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "trigger", "causes"),
    [
        # Before its answer to PUT (PUT-FROM / ALREADY-HAVE).
        ("request", {"up_line": "PUT "}, ("no message before the deadline",)),
        # Mid-body: the bridge cannot write to the node; the client's body
        # is drained, then it is told.
        ("body", {"up_bytes": CUT}, ("connection lost during transfer",)),
        # The whole body and VALID are with the node: its SUCCESS never comes.
        ("result", {"up_line": "VALID"}, ("no message before the deadline",)),
    ],
)
def test_node_stalls_during_put(
    phase: str,
    trigger: dict[str, object],
    causes: tuple[str, ...],
    setup_node: Callable[..., Setup],
) -> None:
    s = setup_node("p2p", limits=STALLS)
    # Ending in a newline, so that the VALID after the body starts a line
    # the relay can find.
    data = os.urandom(BIG - 1) + b"\n"
    s.client.add_file("big", data)
    key = s.client.key("big")
    with frozen_node(s, **trigger):
        first, took = timed(
            lambda: s.client.annex(
                "copy", "--to", s.remote, "--debug", "big", check=False, timeout=BOUND
            )
        )
        told(first, s, took, *causes)
        # Not recorded as stored anywhere while the node is frozen.
        assert s.node.uuid not in whereis_uuids(s.proxy, key)
        assert s.node.uuid not in whereis_uuids(s.client, key)
    settle(s)
    # The node, thawed, finds the connection gone. Only in the last phase
    # had it the whole content and VALID: it may store it, whole.
    stored = {key: data} if key in s.node.objects() else {}
    if phase != "result":
        assert not stored, f"{phase}: the node stored {key} from a failed PUT"
    node_consistent(s, stored)
    s.client.fsck_content()

    again = s.client.annex("copy", "--to", s.remote, "--debug", "big", timeout=BOUND)
    print(f"copy again: PUT-FROM {put_offsets(again)}")
    node_consistent(s, {key: data})
    assert s.node.uuid in whereis_uuids(s.client, key)
    if not stored:
        wait_location(s.proxy, key, s.node.uuid, present=True)
    # else the client found it by CHECKPRESENT (or ALREADY-HAVE) and logs it
    # itself; the bridge records only a PUT's SUCCESS (relay.py), so the
    # proxy's log lists the node once the client's git-annex branch arrives:
    # a copy not yet counted there, the safe side.
    no_lock_leaked(s, "big", key)
    next_session_works(s)


@pytest.mark.parametrize(
    ("phase", "trigger"),
    [
        ("request", {"up_line": "GET "}),  # before DATA
        ("body", {"down_bytes": CUT}),  # mid-body
    ],
)
def test_node_stalls_during_get(
    phase: str, trigger: dict[str, object], setup_node: Callable[..., Setup]
) -> None:
    s = setup_node("p2p", limits=STALLS)
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    key = s.client.key("big")
    s.client.annex("copy", "--to", s.remote, "big", timeout=BOUND)
    s.client.annex("drop", "big")
    with frozen_node(s, **trigger):
        first, took = timed(
            lambda: s.client.annex(
                "get", "--from", s.remote, "--debug", "big", check=False, timeout=BOUND
            )
        )
        if phase == "request":
            told(first, s, took, "no message before the deadline")
        else:
            # Inside a DATA body the protocol cannot say why: the bridge
            # closes the connection at stall_timeout, and its log says why.
            print(f"\nget: failed after {took:.1f}s")
            assert not first.ok and took < BOUND, first.describe()
            assert f"{s.node.name} lost during GET" in s.bridge.log()
        assert "big" not in s.client.present_here()
    settle(s)
    s.client.fsck_content()
    node_consistent(s, {key: data})

    partial = s.client.tmp_files().get(key, 0)
    again = s.client.annex("get", "--from", s.remote, "--debug", "big", timeout=BOUND)
    if phase == "body":
        assert 0 < partial < BIG and get_offsets(again) == [partial], again.describe()
    assert s.client.read("big") == data
    no_lock_leaked(s, "big", key)
    next_session_works(s)


def test_node_stalls_on_remove(setup_node: Callable[..., Setup]) -> None:
    """The REMOVE reaches the node, which freezes before answering.

    The client is told it failed; the node, thawed, may still carry the
    REMOVE out (it was asked): that is a copy fewer than the logs say, never
    a lost or corrupt one, and fsck --from tells the client the truth.
    """
    s = setup_node("p2p", limits=STALLS)
    s.client.add_file("f", b"remove me, maybe\n")
    key = s.client.key("f")
    s.client.annex("copy", "--to", s.remote, "f")
    wait_location(s.proxy, key, s.node.uuid, present=True)
    with frozen_node(s, up_line="REMOVE"):
        first, took = timed(
            lambda: s.client.annex(
                "drop", "--from", s.remote, "--debug", "f", check=False, timeout=BOUND
            )
        )
        told(first, s, took, "no message before the deadline")
        assert s.node.uuid in whereis_uuids(s.client, key)  # not claimed removed
        # The bridge cannot know whether the node removed it: its log stops
        # counting that copy (never a copy counted that may be gone).
        wait_location(s.proxy, key, s.node.uuid, present=False)
    settle(s)
    held = {key: b"remove me, maybe\n"} if key in s.node.objects() else {}
    print(f"after the thaw the node {'still has' if held else 'removed'} the object")
    node_consistent(s, held)
    assert s.client.read("f") == b"remove me, maybe\n"
    s.client.annex("fsck", "--from", s.remote, "--fast", "f", check=False)
    assert (s.node.uuid in whereis_uuids(s.client, key)) == bool(held)
    no_lock_leaked(s, "f", key)
    next_session_works(s)


def test_node_stalls_before_answering_lockcontent(setup_node: Callable[..., Setup]) -> None:
    """A local drop needs the node's copy locked; the node freezes on LOCKCONTENT."""
    s = setup_node("p2p", limits=STALLS)
    content = os.urandom(100_000)
    s.client.add_file("f", content)
    key = s.client.key("f")
    s.client.annex("copy", "--to", s.remote, "f")
    with frozen_node(s, up_line="LOCKCONTENT"):
        drop, took = timed(
            lambda: s.client.annex("drop", "--debug", "f", check=False, timeout=BOUND)
        )
        told(drop, s, took, "no message before the deadline")
        assert s.client.read("f") == content  # not dropped without the lock
    settle(s)
    node_consistent(s, {key: content})
    s.client.fsck_content()
    # The node took the lock after the thaw, on a dead connection: it must
    # have let it go, or this REMOVE could not take the exclusive lock.
    no_lock_leaked(s, "f", key)
    next_session_works(s)


def test_node_stalls_holding_a_lock(setup_node: Callable[..., Setup]) -> None:
    """The node answers LOCKCONTENT, then freezes with the lock held.

    The client drops its copy under that lock (git-annex's own protocol),
    and its UNLOCKCONTENT waits in the frozen node's socket. The session
    must end anyway; after the thaw the node must let the lock go.
    """
    s = setup_node("p2p", limits=STALLS)
    content = os.urandom(100_000)
    s.client.add_file("f", content)
    key = s.client.key("f")
    s.client.annex("copy", "--to", s.remote, "f")
    with frozen_node(s, down_after_up_line="LOCKCONTENT"):
        drop, took = timed(
            lambda: s.client.annex("drop", "--debug", "f", check=False, timeout=BOUND)
        )
        print(f"\ndrop under a frozen node's lock: ok={drop.ok} after {took:.1f}s")
        assert "P2P < SUCCESS" in drop.output and "P2P > UNLOCKCONTENT" in drop.output, (
            drop.describe()
        )
        assert took < BOUND
        # The bridge does not wait for the frozen node to end the session.
        left = s.bridge.wait_idle(30)
        assert not left, left
    settle(s)
    node_consistent(s, {key: content})
    if drop.ok:
        assert "f" not in s.client.present_here()
        s.client.annex("get", "--from", s.remote, "f", timeout=BOUND)
    assert s.client.read("f") == content
    no_lock_leaked(s, "f", key)
    next_session_works(s)


# --- the client stalls ---------------------------------------------------------------------


def _stall_client(s: Setup, tmp_path: Path, *args: str, **trigger: int) -> AnnexProcess:
    """Start ``git-annex ARGS``; it is SIGSTOPped when the node's relay sees ``trigger``."""
    pidfile = tmp_path / "client.pid"
    pidfile.write_text("0")
    s.net.set_fault(
        s.node.name, kill_file=str(pidfile), signal=int(signal.SIGSTOP), stop=False, **trigger
    )
    proc = AnnexProcess(s.client, *args, "--debug")
    pidfile.write_text(str(proc.pid))
    wait_for("the client to be stopped", lambda: s.net.fired(s.node.name), BOUND)
    return proc


def _thaw(proc: AnnexProcess) -> Result:
    assert state(proc.pid) == "T"
    os.kill(proc.pid, signal.SIGCONT)
    return proc.wait(timeout=BOUND)


def test_client_stalls_mid_put(setup_node: Callable[..., Setup], tmp_path: Path) -> None:
    s = setup_node("p2p", limits=STALLS)
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    key = s.client.key("big")
    proc = _stall_client(s, tmp_path, "copy", "--to", s.remote, "big", up_bytes=CUT)
    try:
        # stall_timeout ends the session and closes the node's connection
        # while the client is still frozen.
        wait_for("the session to end", lambda: "client lost" in s.bridge.log(), BOUND)
        settle(s)
        node_consistent(s, {})
        assert s.node.uuid not in whereis_uuids(s.proxy, key)
    finally:
        result = _thaw(proc)
    print(f"\nclient thawed after its session ended: returncode {result.returncode}")
    s.client.fsck_content()
    again = s.client.annex("copy", "--to", s.remote, "--debug", "big", timeout=BOUND)
    offsets = put_offsets(again)
    print(f"copy again: PUT-FROM {offsets}")
    node_consistent(s, {key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)
    next_session_works(s)


def test_client_stalls_mid_get(setup_node: Callable[..., Setup], tmp_path: Path) -> None:
    s = setup_node("p2p", limits=STALLS)
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    key = s.client.key("big")
    s.client.annex("copy", "--to", s.remote, "big", timeout=BOUND)
    s.client.annex("drop", "big")
    proc = _stall_client(s, tmp_path, "get", "--from", s.remote, "big", down_bytes=CUT)
    try:
        wait_for("the session to end", lambda: "client lost" in s.bridge.log(), BOUND)
        settle(s)
    finally:
        result = _thaw(proc)
    print(f"\nclient thawed after its session ended: returncode {result.returncode}")
    s.client.fsck_content()
    node_consistent(s, {key: data})
    s.client.annex("get", "--from", s.remote, "--debug", "big", timeout=BOUND)
    assert s.client.read("big") == data
    no_lock_leaked(s, "big", key)
    next_session_works(s)


# --- the node's disk is full ----------------------------------------------------------------

DISK_TAG = "torbridge-test-disk"


def _sweep_stale_disks() -> None:
    """Unmount small disks left by a test run that was killed (its pid is gone)."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            source, target = line.split()[:2]
            if not source.startswith(DISK_TAG + "-"):
                continue
            pid = int(source.rsplit("-", 1)[1])
            if not Path(f"/proc/{pid}").exists():
                subprocess.run(
                    ["umount", "-l", target.replace("\\040", " ")], check=False, timeout=30
                )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, unmounted at teardown (and swept if a run was killed)."""
    if os.geteuid() != 0 or subprocess.run(["which", "mount"], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    _sweep_stale_disks()
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=48m,mode=0755",
            f"{DISK_TAG}-{os.getpid()}",
            str(mountpoint),
        ],
        check=True,
        timeout=30,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=30)


@pytest.mark.parametrize("reserve", ["default", "none"])
def test_node_disk_full(reserve: str, small_disk: Path, setup_node: Callable[..., Setup]) -> None:
    """A 64 MiB copy to a node on a 48 MiB disk.

    ``default``: git-annex's annex.diskreserve (100 MiB) makes the node
    refuse before the body; ``none`` (diskreserve 0): the body is written
    until ENOSPC.
    """
    s = setup_node("p2p", root=small_disk)
    if reserve == "none":
        s.node.repo.git("config", "annex.diskreserve", "0")
        server_of(s).stop()
        server_of(s).start()
    huge = os.urandom(64 * MiB)
    s.client.add_files({"huge": huge, "small": b"fits\n"})
    key = s.client.key("huge")

    first = s.client.annex("copy", "--to", s.remote, "--debug", "huge", check=False, timeout=BOUND)
    print(
        f"\ncopy to a full node ({reserve}): ok={first.ok}, ERROR {p2p_errors(first)}, "
        f"{[ln for ln in first.output.splitlines() if 'P2P < FAILURE' in ln][:1]}"
    )
    assert not first.ok, first.describe()
    assert "copy huge" in first.output and "failed" in first.output, first.describe()
    settle(s)
    assert key not in s.node.objects()
    assert s.node.uuid not in whereis_uuids(s.proxy, key)
    assert s.node.uuid not in whereis_uuids(s.client, key)
    node_consistent(s, {})
    s.client.fsck_content()

    # Room again (the node's partial download goes): the next session works.
    for name in s.node.repo.tmp_files():
        (s.node.repo.path / ".git" / "annex" / "tmp" / name).unlink()
    s.client.annex("copy", "--to", s.remote, "small", timeout=BOUND)
    node_consistent(s, {s.client.key("small"): b"fits\n"})
    wait_location(s.proxy, s.client.key("small"), s.node.uuid, present=True)
    s.bridge.assert_alive()
