"""``token add`` hands out no onion address before the onion works (issue 15, item 3).

The CLI runs as a real process; it asks the daemon's control socket, served
here by the daemon's own ``serve_control`` over a real ``Registry`` (the
state the publisher reports into). Tor itself is not needed: the onion's
key and address are already in state_dir, as after the first publication.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.harness.ops import ONION
from torbridge.server.control import serve_control
from torbridge.server.status import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "onion_hostname").write_text(ONION + "\n")
    (state / "onion_ed25519_v3.key").write_text("ED25519-V3:not-used-here\n")
    config = tmp_path / "tb.toml"
    config.write_text(
        f'repository = "{tmp_path / "repo"}"\nstate_dir = "{state}"\n'
        f'socket_dir = "{tmp_path / "sock"}"\n'
        '[[expose]]\nname = "hub"\nremote = "."\nport = 5000\n'
        '[tor]\ncontrol = "127.0.0.1:1"\n'  # never dialled: the address is known
    )
    return config


def token_add(config: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torbridge",
            "--config",
            str(config),
            "token",
            "add",
            "alice",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class ControlServer:
    """The daemon's control socket, in a trio thread, over ``registry``."""

    def __init__(self, path: Path, registry: Registry) -> None:
        self.registry = registry
        self.started = threading.Event()
        self.path = path
        self.token: trio.lowlevel.TrioToken | None = None
        self.cancel: trio.CancelScope | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    async def _main(self) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(8)
        with trio.CancelScope() as self.cancel:
            self.token = trio.lowlevel.current_trio_token()
            self.started.set()
            await serve_control(trio.SocketListener(sock), self.registry)

    def close(self) -> None:
        assert self.token is not None and self.cancel is not None
        trio.from_thread.run_sync(self.cancel.cancel, trio_token=self.token)
        self.thread.join(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ControlServer]:
    registry = Registry()
    registry.onion_state = "publishing"
    write_config(tmp_path)
    server = ControlServer(tmp_path / "state" / "control.sock", registry)
    yield server
    server.close()


def test_no_daemon_prints_the_address_with_a_warning(tmp_path: Path) -> None:
    proc = token_add(write_config(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith(f"tor-annex::{ONION}:5000:"), out
    assert "the daemon is not running" in err and "15 minutes" in err, err


def test_waits_until_the_daemon_has_published(tmp_path: Path, daemon: ControlServer) -> None:
    proc = token_add(tmp_path / "tb.toml")
    assert proc.stderr is not None and proc.stdout is not None
    first = proc.stderr.readline()
    assert "waiting for tor to publish the onion service" in first, first
    assert proc.poll() is None  # still waiting: nothing printed yet
    daemon.registry.onion_published(ONION)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith(f"tor-annex::{ONION}:5000:"), out
    assert "warning" not in err, err


def test_no_wait_prints_at_once_and_says_it_is_not_published(
    tmp_path: Path, daemon: ControlServer
) -> None:
    proc = token_add(tmp_path / "tb.toml", "--no-wait")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith(f"tor-annex::{ONION}:5000:"), out
    assert "not published yet" in err and "waiting" not in err, err
