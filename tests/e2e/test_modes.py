"""Token modes: ``ro`` and ``append`` refuse what they must, allow the rest."""

from __future__ import annotations

import pytest

from tests.harness.annex import AnnexRepo, Client
from tests.harness.bridge import APPEND_ONLY_TEXT, READ_ONLY_TEXT, Bridge
from tests.harness.session import RawSession

pytestmark = pytest.mark.annex

PUSH_TIMEOUT = 60.0
"""A refused push must fail well within this; a hang raises CommandError."""


def assert_refused(client: Client, text: str, *args: str) -> None:
    """``git annex ARGS`` fails because the daemon answered ``ERROR text``.

    The stock client only says "Transfer failed" / "failed" for a refused PUT or
    REMOVE; the server's ERROR line is visible in its ``--debug`` trace.
    """
    result = client.annex(*args, "--debug", check=False, timeout=60)
    assert result.returncode != 0, f"not refused:\n{result.describe()}"
    assert f"P2P < ERROR {text}" in result.output, result.describe()


def assert_refused_push(client: Client, proxy_repo: AnnexRepo, refspec: str) -> None:
    branch = refspec.split(":")[-1]
    result = client.git("push", "hub", refspec, check=False, timeout=PUSH_TIMEOUT)
    assert result.returncode != 0, f"push was not refused:\n{result.describe()}"
    assert READ_ONLY_TEXT in result.output, result.describe()
    assert "remote error" in result.output, result.describe()
    assert not proxy_repo.git("rev-parse", "--verify", "-q", branch, check=False).ok, (
        f"the refused push created {branch} in the proxy"
    )


@pytest.fixture
def proxy_with_file(proxy_repo: AnnexRepo) -> AnnexRepo:
    proxy_repo.add_files({"in proxy.txt": b"content kept by the proxy\n"}, "proxy file")
    return proxy_repo


def test_read_only_token(bridge: Bridge, client: Client, proxy_with_file: AnnexRepo) -> None:
    proxy = proxy_with_file
    proxy_key = proxy.key("in proxy.txt")
    client.link(bridge.add_token("reader", "ro").line, "hub")

    # Reading works: git pull (upload-pack), git fetch, get.
    client.git("pull", "hub", "main", timeout=60)
    client.git("fetch", "hub", timeout=60)
    client.annex("get", "--from", "hub", "in proxy.txt")
    assert client.read("in proxy.txt") == b"content kept by the proxy\n"

    # Uploading is refused.
    client.add_files({"new file.txt": b"not for a read-only token\n"}, "client file")
    new_key = client.key("new file.txt")
    assert_refused(client, READ_ONLY_TEXT, "copy", "--to", "hub", "new file.txt")
    assert not proxy.has_key(new_key)

    # Removing is refused (the client holds a copy, so numcopies allows the try).
    assert_refused(client, READ_ONLY_TEXT, "drop", "--from", "hub", "in proxy.txt")
    assert proxy.key_content(proxy_key) == b"content kept by the proxy\n"

    # Pushing is refused promptly with a readable reason.
    assert_refused_push(client, proxy, "main:synced/main")
    proxy.fsck_content()
    bridge.assert_alive()


def test_append_only_token(bridge: Bridge, client: Client, proxy_with_file: AnnexRepo) -> None:
    proxy = proxy_with_file
    client.link(bridge.add_token("appender", "append").line, "hub")

    files = {"appended.txt": b"appended\n", "also ✓.bin": b"\x00\x01" * 5000}
    client.add_files(files, "client files")
    client.annex("copy", "--to", "hub", ".")
    for name, content in files.items():
        assert proxy.key_content(client.key(name)) == content

    assert_refused(client, APPEND_ONLY_TEXT, "drop", "--from", "hub", "appended.txt")
    assert proxy.key_content(client.key("appended.txt")) == b"appended\n"

    # Fetching is allowed, pushing is not (receive-pack gets the read-only text).
    client.git("fetch", "hub", timeout=60)
    assert_refused_push(client, proxy, "main:synced/main")
    proxy.fsck_content()
    bridge.assert_alive()


@pytest.mark.parametrize(
    ("mode", "put_refusal", "remove_refusal"),
    [("ro", READ_ONLY_TEXT, READ_ONLY_TEXT), ("append", None, APPEND_ONLY_TEXT)],
)
def test_mode_refusals_on_the_wire(
    bridge: Bridge,
    client: Client,
    proxy_repo: AnnexRepo,
    mode: str,
    put_refusal: str | None,
    remove_refusal: str,
) -> None:
    """The exact ERROR lines, and the session goes on after each refusal."""
    proxy_repo.add_files({"kept.txt": b"kept\n"})
    kept = proxy_repo.key("kept.txt")
    client.add_files({"new.txt": b"new\n"})
    new = client.key("new.txt")
    address = bridge.add_token(f"wire-{mode}", mode)

    with RawSession(address.socket) as s:
        s.auth(address.token, proxy_repo.uuid)
        assert s.version(4) == "VERSION 4"
        s.send_line(f"PUT  {new}")
        if put_refusal is not None:
            s.expect(f"ERROR {put_refusal}")
        else:
            s.expect("PUT-FROM 0")
            s.send_data(b"new\n")
            s.send_line("VALID")
            s.expect("SUCCESS")
        s.send_line(f"REMOVE {kept}")
        s.expect(f"ERROR {remove_refusal}")
        s.send_line("GETTIMESTAMP")
        now = int(s.read_line().removeprefix("TIMESTAMP "))
        s.send_line(f"REMOVE-BEFORE {now + 600} {kept}")
        s.expect(f"ERROR {remove_refusal}")
        # Still the same session: reads are served.
        s.send_line(f"CHECKPRESENT {kept}")
        s.expect("SUCCESS")
    assert proxy_repo.has_key(kept)
    assert proxy_repo.has_key(new) == (put_refusal is None)
    proxy_repo.fsck_content()
