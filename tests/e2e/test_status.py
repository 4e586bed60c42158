"""`torbridge status` and the metrics socket show a real transfer while it runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tests.harness.annex import Client
from tests.harness.bridge import Bridge

pytestmark = pytest.mark.annex

SIZE = 80 * 1024 * 1024


def _metrics(bridge: Bridge) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(bridge.state_dir / "metrics.sock"))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK")
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = value
    return samples


def _status(bridge: Bridge) -> dict[str, object]:
    result = bridge.cli("status", "--json")
    snapshot: dict[str, object] = json.loads(result.stdout)
    return snapshot


def test_status_and_metrics_show_a_transfer_in_flight(bridge: Bridge, rw_client: Client) -> None:
    rw_client.add_file("big.bin", os.urandom(SIZE))
    # Slow enough (8 s) that a poll, which runs `torbridge status`, sees it
    # in flight even on a loaded machine: at full speed it took under 2 s.
    rw_client.git("config", "remote.hub.annex-bwlimit", "10MiB/s")
    copy = subprocess.Popen(
        ["git", "annex", "copy", "--to", "hub", "big.bin"],
        cwd=rw_client.path,
        env=rw_client.env.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen = None
        deadline = time.monotonic() + 60
        while seen is None and time.monotonic() < deadline and copy.poll() is None:
            for session in _status(bridge)["sessions"]:  # type: ignore[attr-defined]
                if session["request"] and session["request"].startswith("PUT"):
                    seen = session
            time.sleep(0.05)
        assert seen is not None, "no PUT seen in flight"
        assert seen["token"] == "client"
        assert seen["endpoint"] == "hub"
        assert seen["version"] == 4
        assert 0 < seen["bytes_in"] <= SIZE + 4096
        metrics = _metrics(bridge)
        in_flight = metrics.get(
            'torbridge_sessions{endpoint="hub"}', metrics.get("torbridge_sessions")
        )
        assert in_flight in ("1", "0")  # "0": it may have finished since
        assert int(metrics["torbridge_sessions_total"]) >= 1
    finally:
        assert copy.wait(timeout=120) == 0
    # After the session: the totals count every byte the client sent.
    metrics = _metrics(bridge)
    assert int(metrics["torbridge_bytes_in_total"]) >= SIZE
    text = bridge.cli("status").stdout
    assert "sessions in flight: 0" in text
    assert "endpoint hub" in text


def test_failed_auth_is_counted(bridge: Bridge, rw_client: Client) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(bridge.socket_path()))
        s.sendall(b"AUTH 11111111-2222-3333-4444-555555555555 " + b"0" * 128 + b"\n")
        assert s.recv(100).startswith(b"AUTH-FAILURE")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metrics(bridge).get("torbridge_auth_failures_total") == "1":
            return
        time.sleep(0.1)
    raise AssertionError(_metrics(bridge))
