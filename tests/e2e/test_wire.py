"""Protocol features through the daemon, spoken by hand: offsets, locks, timestamps."""

from __future__ import annotations

import os
import re

import pytest

from tests.harness.annex import AnnexRepo
from tests.harness.bridge import Address, Bridge
from tests.harness.session import RawSession, SessionClosed

pytestmark = pytest.mark.annex

CONTENT = os.urandom(300_000)


@pytest.fixture
def token(bridge: Bridge) -> Address:
    return bridge.add_token("wire", "rw")


@pytest.fixture
def key(proxy_repo: AnnexRepo) -> str:
    proxy_repo.add_files({"f.bin": CONTENT})
    return proxy_repo.key("f.bin")


def session(token: Address, proxy: AnnexRepo, version: int = 4) -> RawSession:
    s = RawSession(token.socket)
    s.auth(token.token, proxy.uuid)
    assert s.version(version) == f"VERSION {version}"
    return s


def test_version_negotiation_and_get(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str
) -> None:
    for version in (1, 2, 3, 4):
        with session(token, proxy_repo, version) as s:
            s.send_line(f"GET 0 f.bin {key}")
            assert s.read_data() == CONTENT, f"version {version}"
            s.expect("VALID")
            s.send_line("SUCCESS")
            s.send_line(f"CHECKPRESENT {key}")
            s.expect("SUCCESS")
    with RawSession(token.socket) as s:
        s.auth(token.token, proxy_repo.uuid)
        assert s.version(99) == "VERSION 4"  # the server's maximum


def test_get_with_offset(bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str) -> None:
    with session(token, proxy_repo) as s:
        for offset in (1, 65536, len(CONTENT) - 1):
            s.send_line(f"GET {offset} f.bin {key}")
            assert s.read_data() == CONTENT[offset:], f"offset {offset}"
            s.expect("VALID")
            s.send_line("SUCCESS")
        # Content the proxy lacks: DATA 0 and INVALID.
        s.send_line("GET 0  SHA256E-s5--" + "9" * 64)
        assert s.read_data() == b""
        s.expect("INVALID")
        s.send_line("FAILURE")
        s.send_line(f"CHECKPRESENT {key}")
        s.expect("SUCCESS")


def test_put_roundtrip_and_already_have(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str
) -> None:
    data = os.urandom(200_000)
    client_files = proxy_repo.path.parent / "scratch"
    client_files.mkdir()
    (client_files / "new.bin").write_bytes(data)
    new = proxy_repo.annex("calckey", str(client_files / "new.bin")).stdout.strip()
    with session(token, proxy_repo) as s:
        s.send_line(f"PUT new.bin {key}")
        s.expect("ALREADY-HAVE")
        s.send_line(f"PUT new%name%with%%.bin {new}")
        s.expect("PUT-FROM 0")
        # Two DATA-sized writes in one go, header glued to the body, as clients do.
        s.send_data(data)
        s.send_line("VALID")
        s.expect("SUCCESS")
        s.send_line(f"CHECKPRESENT {new}")
        s.expect("SUCCESS")
    assert proxy_repo.key_content(new) == data
    proxy_repo.fsck_content()


def test_put_invalid_is_not_stored(bridge: Bridge, token: Address, proxy_repo: AnnexRepo) -> None:
    """Bytes that do not match the key (or that the client calls INVALID) are refused."""
    fake = "SHA256E-s10--" + "5" * 64 + ".bin"
    with session(token, proxy_repo) as s:
        s.send_line(f"PUT  {fake}")
        s.expect("PUT-FROM 0")
        s.send_data(b"0123456789")
        s.send_line("VALID")
        s.expect("FAILURE")
        s.send_line(f"PUT  {fake}")
        assert re.fullmatch(r"PUT-FROM \d+", s.read_line())
        s.send_data(b"")
        s.send_line("INVALID")
        s.expect("FAILURE")
        s.send_line(f"CHECKPRESENT {fake}")
        s.expect("FAILURE")
    assert not proxy_repo.has_key(fake)
    proxy_repo.fsck_content()


def test_lock_protects_against_remove(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str
) -> None:
    """LOCKCONTENT in one session keeps another session's REMOVE from deleting it."""
    with session(token, proxy_repo) as locker:
        locker.send_line(f"LOCKCONTENT {key}")
        locker.expect("SUCCESS")
        with session(token, proxy_repo) as remover:
            remover.send_line(f"REMOVE {key}")
            try:
                reply = remover.read_line(timeout=30)
            except SessionClosed:
                reply = "(closed)"
            assert reply != "SUCCESS", "REMOVE succeeded while the content was locked"
        assert proxy_repo.key_content(key) == CONTENT
        locker.send_line("UNLOCKCONTENT")
        locker.send_line(f"CHECKPRESENT {key}")
        locker.expect("SUCCESS")
    with session(token, proxy_repo) as remover:
        remover.send_line(f"REMOVE {key}")
        remover.expect("SUCCESS")
        remover.send_line(f"CHECKPRESENT {key}")
        remover.expect("FAILURE")
    assert not proxy_repo.has_key(key)


def test_timestamps_and_remove_before(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str
) -> None:
    with session(token, proxy_repo) as s:
        s.send_line("GETTIMESTAMP")
        m = re.fullmatch(r"TIMESTAMP (\d+)", s.read_line())
        assert m, "GETTIMESTAMP did not answer TIMESTAMP n"
        now = int(m.group(1))
        s.send_line(f"REMOVE-BEFORE {max(now - 5, 0)} {key}")
        s.expect("FAILURE")
        assert proxy_repo.has_key(key)
        s.send_line(f"REMOVE-BEFORE {now + 600} {key}")
        s.expect("SUCCESS")
    assert not proxy_repo.has_key(key)


def test_many_requests_in_one_session(
    bridge: Bridge, token: Address, proxy_repo: AnnexRepo, key: str
) -> None:
    """Pipelined requests (sent before reading replies) are answered in order."""
    absent = "SHA256E-s1--" + "7" * 64
    with session(token, proxy_repo) as s:
        s.send_raw(
            b"".join(f"CHECKPRESENT {key if i % 2 else absent}\n".encode() for i in range(200))
        )
        for i in range(200):
            s.expect("SUCCESS" if i % 2 else "FAILURE")
