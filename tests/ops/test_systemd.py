"""The systemd files: valid for systemd, and in step with doctor and init."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from torbridge.ops import init
from torbridge.ops.doctor import systemd

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "torbridge.service"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(text: str) -> dict[str, list[str]]:
    """KEY -> values, in order, of a unit file (comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at the torbridge this test run has installed."""
    torbridge = shutil.which("torbridge")
    if torbridge is None:
        pytest.skip("the torbridge command is not installed")
    text = UNIT.read_text().replace("ExecStart=/usr/bin/torbridge ", f"ExecStart={torbridge} ")
    path = tmp_path / "torbridge.service"
    path.write_text(text)
    return path


@needs_analyze
def test_unit_verifies(runnable_unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", runnable_unit.name],
        cwd=runnable_unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_security_score_is_the_one_recorded(runnable_unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", runnable_unit.name],
        cwd=runnable_unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    measured = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert measured, result.stdout + result.stderr
    recorded = re.search(r"#\s+exposure (\d+\.\d+)", UNIT.read_text())
    assert recorded, "the unit's header records its exposure score"
    assert measured.group(1) == recorded.group(1)
    assert float(measured.group(1)) <= 2.0


def test_unit_settings() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [f"/usr/bin/torbridge --config {init.DEFAULT_CONFIG_PATH} serve"]
    assert unit["User"] == unit["Group"] == ["torbridge"]
    assert unit["SupplementaryGroups"] == [systemd.TOR_GROUP]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["UMask"] == ["0077"]
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["ReadWritePaths"] == ["-/srv/annex"]
    assert int(unit["WatchdogSec"][0]) > 0  # torbridge.server.notify.watchdog_loop pings it


def test_unit_makes_the_directories_doctor_and_init_expect() -> None:
    unit = settings(UNIT.read_text())
    made = {
        Path("/run")
        / unit["RuntimeDirectory"][0]: f"RuntimeDirectory={unit['RuntimeDirectory'][0]}",
        Path("/var/lib") / unit["StateDirectory"][0]: f"StateDirectory={unit['StateDirectory'][0]}",
    }
    assert made == systemd.SYSTEMD_MADE_DIRS
    assert Path("/run") / unit["RuntimeDirectory"][0] == init.DEFAULT_SOCKET_DIR
    assert Path("/var/lib") / unit["StateDirectory"][0] == init.DEFAULT_STATE_DIR
    assert unit["StateDirectoryMode"] == ["0700"]
    # The sockets' directory is handed to tor's group, setgid, before the daemon starts.
    assert unit["ExecStartPre"] == [
        f"+/bin/chgrp {systemd.TOR_GROUP} {init.DEFAULT_SOCKET_DIR}",
        f"+/bin/chmod 2750 {init.DEFAULT_SOCKET_DIR}",
    ]


def test_unit_paths_in_doctor() -> None:
    assert all(path.name == UNIT.name for path in systemd.UNIT_PATHS)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_makes_the_user_in_tor_group(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "group").write_text(f"{systemd.TOR_GROUP}:x:105:\n")
    for name in ("passwd", "shadow", "gshadow"):
        (etc / name).write_text("")
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "torbridge.sysusers")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    passwd = (etc / "passwd").read_text()
    assert re.search(
        r"^torbridge:x:\d+:\d+:[^:]*:/var/lib/torbridge:/usr/sbin/nologin$", passwd, re.M
    )
    assert f"{systemd.TOR_GROUP}:x:105:torbridge\n" in (etc / "group").read_text()


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
def test_tmpfiles_makes_the_config_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("torbridge:x:999:999::/var/lib/torbridge:/usr/sbin/nologin\n")
    (etc / "group").write_text("torbridge:x:999:\n")
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD / "torbridge.tmpfiles")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    st = (etc / "torbridge").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 0, 999)
