"""Special remotes behind the proxy, as a stock client sees them (issue 18).

The proxy keeps a directory, an external and an rsync special remote
(``annex-proxy=true``, ``git annex updateproxy``) and exposes each as an
endpoint. Their configuration is in remote.log, in the proxy's git-annex
branch. git-annex 10.20261026 refuses a remote whose UUID it finds there
until it is verified, so a client that merged the hub's branch must run, once,
the command ``torbridge token add`` prints for that endpoint; a client that
never merged it is not asked. Either way every transfer goes through the
bridge: the external program exists only on the proxy's PATH and logs each
run with its working directory, and the client's ``--debug`` shows P2P
lines and no special remote program (nor rsync) of its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from tests.harness.fixtures import report_bridge
from tests.harness.process import Result

pytestmark = pytest.mark.annex

PROXY_ONLY_BIN = Path(__file__).parent / "proxyonly"
"""git-annex-remote-tblog: on the proxy host's PATH, never on the client's."""

NOT_VERIFIED = "This special remote cannot be used since it's not verified"
WRITE_PREVENTED = "Write prevented due to an unverified special remote"
KINDS = ("directory", "external", "rsync")


@dataclass
class Proxied:
    kind: str
    bridge: Bridge
    proxy: AnnexRepo
    store: Path  # where the special remote keeps its objects
    invocations: Path  # the external program's log (external only)
    uuid: str

    def holds(self, key: str) -> bool:
        return any(key in files for _, _, files in os.walk(self.store))

    def token(self, name: str) -> tuple[dict[str, str], str]:
        """``token add NAME``: the address per endpoint (by socket name), and stderr."""
        result = self.bridge.cli("token", "add", name, "--mode", "rw")
        lines = {
            Path(line.rsplit(":", 1)[0]).stem: line
            for line in result.stdout.splitlines()
            if line.strip()
        }
        return lines, result.stderr


def _proxy_env(env: AnnexEnv, invocations: Path) -> AnnexEnv:
    """The proxy host's environment: the client's plus the external program."""
    proxy_env = dataclasses.replace(env, env=dict(env.env))
    proxy_env.env["PATH"] = os.pathsep.join([str(PROXY_ONLY_BIN), env.env["PATH"]])
    proxy_env.env["TBLOG_FILE"] = str(invocations)
    return proxy_env


@pytest.fixture(params=KINDS)
def proxied(
    request: pytest.FixtureRequest, annex_env: AnnexEnv, tmp_path: Path
) -> Iterator[Proxied]:
    kind: str = request.param
    if kind == "rsync" and shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (Debian: apt-get install rsync)")
    invocations = tmp_path / "invocations.log"
    proxy_env = _proxy_env(annex_env, invocations)
    proxy = AnnexRepo.create(proxy_env, tmp_path / "proxy", "proxy")
    store = tmp_path / "store"
    store.mkdir()
    settings = {
        "directory": ["type=directory", f"directory={store}"],
        "external": ["type=external", "externaltype=tblog", f"directory={store}"],
        "rsync": ["type=rsync", f"rsyncurl={store}"],
    }[kind]
    proxy.add_proxied_special_remote("sr", *settings)
    bridge = Bridge(
        proxy_env,
        proxy.path,
        tmp_path / "bridge",
        [Expose("hub", ".", 5000), Expose("sr", "sr", 5001)],
    )
    report_bridge(request, bridge)
    try:
        bridge.start()
        yield Proxied(
            kind,
            bridge,
            proxy,
            store,
            invocations,
            proxy.git("config", "remote.sr.annex-uuid").stdout.strip(),
        )
        assert bridge.wait_idle(10) == [], "session processes left behind"
        bridge.stop()
    finally:
        bridge.close()


PROCESS = re.compile(r"\(Utility\.Process\) process \[\d+\] \w+: (\S+) \[")


def _through_bridge(result: Result) -> None:
    """The client reached the remote through P2P and ran nothing of it itself.

    ``--debug`` logs every program git-annex starts; none of them may be a
    special remote program or rsync.
    """
    assert "P2P > " in result.output and "P2P < " in result.output, result.describe()
    programs = {Path(p).name for p in PROCESS.findall(result.output)}
    assert programs, result.describe()  # the pattern still matches git-annex's debug lines
    ran = {p for p in programs if p == "rsync" or p.startswith("git-annex-remote-")}
    assert not ran, result.describe()


@pytest.mark.parametrize("synced", [True, False], ids=["synced", "never-synced"])
def test_copy_get_drop_fsck(proxied: Proxied, client: Client, synced: bool) -> None:
    lines, told = proxied.token("c")
    hint = "git config remote.sr.annex-verified verified"
    assert hint in told, told  # token add says what to run, for this endpoint only
    assert "remote.hub." not in told, told
    client.link(lines["hub"], "hub")
    data = os.urandom(200_000)
    client.add_file("big.bin", data)
    key = client.key("big.bin")
    if synced:
        client.annex("sync", "hub")  # merges the hub's git-annex branch: remote.log
    client.link(lines["sr"], "sr")
    assert client.remote_uuid("sr") == proxied.uuid

    if synced:
        refused = client.annex("copy", "--to", "sr", "--", "big.bin", check=False)
        assert not refused.ok and NOT_VERIFIED in refused.output, refused.describe()
        assert "verifyremote sr" in refused.output, refused.describe()
        # Until then git-annex also refuses to write to any other remote.
        blocked = client.annex("copy", "--to", "hub", "--", "big.bin", check=False)
        assert not blocked.ok and WRITE_PREVENTED in blocked.output, blocked.describe()
        client.git(*hint.split()[1:])  # the line token add printed
    assert not proxied.holds(key)

    copy = client.annex("copy", "--debug", "--to", "sr", "--", "big.bin")
    _through_bridge(copy)
    assert proxied.holds(key)
    fsck = client.annex("fsck", "--debug", "--from", "sr", "--", "big.bin")
    _through_bridge(fsck)
    drop_here = client.annex("drop", "--debug", "--", "big.bin")  # sr's copy counts
    _through_bridge(drop_here)
    assert not client.has_key(key)
    get = client.annex("get", "--debug", "--from", "sr", "--", "big.bin")
    _through_bridge(get)
    assert client.read("big.bin") == data
    drop = client.annex("drop", "--debug", "--from", "sr", "--", "big.bin")
    _through_bridge(drop)
    assert not proxied.holds(key)
    assert client.read("big.bin") == data
    if synced:
        client.annex("copy", "--to", "hub", "--", "big.bin")  # no longer blocked
        client.annex("sync", "hub")  # and pushes again

    if proxied.kind == "external":
        runs = [line.split("\t") for line in proxied.invocations.read_text().splitlines()]
        proxy_git = str((proxied.proxy.path / ".git").resolve())
        assert {git_dir for _pid, _cwd, git_dir, _event in runs} == {proxy_git}, runs
        events = " ".join(event for *_, event in runs)
        for request in ("TRANSFER STORE", "TRANSFER RETRIEVE", "CHECKPRESENT", "REMOVE"):
            assert f"{request} {key}" in events, runs


@pytest.mark.parametrize("proxied", ["directory"], indirect=True)
def test_token_add_names_only_published_special_remotes(
    proxied: Proxied,
) -> None:
    """Endpoints without a remote.log entry (the proxy itself) get no such line,
    and a token limited to them gets none at all."""
    _lines, told = proxied.token("everything")
    assert told.count("annex-verified") == 1, told
    result = proxied.bridge.cli("token", "add", "hubonly", "--endpoint", "hub")
    assert "annex-verified" not in result.stderr, result.describe()
