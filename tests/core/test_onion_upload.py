"""When a publication counts as done: tor's HS_DESC events, fed by hand.

A client's tor takes the first descriptor it finds; an HSDir still holding
the previous one (before `client add`, before new ports) sends that client
away. So ``publish`` waits for every directory tor uploaded to, not the
first one only (a CI run caught a client fetching the stale copy).
"""

from __future__ import annotations

import queue
import time
from types import SimpleNamespace
from typing import Any

import pytest

from torbridge.tor import onion
from torbridge.tor.onion import PublishFailed, UploadWait, _await_upload

SERVICE = "a" * 56


def ev(action: str, directory: str, address: str = "UNKNOWN", reason: str | None = None) -> Any:
    return SimpleNamespace(
        action=action, address=address, directory_fingerprint=directory, reason=reason
    )


def feed(*events: Any) -> queue.Queue[Any]:
    q: queue.Queue[Any] = queue.Queue()
    for e in events:
        q.put(e)
    return q


def uploads(*dirs: str) -> list[Any]:
    return [ev("UPLOAD", d, SERVICE) for d in dirs]


def test_one_upload_is_not_enough_while_others_are_in_flight() -> None:
    w = UploadWait(SERVICE)
    for e in uploads("A", "B", "C"):
        w.event(e.action, e.address, e.directory_fingerprint)
    w.event("UPLOADED", "UNKNOWN", "A")
    assert w.reached_one and not w.all_answered and w.pending() == {"B", "C"}
    w.event("FAILED", "UNKNOWN", "B", "UPLOAD_REJECTED")
    w.event("UPLOADED", "UNKNOWN", "C")
    assert w.all_answered and not w.all_failed


def test_events_of_other_services_and_directories_are_ignored() -> None:
    w = UploadWait(SERVICE)
    w.event("UPLOAD", "b" * 56, "X")
    w.event("UPLOADED", "UNKNOWN", "X")
    assert not w.reached_one and not w.directories


def test_a_new_upload_batch_waits_for_its_own_answer() -> None:
    w = UploadWait(SERVICE)
    w.event("UPLOAD", SERVICE, "A")
    w.event("UPLOADED", "UNKNOWN", "A")
    w.event("UPLOAD", SERVICE, "A")
    assert w.pending() == {"A"} and not w.reached_one


def test_returns_once_every_directory_answered() -> None:
    q = feed(*uploads("A", "B"), ev("UPLOADED", "A"), ev("FAILED", "B", reason="X"))
    start = time.monotonic()
    _await_upload(q, SERVICE, time.monotonic() + 30, 30)
    assert q.empty() and time.monotonic() - start < 10  # did not sit out the grace


def test_waits_past_the_first_success_for_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    q = feed(*uploads("A", "B"), ev("UPLOADED", "A"))
    later = ev("UPLOADED", "B")
    got: list[Any] = []
    real_get = q.get

    def get(timeout: float | None = None) -> Any:
        if q.empty() and not got:
            got.append(later)
            return later  # B answers after A: the wait must still be running
        return real_get(timeout=timeout)

    monkeypatch.setattr(q, "get", get)
    _await_upload(q, SERVICE, time.monotonic() + 30, 30)
    assert got == [later]


def test_a_silent_directory_costs_the_grace_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onion, "ALL_UPLOADS_GRACE", 0.2)
    q = feed(*uploads("A", "B"), ev("UPLOADED", "A"))
    start = time.monotonic()
    _await_upload(q, SERVICE, time.monotonic() + 30, 30)
    assert time.monotonic() - start < 10


def test_every_directory_failing_is_an_error_that_names_them() -> None:
    q = feed(*uploads("A", "B"), ev("FAILED", "A", reason="R1"), ev("FAILED", "B", reason="R2"))
    with pytest.raises(PublishFailed, match="any directory: A: R1; B: R2"):
        _await_upload(q, SERVICE, time.monotonic() + 30, 30)


def test_no_answer_before_the_deadline_is_an_error() -> None:
    q = feed(*uploads("A"))
    with pytest.raises(PublishFailed, match="within 0s"):
        _await_upload(q, SERVICE, time.monotonic() + 0.2, 0.2)
