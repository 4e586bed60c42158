"""Under systemd (Type=notify) the daemon says READY only once it serves, STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.bridge import Bridge

pytestmark = pytest.mark.annex


def test_ready_after_listening_and_stopping_on_sigterm(
    make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    bridge = make_bridge()
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.settimeout(30)
    env = dict(bridge.env.env, NOTIFY_SOCKET=str(notify_path))
    daemon = subprocess.Popen(
        ["torbridge", "--config", str(bridge.config_path), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        messages: list[bytes] = []
        while not any(b"READY=1" in msg for msg in messages):
            messages.append(systemd.recv(4096))
        # READY means serving: the endpoint accepts and answers at once.
        token = bridge.add_token("n", "rw").token
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(bridge.socket_path()))
            s.sendall(f"AUTH 11111111-2222-3333-4444-555555555555 {token}\n".encode())
            assert s.recv(100).startswith(b"AUTH-SUCCESS ")
        assert any(b"STATUS=serving 1 endpoint(s)" in msg for msg in messages)

        daemon.send_signal(signal.SIGTERM)
        stopping = systemd.recv(4096)
        assert b"STOPPING=1" in stopping
        assert daemon.wait(timeout=30) == 0
        assert not os.path.exists(bridge.socket_path())
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        systemd.close()


def test_no_ready_when_startup_fails(make_bridge: Callable[..., Bridge], tmp_path: Path) -> None:
    bridge = make_bridge()
    bridge.config_path.write_text(
        bridge.config_text().replace(str(bridge.repository), str(tmp_path / "missing"))
    )
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.setblocking(False)
    started = time.monotonic()
    result = subprocess.run(
        ["torbridge", "--config", str(bridge.config_path), "serve"],
        env=dict(bridge.env.env, NOTIFY_SOCKET=str(notify_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert time.monotonic() - started < 30
    with pytest.raises(BlockingIOError):
        systemd.recv(4096)  # nothing was ever sent
    systemd.close()
