"""Admission: tokens per endpoint, and the caps that bound memory."""

from __future__ import annotations

from pathlib import Path

from torbridge.config import Limits
from torbridge.protocol.relay import Mode
from torbridge.server.admission import Admission
from torbridge.tokens import TokenStore


def test_caps_on_sessions_in_all_and_per_token(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    alice, bob = store.add("alice", "rw"), store.add("bob", "ro")
    admission = Admission(store, Limits(max_sessions=3, max_sessions_per_token=2))
    first = admission.authorize("hub", alice)
    assert first is not None and first.mode is Mode.READ_WRITE
    assert admission.authorize("hub", alice) is not None
    assert admission.authorize("hub", alice) is None  # alice's two are in use
    bobs = admission.authorize("hub", bob)
    assert bobs is not None and bobs.mode is Mode.READ_ONLY
    assert admission.authorize("hub", bob) is None  # three in all
    admission.release(first)
    assert admission.authorize("hub", bob) is not None


def test_a_token_limited_to_an_endpoint(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    token = store.add("carol", "rw", ["node1"])
    admission = Admission(store, Limits())
    assert admission.authorize("hub", token) is None
    assert admission.authorize("node1", token) is not None


def test_unauthenticated_cap(tmp_path: Path) -> None:
    admission = Admission(TokenStore(tmp_path / "state"), Limits(max_unauthenticated=2))
    assert admission.enter_pre_auth() and admission.enter_pre_auth()
    assert not admission.enter_pre_auth()
    admission.leave_pre_auth()
    assert admission.enter_pre_auth()
