"""With tor's HiddenServiceExportCircuitID, the daemon keys caps and backoff by circuit.

tor itself is not needed to test this: each raw connection starts with the
PROXY line tor would write for its circuit, exactly as tor writes it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.annex import Client
from tests.harness.bridge import Bridge

pytestmark = pytest.mark.annex

CLIENT_UUID = "11111111-2222-3333-4444-555555555555"


def proxy_line(circuit: int) -> bytes:
    source = f"fc00:dead:beef:4dad::{circuit >> 16:x}:{circuit & 0xFFFF:x}"
    return f"PROXY TCP6 {source} ::1 65535 5000\r\n".encode()


class CircuitBridge(Bridge):
    def config_text(self) -> str:
        hs_dir = self.workdir / "hs"
        hs_dir.mkdir(exist_ok=True)
        (hs_dir / "hostname").write_text("a" * 56 + ".onion\n")
        return super().config_text() + (
            f'\n[tor]\nonion = "torrc"\nhidden_service_dir = "{hs_dir}"\n'
            "export_circuit_id = true\n\n[limits]\nmax_per_circuit = 2\n"
        )


def new_token(bridge: Bridge, name: str) -> str:
    """With Tor configured, token add prints tor-annex lines: take the token."""
    [line] = bridge.cli("token", "add", name).stdout.split()
    assert line.startswith(f"tor-annex::{'a' * 56}.onion:5000:")
    return line.rpartition(":")[2]


def connect(bridge: Bridge, first: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(bridge.socket_path()))
    s.sendall(first)
    return s


def reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def circuit_bridge(make_bridge: Callable[..., Bridge], tmp_path: Path) -> Bridge:
    bridge = make_bridge()
    bridge.__class__ = CircuitBridge  # same fixture lifecycle, config with [tor]
    bridge.write_config()
    bridge.start()
    return bridge


def test_auth_through_a_circuit_and_backoff_after_a_failure(circuit_bridge: Bridge) -> None:
    token = new_token(circuit_bridge, "c")
    good = connect(circuit_bridge, proxy_line(7) + f"AUTH {CLIENT_UUID} {token}\n".encode())
    assert reply(good).startswith(b"AUTH-SUCCESS ")
    good.close()

    bad = connect(circuit_bridge, proxy_line(9) + f"AUTH {CLIENT_UUID} {'0' * 128}\n".encode())
    assert reply(bad) == b"AUTH-FAILURE\n"
    bad.close()
    # The same circuit is turned away at once, even with a good token...
    again = connect(circuit_bridge, proxy_line(9) + f"AUTH {CLIENT_UUID} {token}\n".encode())
    assert reply(again) == b""
    again.close()
    # ...while another circuit is served.
    other = connect(circuit_bridge, proxy_line(10) + f"AUTH {CLIENT_UUID} {token}\n".encode())
    assert reply(other).startswith(b"AUTH-SUCCESS ")
    other.close()


def test_connections_per_circuit_are_capped(circuit_bridge: Bridge) -> None:
    first = connect(circuit_bridge, proxy_line(3))
    second = connect(circuit_bridge, proxy_line(3))
    third = connect(circuit_bridge, proxy_line(3))
    assert reply(third) == b""  # closed: max_per_circuit = 2
    for s in (first, second, third):
        s.close()


def test_a_stream_without_tor_s_line_is_closed(circuit_bridge: Bridge) -> None:
    token = new_token(circuit_bridge, "c")
    s = connect(circuit_bridge, f"AUTH {CLIENT_UUID} {token}\n".encode())
    assert reply(s) == b""
    s.close()


def test_local_clients_need_no_proxy_line(circuit_bridge: Bridge, client: Client) -> None:
    # git-annex-p2p-torbridge hands its pipes over: it is local, not from tor.
    token = new_token(circuit_bridge, "local")
    client.link(f"p2p-annex::torbridge:{circuit_bridge.socket_path()}:{token}", "hub")
    client.add_file("f.txt", b"through the local transport\n")
    client.annex("copy", "--to", "hub", "f.txt")
