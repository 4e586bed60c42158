"""Reload (SIGHUP) and drain (SIGTERM) with a stock client mid-transfer.

The client's ``git annex copy`` of a big file is frozen (SIGSTOP of its
process group) once part of the file has reached the proxy, so the daemon
gets its signal while the transfer is in flight, for sure; then it goes on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from functools import partial

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.process import wait_for as harness_wait_for

pytestmark = pytest.mark.annex

BIG = 96 * 1024 * 1024
T = 120.0


# The harness's poll, with this module's deadline.
wait_for = partial(harness_wait_for, timeout=T)


class FrozenCopy:
    """``git annex copy --to hub BIG`` in its own process group, frozen mid-transfer."""

    def __init__(self, client: Client, proxy: AnnexRepo) -> None:
        client.add_file("big.bin", os.urandom(BIG))
        self.key = client.key("big.bin")
        self.proc = subprocess.Popen(
            ["git", "annex", "copy", "--to", "hub", "big.bin"],
            cwd=client.path,
            env=client.env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            "part of the file in the proxy",
            lambda: any(size > 0 for size in proxy.tmp_files().values()),
        )
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> str:
        os.killpg(self.proc.pid, signal.SIGCONT)
        out, _ = self.proc.communicate(timeout=T)
        assert self.proc.returncode == 0, out.decode(errors="replace")
        return out.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.wait()


@pytest.fixture
def drain_bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    bridge = make_bridge()
    bridge.set_limits(drain_timeout=T)
    bridge.start()
    return bridge


@pytest.fixture
def frozen(drain_bridge: Bridge, client: Client, proxy_repo: AnnexRepo) -> Iterator[FrozenCopy]:
    client.link(drain_bridge.add_token("client", "rw").line, "hub")
    copy = FrozenCopy(client, proxy_repo)
    yield copy
    copy.close()


def connectable(path: os.PathLike[str]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


def test_sigterm_lets_the_transfer_in_flight_finish(
    drain_bridge: Bridge, frozen: FrozenCopy, proxy_repo: AnnexRepo
) -> None:
    bridge = drain_bridge
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGTERM)
    wait_for("the daemon to stop accepting", lambda: not bridge.socket_path().exists())
    assert not connectable(bridge.socket_path())
    assert "SIGTERM: no new connections; 1 request(s) in flight" in bridge.log()
    assert bridge.proc.poll() is None  # still serving the frozen transfer
    frozen.resume()
    assert proxy_repo.has_key(frozen.key)
    proxy_repo.fsck_content()
    assert bridge.proc.wait(timeout=T) == 0
    bridge.returncode = 0
    assert "drain: no request in flight; stopping" in bridge.log()


def test_sigterm_grace_runs_out(
    make_bridge: Callable[..., Bridge], client: Client, proxy_repo: AnnexRepo
) -> None:
    """A transfer that does not finish within drain_timeout is cut; exit 0."""
    bridge = make_bridge()
    bridge.set_limits(drain_timeout=1)
    bridge.start()
    client.link(bridge.add_token("client", "rw").line, "hub")
    copy = FrozenCopy(client, proxy_repo)
    try:
        bridge.stop(timeout=60)  # SIGTERM; asserts exit 0 and the sockets gone
        assert "1 request(s) still in flight after 1s; stopping anyway" in bridge.log()
    finally:
        copy.close()
    assert not proxy_repo.has_key(copy.key)
    proxy_repo.fsck_content()


def test_sighup_adds_and_removes_endpoints_without_dropping_the_transfer(
    drain_bridge: Bridge,
    frozen: FrozenCopy,
    proxy_repo: AnnexRepo,
    make_client: Callable[[str], Client],
) -> None:
    bridge = drain_bridge
    assert bridge.proc is not None
    bridge.exposes.append(Expose("second", ".", 5002))
    bridge.set_limits(drain_timeout=T, max_sessions_per_token=4)
    bridge.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "configuration reloaded" in bridge.log())
    assert connectable(bridge.socket_path("second"))
    frozen.resume()  # the session of the endpoint that stayed was not dropped
    assert proxy_repo.has_key(frozen.key)

    other = make_client("other")
    other.link(bridge.add_token("other", "rw", endpoint="second").line, "second")
    other.add_file("small.txt", b"through the endpoint added by a reload\n")
    other.annex("copy", "--to", "second", "small.txt", timeout=T)
    assert proxy_repo.key_content(other.key("small.txt")) == (
        b"through the endpoint added by a reload\n"
    )

    bridge.exposes.pop()
    bridge.set_limits(drain_timeout=T)
    bridge.proc.send_signal(signal.SIGHUP)
    wait_for("the second reload", lambda: bridge.log().count("configuration reloaded") == 2)
    assert not bridge.socket_path("second").exists()
    assert "reload: endpoint second removed" in bridge.log()
    status = bridge.cli("status").stdout
    assert "endpoint hub:" in status and "endpoint second" not in status, status


def test_sighup_with_a_broken_config_keeps_serving(
    bridge: Bridge, rw_client: Client, proxy_repo: AnnexRepo
) -> None:
    assert bridge.proc is not None
    good = bridge.config_path.read_text()
    bridge.config_path.write_text(good + "\n[limits]\nidle_timout = 3\n")
    bridge.proc.send_signal(signal.SIGHUP)
    wait_for("the refusal", lambda: "keeping the running configuration" in bridge.log())
    assert "idle_timout" in bridge.log()
    rw_client.add_file("after.txt", b"still serving\n")
    rw_client.annex("copy", "--to", "hub", "after.txt", timeout=T)
    assert proxy_repo.key_content(rw_client.key("after.txt")) == b"still serving\n"
