"""Local sockets for the operator: status, metrics, and progress in the logs.

- ``<state_dir>/control.sock`` (0600): send ``status`` and get the JSON
  snapshot, or ``metrics``; ``torbridge status`` uses it. ``republish [cut]``
  publishes the onion again with the current authorized clients (``torbridge
  client add/revoke``) and answers once tor has it.
- ``<state_dir>/metrics.sock`` (0660): a minimal HTTP responder with the
  Prometheus text format (``curl --unix-socket .../metrics.sock http://x/``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from torbridge.config import Config
from torbridge.server.status import Registry, as_json

log = logging.getLogger("torbridge.status")

REQUEST_LIMIT = 8192
REQUEST_DEADLINE = 5.0
PROGRESS_INTERVAL = 60.0

ControlServer = Callable[[trio.SocketListener, Registry], Awaitable[None]]


def control_socket(config: Config) -> Path:
    return config.state_dir / "control.sock"


def metrics_socket(config: Config) -> Path:
    return config.state_dir / "metrics.sock"


async def _read_request(stream: trio.SocketStream, end: bytes) -> bytes:
    data = b""
    with trio.move_on_after(REQUEST_DEADLINE):
        while end not in data and len(data) < REQUEST_LIMIT:
            chunk = await stream.receive_some(REQUEST_LIMIT)
            if not chunk:
                break
            data += chunk
    return data


async def serve_control(listener: trio.SocketListener, registry: Registry) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            command = (await _read_request(stream, b"\n")).strip()
            if command == b"status":
                reply = as_json(registry.snapshot()) + "\n"
            elif command == b"metrics":
                reply = registry.metrics()
            elif command in (b"republish", b"republish cut"):
                # From `torbridge client add/revoke`: the authorized clients changed
                # ("cut": one was revoked, close the rendezvous circuits too).
                if registry.republish is None:
                    reply = "error: this daemon publishes no ephemeral onion\n"
                else:
                    error = await registry.republish(command == b"republish cut")
                    reply = f"error: {error}\n" if error else "published\n"
            else:
                reply = "error: send 'status', 'metrics' or 'republish'\n"
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(reply.encode())

    await trio.serve_listeners(handle, [listener])


async def serve_metrics(listener: trio.SocketListener, registry: Registry) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await _read_request(stream, b"\r\n\r\n")
            body = registry.metrics().encode()
            head = (
                "HTTP/1.0 200 OK\r\n"
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head + body)

    await trio.serve_listeners(handle, [listener])


async def log_progress(registry: Registry, interval: float = PROGRESS_INTERVAL) -> None:
    """A line per moving session every ``interval``: long transfers are visible."""
    last: dict[int, tuple[int, int]] = {}
    while True:
        await trio.sleep(interval)
        current = {}
        for session in list(registry.sessions.values()):
            now = (session.bytes_in, session.bytes_out)
            before = last.get(session.id, (0, 0))
            current[session.id] = now
            moved = now[0] - before[0] + now[1] - before[1]
            if moved:
                log.info(
                    "[%d] %s: in %d B, out %d B, %.1f KiB/s over the last %.0fs",
                    session.id,
                    session.endpoint_name,
                    now[0],
                    now[1],
                    moved / 1024 / interval,
                    interval,
                )
        last = current


def query(path: Path, command: str, timeout: float = 10.0) -> str:
    """Blocking client for the control socket (the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
