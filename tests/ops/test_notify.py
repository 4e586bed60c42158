"""sd_notify: the tests play systemd, with a unix datagram socket of their own."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from torbridge.server import notify


class FakeSystemd:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def received(self) -> bytes:
        self.sock.settimeout(5)
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        found = []
        while True:
            try:
                found.append(self.sock.recv(4096))
            except BlockingIOError:
                return found


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield FakeSystemd(sock)


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready() is False
    assert notify.stopping() is False
    assert notify.status("x") is False
    assert notify.watchdog() is False


def test_ready(systemd: FakeSystemd) -> None:
    assert notify.ready() is True
    assert systemd.received() == b"READY=1"


def test_ready_with_status(systemd: FakeSystemd) -> None:
    assert notify.ready("serving 3 endpoints") is True
    assert systemd.received() == b"READY=1\nSTATUS=serving 3 endpoints"


def test_stopping(systemd: FakeSystemd) -> None:
    assert notify.stopping() is True
    assert systemd.received() == b"STOPPING=1"


def test_status_is_one_line(systemd: FakeSystemd) -> None:
    assert notify.status("onion published:\n  abc.onion") is True
    assert systemd.received() == b"STATUS=onion published: abc.onion"


def test_watchdog(systemd: FakeSystemd) -> None:
    assert notify.watchdog() is True
    assert systemd.received() == b"WATCHDOG=1"


def test_extend_timeout(systemd: FakeSystemd) -> None:
    assert notify.extend_timeout(90) is True
    assert systemd.received() == b"EXTEND_TIMEOUT_USEC=90000000"


def test_every_message_in_order(systemd: FakeSystemd) -> None:
    notify.ready()
    notify.status("up")
    notify.watchdog()
    notify.stopping()
    assert [systemd.received() for _ in range(4)] == [
        b"READY=1",
        b"STATUS=up",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"torbridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert notify.watchdog() is True
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_nobody_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.ready() is False  # reported, never raised


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_address(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("-5", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            own = os.getpid()
            monkeypatch.setenv(key, {"self": str(own), "other": str(own + 1)}.get(value, value))
    assert notify.watchdog_interval() == expected


async def test_watchdog_loop_pings(systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms: a ping every 20 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with trio.move_on_after(0.2):
        await notify.watchdog_loop()
    pings = systemd.pending()
    assert len(pings) >= 3
    assert set(pings) == {b"WATCHDOG=1"}


async def test_watchdog_loop_without_watchdog(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with trio.fail_after(1):
        await notify.watchdog_loop()  # returns at once
    assert systemd.pending() == []
