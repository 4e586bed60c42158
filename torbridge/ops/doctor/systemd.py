"""The systemd unit torbridge ships, and what the doctor knows of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torbridge.ops.doctor.report import Check, _fail, _ok

UNIT_NAME = "torbridge.service"
UNIT_PATHS: tuple[Path, ...] = (
    Path("/etc/systemd/system") / UNIT_NAME,
    Path("/lib/systemd/system") / UNIT_NAME,
    Path("/usr/lib/systemd/system") / UNIT_NAME,
)
# What the shipped unit's RuntimeDirectory= and StateDirectory= create at start.
SYSTEMD_MADE_DIRS: dict[Path, str] = {
    Path("/run/torbridge"): "RuntimeDirectory=torbridge",
    Path("/var/lib/torbridge"): "StateDirectory=torbridge",
}
TOR_GROUP = "debian-tor"  # Debian's system tor runs as debian-tor


def _check_unit(unit_paths: Sequence[Path]) -> Check:
    name = "systemd unit"
    for path in unit_paths:
        if path.is_file():
            return _ok(name, f"{path}")
    return _fail(
        name,
        f"{UNIT_NAME} is not installed",
        f"copy systemd/{UNIT_NAME} to /etc/systemd/system/ and `systemctl daemon-reload`"
        " (only matters for running torbridge as a service)",
        severity="warning",
    )
