"""sd_notify(3) without libsystemd: tell systemd we are ready, stopping, alive.

Under ``Type=notify`` systemd passes a unix datagram socket in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and
waits for ``READY=1`` before it considers the service started. With
``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and
kills the service if ``WATCHDOG=1`` does not arrive in time.

Outside systemd every function here is a no-op that returns False, so the
daemon calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("torbridge.notify")

_MAX_STATUS = 1024  # systemd shows one line; keep the datagram small


def _address(value: str) -> str | None:
    """The socket address $NOTIFY_SOCKET names; None if it is not a unix socket."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # the abstract namespace
    return None  # vsock:... and anything else: not supported here


def notify(state: str) -> bool:
    """Send *state* (``KEY=VALUE`` lines) to systemd; False when not under systemd.

    Never raises: a daemon must not die because its supervisor went away.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket; not notifying systemd", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", value, e.strerror or e)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The service is up: systemd finishes ``systemctl start`` now."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={_line(status_text)}")


def stopping() -> bool:
    """The service is shutting down cleanly (not a crash)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_line(text)}")


def watchdog() -> bool:
    """Keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask systemd for *seconds* more to start (or stop) before it gives up."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")


def _line(text: str) -> str:
    return " ".join(text.split())[:_MAX_STATUS]


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1``; None if it expects none.

    As sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer
    and ``$WATCHDOG_PID``, if set, must be this process (not a parent's
    watchdog inherited through the environment).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def watchdog_loop() -> None:
    """Ping the watchdog at half its interval until cancelled; returns at once without one.

    Run it as a task of the daemon's nursery: if the trio loop is ever stuck,
    the pings stop and systemd restarts the service.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        watchdog()
        await trio.sleep(interval / 2)
