"""A special remote of the proxy, reached through git-annex-shell's own proxying.

git-annex-shell dies when it proxies a special remote and is sent
GETTIMESTAMP or REMOVE-BEFORE, or a version 1 client's VALID (git-annex's
proxy bug 7); the bridge keeps the clock for it and opens v1 clients at
v0 (transport/process.py, SpecialRemoteChannel). A directory special
remote plays the part here.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex


@dataclass
class SpecialSetup:
    bridge: Bridge
    proxy: AnnexRepo
    directory: Path  # where the special remote keeps its objects
    uuid: str

    def holds(self, key: str) -> bool:
        return any(key in files for _, _, files in os.walk(self.directory))


@pytest.fixture
def special(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, tmp_path: Path
) -> SpecialSetup:
    directory = tmp_path / "special"
    directory.mkdir()
    uuid = proxy_repo.add_proxied_special_remote("sr", "type=directory", f"directory={directory}")
    bridge = make_bridge(exposes=[Expose("hub", ".", 5000), Expose("sr", "sr", 5001)])
    bridge.start()
    return SpecialSetup(bridge, proxy_repo, directory, uuid)


def test_drop_proven_by_a_lock_elsewhere(special: SpecialSetup, client: Client) -> None:
    """The stock client drops from the special remote with REMOVE-BEFORE."""
    client.link(special.bridge.add_token("c-hub", "rw", endpoint="hub").line, "hub")
    client.link(special.bridge.add_token("c-sr", "rw", endpoint="sr").line, "sr")
    assert client.remote_uuid("sr") == special.uuid
    data = os.urandom(100_000)
    client.add_file("f.bin", data)
    key = client.key("f.bin")
    client.annex("copy", "--to", "sr", "--", "f.bin")
    client.annex("copy", "--to", "hub", "--", "f.bin")
    assert special.holds(key)
    client.annex("drop", "--", "f.bin")  # the remotes hold the copies now
    # numcopies 1 is proven by locking hub's copy: the drop from sr must
    # finish before that lock can expire, which REMOVE-BEFORE says.
    drop = client.annex("drop", "--from", "sr", "--debug", "--", "f.bin")
    assert re.search(r"P2P > REMOVE-BEFORE \d+ " + re.escape(key), drop.output), drop.describe()
    assert "P2P < SUCCESS" in drop.output, drop.describe()
    assert not special.holds(key)
    client.annex("get", "--from", "hub", "--", "f.bin")
    assert client.read("f.bin") == data


def test_timestamps_on_the_wire(special: SpecialSetup) -> None:
    token = special.bridge.add_token("raw", "rw", endpoint="sr")
    data = b"special content\n"
    key = "SHA256E-s16--" + hashlib.sha256(data).hexdigest()
    with RawSession(token.socket) as r:
        r.auth(token.token, special.uuid)
        assert r.version(4) == "VERSION 4"
        r.send_line(f"PUT f {key}")
        r.expect("PUT-FROM 0")
        r.send_data(data)
        r.send_line("VALID")
        r.expect("SUCCESS")
        r.send_line("GETTIMESTAMP")
        now = int(r.read_line().removeprefix("TIMESTAMP "))
        r.send_line(f"REMOVE-BEFORE {now - 1} {key}")  # the deadline has passed
        r.expect("FAILURE")
        assert special.holds(key)
        r.send_line(f"REMOVE-BEFORE {now + 600} {key}")
        r.expect("SUCCESS")
        assert not special.holds(key)
        r.send_line(f"CHECKPRESENT {key}")  # the session goes on
        r.expect("FAILURE")


def test_version_1_client(special: SpecialSetup) -> None:
    """Opened at v0: no VALID for git-annex-shell to choke on."""
    token = special.bridge.add_token("raw1", "rw", endpoint="sr")
    data = b"v1 content\n"
    key = "SHA256E-s11--" + hashlib.sha256(data).hexdigest()
    with RawSession(token.socket) as r:
        r.auth(token.token, special.uuid)
        assert r.version(1) == "VERSION 0"
        r.send_line(f"PUT f {key}")
        r.expect("PUT-FROM 0")
        r.send_data(data)
        r.expect("SUCCESS")
        r.send_line(f"CHECKPRESENT {key}")
        r.expect("SUCCESS")
    assert special.holds(key)
