"""`torbridge demo`, the README's main-job command, proves itself with a stock client."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.annex import AnnexEnv

pytestmark = pytest.mark.annex


def test_demo_without_tor_links_fetches_gets_copies(annex_env: AnnexEnv, tmp_path: Path) -> None:
    result = subprocess.run(
        ["torbridge", "demo", "--check", "--no-tor", "--dir", str(tmp_path / "demo")],
        env=annex_env.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "self-check passed on the local socket" in result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(f"p2p-annex::torbridge:{tmp_path / 'demo' / 'sock' / 'hub.sock'}:")
    # What the client sent is in the demo proxy repository, intact.
    proxy = tmp_path / "demo" / "proxy"
    objects = [p for p in (proxy / ".git" / "annex" / "objects").rglob("*") if p.is_file()]
    contents = sorted(p.read_text() for p in objects)
    assert contents == ["sent through torbridge (bridge)\n", "served through torbridge\n"]
