"""The publishing tor's health, without tor: uploads and their retries, tor's
metrics text, introduction circuits, the doctor's version and clock rules,
and how status shows it. The Tor tier (tests/tor/test_client_auth.py,
tests/tor/test_client_auth_torrc.py for the MetricsPort) reads the same
from a real tor."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from torbridge.config import Tor
from torbridge.ops.doctor.tor import clock_problem, tor_feature_problems
from torbridge.server.status import Registry, render
from torbridge.tor.health import (
    TorHealth,
    UploadTracker,
    bootstrap_percent,
    count_intro_points,
    http_body,
    parse_metrics,
    scrape,
)

SID = "c" * 56
A, B = "$" + "A" * 40, "$" + "B" * 40


def test_failed_upload_is_retried_with_backoff_and_degrades_until_it_works() -> None:
    t = UploadTracker(first=30, cap=100)
    t.upload(A, 0)
    t.upload(B, 0)
    assert t.result(A, True, None, 1, 1)
    assert t.degraded is None
    assert t.result(B, False, "UPLOAD_REJECTED", 2, 2)
    assert t.degraded == "descriptor upload failed at 1 of 2 HSDirs"
    assert t.due(31) == [] and t.due(32) == [B]
    assert t.due(33) == []  # once per failure
    t.upload(B, 40)
    t.result(B, False, "x", 41, 41)
    assert t.due(41 + 59) == [] and t.due(41 + 60) == [B]  # 30, then 60
    for i in range(5):
        t.upload(B, 200 + i)
        t.result(B, False, "x", 200 + i, 200 + i)
    assert t.uploads[B].retry_at == 204 + 100  # capped
    t.upload(B, 400)
    t.result(B, True, None, 401, 401)
    assert t.degraded is None and t.failures_total == 7 and t.uploads[B].failures == 0
    assert not t.result("$" + "C" * 40, False, "x", 1, 1)  # not an upload of ours


def test_events_before_the_address_is_known_are_kept_and_matched() -> None:
    h = TorHealth()

    def ev(action: str, hsdir: str, address: str = "UNKNOWN", reason: str | None = None) -> object:
        return SimpleNamespace(
            action=action, directory_fingerprint=hsdir, address=address, reason=reason
        )

    h.on_hs_desc(ev("UPLOAD", A, SID))
    h.on_hs_desc(ev("UPLOAD", B, "d" * 56))  # another service of this tor
    h.on_hs_desc(ev("UPLOADED", A))
    h.on_hs_desc(ev("FAILED", B, reason="x"))
    assert h.published(SID) == []
    assert h.on_hs_desc(ev("UPLOAD", B, SID)) == []
    assert "failed" in h.on_hs_desc(ev("FAILED", B, reason="UPLOAD_REJECTED"))[0]
    snap = h.snapshot()
    assert snap["uploads"][A]["result"] == "uploaded"
    assert snap["uploads"][B]["result"] == "failed"
    assert snap["uploads"][B]["reason"] == "UPLOAD_REJECTED"
    assert snap["state"] == "degraded" and snap["upload_failures_total"] == 1


def test_metrics_text_of_one_service() -> None:
    text = (
        "# HELP tor_hs_pow_suggested_effort ...\n"
        f'tor_hs_pow_suggested_effort{{onion="{SID}"}} 12\n'
        f'tor_hs_pow_suggested_effort{{onion="{"d" * 56}"}} 99\n'
        f'tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="bad_auth_key"}} 3\n'
        f'tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="max_intro"}} 4\n'
    )
    assert parse_metrics(text, SID) == {"pow_suggested_effort": 12, "intro_rejected_total": 7}
    assert parse_metrics("tor_relay_load 1\n", SID) == {}


# What tor 0.4.9.11's MetricsPort says about one onion service with PoW on
# (an excerpt, as the Tor tier's test_client_auth_torrc.py reads it).
TOR_0_4_9_METRICS = f"""\
# HELP tor_hs_rdv_pow_pqueue_count Number of requests waiting in the proof of work priority queue
# TYPE tor_hs_rdv_pow_pqueue_count gauge
tor_hs_rdv_pow_pqueue_count{{onion="{SID}"}} 0
# HELP tor_hs_intro_rejected_intro_req_count Total number of rejected introduction circuits
# TYPE tor_hs_intro_rejected_intro_req_count counter
tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="bad_auth_key"}} 0
tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="invalid_introduce2"}} 2
tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="subcredential"}} 0
tor_hs_intro_rejected_intro_req_count{{onion="{SID}",reason="replay"}} 1
tor_hs_intro_circ_build_time_bucket{{onion="{SID}",le="1000.00"}} 6
tor_hs_intro_circ_build_time_sum{{onion="{SID}"}} 728
# HELP tor_hs_pow_suggested_effort Suggested effort for requests with a proof of work client puzzle
# TYPE tor_hs_pow_suggested_effort gauge
tor_hs_pow_suggested_effort{{onion="{SID}"}} 0
"""


def test_metrics_text_as_tor_0_4_9_writes_it() -> None:
    assert parse_metrics(TOR_0_4_9_METRICS, SID) == {
        "pow_suggested_effort": 0,
        "intro_rejected_total": 3,
    }


def test_http_body_ends_at_content_length_not_at_eof() -> None:
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    assert http_body(head[:20], at_eof=False) is None
    assert http_body(head + b"abc", at_eof=False) is None
    assert http_body(head + b"abcde", at_eof=False) == "abcde"
    assert http_body(b"HTTP/1.0 200 OK\r\n\r\nall of it", at_eof=True) == "all of it"
    for bad, why in (
        (b"HTTP/1.0 404 Not Found\r\n\r\n", "answered"),
        (head + b"abc", "closed after 3 of 5 bytes"),
        (b"HTTP/1.0 200", "before an HTTP answer"),
    ):
        with pytest.raises(ValueError, match=why):
            http_body(bad, at_eof=True)


@pytest.fixture
def metrics_port() -> Iterator[str]:
    """A MetricsPort as tor's: the answer has a Content-Length and the
    connection stays open afterwards."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        held.append(conn)
        conn.recv(4096)
        body = TOR_0_4_9_METRICS.encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    thread.join(timeout=10)
    for conn in held:
        conn.close()
    server.close()


def test_scrape_returns_once_the_body_is_in_while_tor_keeps_the_connection(
    metrics_port: str,
) -> None:
    # A read until EOF would wait out the whole timeout (and fail) here.
    assert scrape(metrics_port, timeout=30) == TOR_0_4_9_METRICS


def test_intro_points_and_bootstrap() -> None:
    status = "\n".join(
        [
            f"1 BUILT $X~a PURPOSE=HS_SERVICE_INTRO HS_STATE=HSSI_ESTABLISHED REND_QUERY={SID}",
            f"2 BUILT $X~a PURPOSE=HS_SERVICE_INTRO HS_STATE=HSSI_CONNECTING REND_QUERY={SID}",
            "3 BUILT $X~a PURPOSE=HS_SERVICE_INTRO HS_STATE=HSSI_ESTABLISHED"
            f" REND_QUERY={'d' * 56}",
            "4 BUILT $X~a PURPOSE=GENERAL",
        ]
    )
    assert count_intro_points(status, SID) == 1
    assert bootstrap_percent('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"') == 100
    assert bootstrap_percent("") is None


def test_status_shows_tor_health() -> None:
    h = TorHealth()
    h.published(SID)
    h.bootstrap, h.network, h.intro_points = 100, "up", 3
    h.uploads.upload(A, 0)
    h.uploads.result(A, False, "UPLOAD_REJECTED", 0, 0)
    registry = Registry(onion=SID + ".onion", onion_state="published")
    registry.tor_health = h.snapshot
    text = render(registry.snapshot())
    assert (
        "tor: degraded: descriptor upload failed at 1 of 1 HSDirs; bootstrap 100%,"
        " network up, 3 introduction points" in text
    ), text
    assert f"HSDir {A}: failed" in text and "(UPLOAD_REJECTED)" in text, text
    metrics = registry.metrics()
    assert "torbridge_onion_degraded 1" in metrics
    assert "torbridge_onion_intro_points 3" in metrics
    assert "torbridge_onion_upload_failures_total 1" in metrics


def test_doctor_rules() -> None:
    tor = Tor(control="unix:/run/tor/control", client_auth=True, metrics_port="127.0.0.1:9035")
    config = SimpleNamespace(tor=tor)
    old = tor_feature_problems(config, (0, 4, 5, 0))  # type: ignore[arg-type]
    assert old == [
        "[tor] pow_defenses needs tor 0.4.9.2 or newer",
        "[tor] client_auth needs tor 0.4.6.1 or newer",
        "[tor] metrics_port needs tor 0.4.7.1 or newer",
    ]
    assert tor_feature_problems(config, (0, 4, 9, 11)) == []  # type: ignore[arg-type]
    assert clock_problem(1000.0, 0.0, 10_800.0) is None
    assert "minutes ahead" in (clock_problem(20_000.0, 0.0, 10_800.0) or "")
    assert "120 minutes behind" in (clock_problem(0.0, 7200.0, 18_000.0) or "")
