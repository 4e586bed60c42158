"""A working peer may be silent for as long as its work takes (issue 11, item 2).

git-annex has no deadline on a peer that works: a special remote behind
``git-annex-shell --uuid`` takes the whole file before the proxy answers,
so a big upload to a slow special remote is silent for minutes. Here an
external special remote (a small script speaking git-annex's external
special remote protocol) stays silent for ``SILENT`` seconds before it
answers each TRANSFER.

The daemon runs with every deadline it applies BY DEFAULT scaled down to
``SHORT`` seconds (``scaled_defaults``: the timeouts whose default is not
0 = none). The remote is silent longer than all of them, so the test
passes only if no default deadline is on the peer's side: with the old
defaults (``peer_timeout = 600``) scaled the same way, the copy was cut.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv, AnnexRepo, Client
from tests.harness.bridge import Bridge, Expose
from torbridge.config import Limits

pytestmark = pytest.mark.annex

SHORT = 3.0  # seconds: every deadline the bridge has by default, in the test
SILENT = 4 * SHORT  # the special remote's silence before it answers a TRANSFER


def scaled_defaults(short: float = SHORT) -> dict[str, float]:
    """Every timeout the bridge applies by default, set to ``short`` seconds.

    A timeout whose default is 0 (none) stays unset: what the test shows is
    what the defaults do, only faster.
    """
    defaults = Limits()
    return {
        f.name: short
        for f in fields(Limits)
        if f.name.endswith("_timeout") and getattr(defaults, f.name) > 0
    }


# The special remote: each TRANSFER waits SILENT seconds, saying nothing, then
# does its work; it logs when each silence began and ended.
SLOW_REMOTE = """\
#!{python}
import os, shutil, sys, time
STORE = {store!r}
SILENT = {silent!r}
LOG = os.path.join(STORE, "silences.log")

def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

def path(key):
    return os.path.join(STORE, key)

say("VERSION 2")
for line in sys.stdin:
    words = line.rstrip("\\n").split(" ")
    request = words[0]
    if request == "EXTENSIONS":
        say("EXTENSIONS")
    elif request == "INITREMOTE":
        say("INITREMOTE-SUCCESS")
    elif request == "PREPARE":
        say("PREPARE-SUCCESS")
    elif request == "TRANSFER":
        direction, key, file = words[1], words[2], " ".join(words[3:])
        began = time.time()
        time.sleep(SILENT)
        with open(LOG, "a") as log:
            log.write(f"{{direction}} {{began}} {{time.time()}}\\n")
        if direction == "STORE":
            shutil.copyfile(file, path(key) + ".tmp")
            os.rename(path(key) + ".tmp", path(key))
        elif os.path.exists(path(key)):
            shutil.copyfile(path(key), file)
        else:
            say(f"TRANSFER-FAILURE {{direction}} {{key}} not here")
            continue
        say(f"TRANSFER-SUCCESS {{direction}} {{key}}")
    elif request == "CHECKPRESENT":
        if os.path.exists(path(words[1])):
            say(f"CHECKPRESENT-SUCCESS {{words[1]}}")
        else:
            say(f"CHECKPRESENT-FAILURE {{words[1]}}")
    elif request == "REMOVE":
        if os.path.exists(path(words[1])):
            os.remove(path(words[1]))
        say(f"REMOVE-SUCCESS {{words[1]}}")
    else:
        say("UNSUPPORTED-REQUEST")
"""


@dataclass
class SlowRemote:
    bridge: Bridge
    store: Path

    def silences(self) -> list[tuple[str, float]]:
        """(direction, seconds) of each silence the remote kept."""
        log = self.store / "silences.log"
        lines = log.read_text().split("\n") if log.exists() else []
        out = []
        for line in filter(None, lines):
            direction, began, ended = line.split()
            out.append((direction, float(ended) - float(began)))
        return out


def install_slow_remote(env: AnnexEnv, store: Path, silent: float) -> None:
    script = env.bin_dir / "git-annex-remote-slowbox"
    script.write_text(SLOW_REMOTE.format(python=sys.executable, store=str(store), silent=silent))
    script.chmod(0o755)


@pytest.fixture
def slow_remote(
    make_bridge: Callable[..., Bridge], proxy_repo: AnnexRepo, annex_env: AnnexEnv, tmp_path: Path
) -> SlowRemote:
    store = tmp_path / "slowbox"
    store.mkdir()
    install_slow_remote(annex_env, store, SILENT)
    proxy_repo.add_proxied_special_remote("slow", "type=external", "externaltype=slowbox")
    bridge = make_bridge(exposes=[Expose("hub", ".", 5000), Expose("slow", "slow", 5001)])
    limits = scaled_defaults()
    bridge.config_path.write_text(
        bridge.config_text() + "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    )
    bridge.start()
    return SlowRemote(bridge, store)


def test_the_test_outlasts_every_default_deadline() -> None:
    """What the daemon runs with here, and that the remote's silence outlasts it."""
    limits = scaled_defaults()
    assert "peer_timeout" not in limits  # none by default, as in git-annex
    assert limits and all(value < SILENT for value in limits.values())
    # The old defaults (peer_timeout 600, stall_timeout 300) scaled the same
    # way would have cut the transfer at SHORT seconds.
    assert SILENT > SHORT


def test_slow_special_remote_store_and_retrieve(slow_remote: SlowRemote, client: Client) -> None:
    client.link(slow_remote.bridge.add_token("c", "rw", endpoint="slow").line, "slow")
    data = os.urandom(3 * 1024 * 1024 + 17)
    client.add_file("big.bin", data)
    key = client.key("big.bin")

    copy = client.annex(
        "copy", "--to", "slow", "--debug", "--", "big.bin", check=False, timeout=20 * SILENT
    )
    assert copy.ok, copy.describe()
    assert (slow_remote.store / key).read_bytes() == data
    client.annex("drop", "--", "big.bin")  # the special remote holds the copy now
    assert "big.bin" not in client.present_here()

    get = client.annex(
        "get", "--from", "slow", "--debug", "--", "big.bin", check=False, timeout=20 * SILENT
    )
    assert get.ok, get.describe()
    assert client.read("big.bin") == data
    client.fsck_content()

    silences = slow_remote.silences()
    print(f"\nthe special remote's silences (s): {silences}; bridge limits {scaled_defaults()}")
    directions = [d for d, _ in silences]
    assert "STORE" in directions and "RETRIEVE" in directions, silences
    assert all(took >= SILENT - 0.5 for _, took in silences), silences
    assert "no message before the deadline" not in slow_remote.bridge.log()
