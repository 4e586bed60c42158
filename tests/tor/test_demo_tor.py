"""`torbridge demo` over its own private Tor network, as on a fresh machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.tor,
    pytest.mark.annex,
    pytest.mark.skipif(shutil.which("tor") is None, reason="tor is not installed"),
]


def test_demo_publishes_an_onion_and_a_client_uses_it_over_tor(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        "[user]\n\tname = t\n\temail = t@t\n[init]\n\tdefaultBranch = main\n"
    )
    env = dict(os.environ, HOME=str(home))
    result = subprocess.run(
        ["torbridge", "demo", "--check", "--dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "self-check passed over Tor" in result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"tor-annex::[a-z2-7]{56}\.onion:5000:[0-9a-f]{128}", lines[0])
    assert re.fullmatch(r"p2p-annex::torbridge:[a-z2-7]{56}\.onion:5000:[0-9a-f]{128}", lines[1])
    assert "stopped" in result.stderr  # the private network was torn down
