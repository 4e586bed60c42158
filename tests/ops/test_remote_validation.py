"""Remote names, addresses and UUIDs from git config are checked before use.

They come from the proxy repository's git config, which the operator (or
whoever can write it) controls; each ends up in an argv (``git-annex-p2p-NET
ADDR``, ``git-annex-shell ... --uuid UUID``) or in a protocol line
(``AUTH-SUCCESS UUID``). A bad one must be refused with a one-line reason
by ``torbridge doctor`` and at daemon start, and nothing of it run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ops import ONION, TOKEN, git
from tests.ops import test_doctor
from tests.ops.test_doctor import Host, line
from torbridge.annex.remotes import (
    NetAddress,
    RemoteError,
    TorAddress,
    creds_escape,
    parse_p2p_address,
)
from torbridge.ops.doctor import exit_status

pytestmark = pytest.mark.annex

host = test_doctor.host  # the fixture: a proxy host in a temp dir

UUID = "5f4e3d2c-0000-4000-8000-00000000beef"

BAD_ADDRESSES = [
    "p2p-annex::evil:-opt",  # the address would be an option of the program
    "p2p-annex::evil:--help",
    "p2p-annex::-evil:addr",  # a NET that is an option
    "p2p-annex::ev/il:addr",  # a NET naming another program's path
    "p2p-annex::../../bin/evil:addr",
    "p2p-annex::ev il:addr",
    "p2p-annex::ev;il:addr",
    "p2p-annex::évil:addr",
    "p2p-annex::evil",  # no address
    "p2p-annex::evil:",
    "p2p-annex:::addr",
    "p2p-annex::evil:addr\nmore",  # control characters and newlines
    "p2p-annex::evil:addr\r",
    "p2p-annex::evil:a\x1bb",
    "p2p-annex::evil:a\x00b",
    "p2p-annex::evil\n:addr",
    f"tor-annex::{ONION}:5000\n",
    f"tor-annex::{ONION}:-5000",
    f"tor-annex::{ONION}:²",  # str.isdigit() says yes, int() says no
    f"tor-annex::{ONION}:0",
    f"tor-annex::{ONION}:65536",
    f"tor-annex::{ONION}:",
    "tor-annex::-x.onion:5000",
    "tor-annex::not-an-onion:5000",
    f"tor-annex::{ONION.upper()}:5000",
]


@pytest.mark.parametrize("url", BAD_ADDRESSES)
def test_bad_address_is_refused(url: str) -> None:
    with pytest.raises(RemoteError, match="is not a valid"):
        parse_p2p_address(url)


def test_good_addresses_parse() -> None:
    assert parse_p2p_address(f"tor-annex::{ONION}:5000") == TorAddress(ONION, 5000)
    assert parse_p2p_address("p2p-annex::tbnode:node 1/x") == NetAddress("tbnode", "node 1/x")
    assert parse_p2p_address("p2p-annex::my_net-2:a:b") == NetAddress("my_net-2", "a:b")
    assert parse_p2p_address("/srv/annex") is None  # not a P2P address: git-annex-shell's


# --- the same, from git config, through doctor and the daemon ------------------------------


@pytest.fixture
def trap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Programs named as the bad remotes would run them; each leaves a mark if run.

    The directory is first on PATH for doctor (in-process) and the daemon.
    """
    bin_dir = tmp_path / "trap-bin"
    bin_dir.mkdir()
    mark = tmp_path / "ran"
    for name in ("git-annex-p2p-evil", "git-annex-p2p-ev", "git-annex-p2p--evil"):
        program = bin_dir / name
        program.write_text(f"#!/bin/sh\necho \"$0 $*\" >> '{mark}'\nexit 1\n")
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield mark
    assert not mark.exists(), f"a bad remote was run: {mark.read_text()}"


def _link(repo: Path, name: str, url: str, uuid: str = UUID) -> None:
    """A proxied remote as `git annex p2p --link` leaves it, but with ``url``."""
    git(repo, "config", f"remote.{name}.url", url)
    git(repo, "config", f"remote.{name}.annex-uuid", uuid)
    git(repo, "config", f"remote.{name}.annex-proxy", "true")
    creds = repo / ".git" / "annex" / "creds"
    creds.mkdir(parents=True, exist_ok=True)
    address = url.partition("::")[2]
    (creds / creds_escape(address)).write_text(TOKEN + "\n")


def _serve(host: Host, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``torbridge serve`` on the host's config: it must refuse to start, quickly."""
    host.write()
    try:
        return subprocess.run(
            [sys.executable, "-m", "torbridge", "--config", str(host.config_path), "serve"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon started with a bad remote (still running after 30 s)")


DOCTOR_CASES = [
    "p2p-annex::evil:-opt",
    "p2p-annex::ev/il:addr",
    "p2p-annex::-evil:addr",
    "p2p-annex::evil:addr\nmore",
    "p2p-annex::evil:a\x1bb",
    f"tor-annex::{ONION}:²",
]


@pytest.mark.parametrize("url", DOCTOR_CASES)
def test_doctor_and_daemon_refuse_a_bad_address(host: Host, trap: Path, url: str) -> None:
    _link(host.repo, "peer", url)
    host.expose.append(("peer", "peer", 5001))
    checks = host.run()
    row = line(checks, "expose peer")
    assert row.startswith("FAIL expose peer: ") and "is not a valid" in row, row
    assert "\n" not in row.partition(" — fix: ")[0].removeprefix("FAIL "), row
    assert exit_status(checks) == 1

    result = _serve(host)
    assert result.returncode != 0
    assert "is not a valid" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "uuid", ["-uuid", "--uuid=x", "5f4e3d2c 0000", "5f4e3d2c\nERROR x", "a\x1bb", "x" * 65]
)
def test_a_remote_uuid_that_is_not_a_uuid_is_refused(host: Host, trap: Path, uuid: str) -> None:
    """annex-uuid goes into AUTH-SUCCESS and git-annex-shell's argv: a UUID or nothing."""
    _link(host.repo, "peer", "p2p-annex::evil:addr", uuid=uuid)
    host.expose.append(("peer", "peer", 5001))
    row = line(host.run(), "expose peer")
    assert row.startswith("FAIL expose peer: ") and "not a valid UUID" in row, row

    result = _serve(host)
    assert result.returncode != 0
    assert "not a valid UUID" in result.stderr, result.stderr


def _cluster(
    repo: Path,
    node: str,
    node_uuid: str = UUID,
    cluster_uuid: str = "ac59f2a8-0000-4000-8000-000000000c1c",
) -> None:
    git(repo, "config", "annex.cluster.c1", cluster_uuid)
    _link(repo, node, "p2p-annex::evil:addr", uuid=node_uuid)
    git(repo, "config", f"remote.{node}.annex-cluster-node", "c1")


@pytest.mark.parametrize("node", ["-node", "no de", "no;de"])
def test_daemon_refuses_a_bad_cluster_node_name(host: Host, trap: Path, node: str) -> None:
    _cluster(host.repo, node)
    host.expose.append(("c1", "c1", 5001))
    result = _serve(host)
    assert result.returncode != 0
    assert f"cluster c1: {node!r} is not a valid remote name" in result.stderr, result.stderr


def test_daemon_refuses_a_bad_cluster_node_uuid(host: Host, trap: Path) -> None:
    _cluster(host.repo, "node1", node_uuid="-x")
    host.expose.append(("c1", "c1", 5001))
    result = _serve(host)
    assert result.returncode != 0
    assert "not a valid UUID" in result.stderr, result.stderr


def test_daemon_refuses_a_bad_cluster_uuid(host: Host, trap: Path) -> None:
    _cluster(host.repo, "node1", cluster_uuid="ac59 x\nERROR")
    host.expose.append(("c1", "c1", 5001))
    result = _serve(host)
    assert result.returncode != 0
    assert "not a valid UUID" in result.stderr, result.stderr
