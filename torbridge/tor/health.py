"""The health of the tor that publishes the onion: what ``torbridge status`` shows.

``UploadTracker`` is sans-I/O: it is told tor's HS_DESC events (from stem's
event thread, under a lock) and decides which directory to send the
descriptor to again, with a backoff, when an upload failed. ``TorHealth``
holds it with what the publisher polls (in a worker thread): bootstrap
progress, network liveness, introduction points, and from tor's
MetricsPort, when one is configured, the proof-of-work suggested effort and
the rejected introductions.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

RETRY_FIRST = 30.0  # seconds before sending a descriptor again to a directory that failed
RETRY_MAX = 600.0


@dataclass
class Upload:
    result: str  # "pending", "uploaded", "failed"
    at: float  # wall time of the result
    reason: str | None = None
    failures: int = 0  # in a row
    retry_at: float | None = None  # monotonic; set while a retry is due


class UploadTracker:
    """Descriptor uploads, per HSDir, for one service."""

    def __init__(self, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> None:
        self.first = first
        self.cap = cap
        self.uploads: dict[str, Upload] = {}
        self.failures_total = 0
        self.last_uploaded_at: float | None = None

    def upload(self, hsdir: str, wall: float) -> None:
        """tor started an upload of our descriptor to ``hsdir``."""
        previous = self.uploads.get(hsdir)
        failures = previous.failures if previous else 0
        self.uploads[hsdir] = Upload("pending", wall, failures=failures)

    def result(self, hsdir: str, ok: bool, reason: str | None, wall: float, mono: float) -> bool:
        """UPLOADED or FAILED; True when it is about ours (an upload we saw start)."""
        upload = self.uploads.get(hsdir)
        if upload is None:
            return False
        if ok:
            self.uploads[hsdir] = Upload("uploaded", wall)
            self.last_uploaded_at = wall
        else:
            failures = upload.failures + 1
            delay = min(self.first * 2 ** (failures - 1), self.cap)
            self.uploads[hsdir] = Upload("failed", wall, reason, failures, mono + delay)
            self.failures_total += 1
        return True

    def due(self, mono: float) -> list[str]:
        """Directories to send the descriptor to again now (each once per failure)."""
        ready = [
            h
            for h, u in self.uploads.items()
            if u.result == "failed" and u.retry_at is not None and u.retry_at <= mono
        ]
        for hsdir in ready:
            self.uploads[hsdir].retry_at = None
        return ready

    def reset(self) -> None:
        """A new publication: a new descriptor, other directories."""
        self.uploads.clear()

    @property
    def degraded(self) -> str | None:
        failed = [h for h, u in self.uploads.items() if u.result == "failed"]
        if not failed:
            return None
        return f"descriptor upload failed at {len(failed)} of {len(self.uploads)} HSDirs"


def parse_metrics(text: str, service_id: str) -> dict[str, float]:
    """tor's MetricsPort text: the proof-of-work suggested effort and the rejected
    introductions (all reasons) of one onion service."""
    effort: float | None = None
    rejected = 0.0
    found = False
    for line in text.splitlines():
        m = re.fullmatch(r"(tor_hs_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+)", line.strip())
        if m is None or service_id not in m.group(2):
            continue
        name, value = m.group(1), float(m.group(3))
        if name == "tor_hs_pow_suggested_effort":
            effort, found = value, True
        elif name == "tor_hs_intro_rejected_intro_req_count":
            rejected += value
            found = True
    if not found:
        return {}
    result = {"intro_rejected_total": rejected}
    if effort is not None:
        result["pow_suggested_effort"] = effort
    return result


def http_body(data: bytes, at_eof: bool) -> str | None:
    """The body of the HTTP response ``data`` once it is complete (None: read
    on). tor's MetricsPort sends a Content-Length and keeps the connection
    open, so the body ends there, not at EOF. ValueError: not a 200 answer."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        if at_eof:
            raise ValueError("the MetricsPort closed the connection before an HTTP answer")
        return None
    status, *headers = head.decode("latin-1").split("\r\n")
    if status.split(" ", 2)[1:2] != ["200"]:
        raise ValueError(f"the MetricsPort answered {status!r}")
    length = None
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is not None and len(body) >= length:
        return body[:length].decode(errors="replace")
    if at_eof:
        if length is not None:
            raise ValueError(f"the MetricsPort closed after {len(body)} of {length} bytes")
        return body.decode(errors="replace")
    return None


def scrape(address: str, timeout: float = 10.0) -> str:
    """Blocking: GET /metrics from tor's MetricsPort ("127.0.0.1:PORT"), within
    ``timeout`` seconds. OSError or ValueError when that fails."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = s.recv(65536)
            data += chunk
            body = http_body(data, at_eof=not chunk)
            if body is not None:
                return body


def count_intro_points(circuit_status: str, service_id: str) -> int:
    """Established introduction circuits of our service (GETINFO circuit-status)."""
    return sum(
        1
        for line in circuit_status.splitlines()
        if "PURPOSE=HS_SERVICE_INTRO" in line
        and "HS_STATE=HSSI_ESTABLISHED" in line
        and f"REND_QUERY={service_id}" in line
    )


@dataclass
class TorHealth:
    """Shared between stem's event thread, the worker threads that poll, and
    the trio thread that reads ``snapshot``: every access under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    uploads: UploadTracker = field(default_factory=UploadTracker)
    service_id: str | None = None
    bootstrap: int | None = None  # percent
    network: str | None = None  # tor's network-liveness: "up" or "down"
    intro_points: int | None = None
    pow_suggested_effort: float | None = None
    intro_rejected_total: float | None = None
    last_publish_at: float | None = None
    last_poll_error: str | None = None
    # HS_DESC events before the first ADD_ONION answered (our address unknown yet)
    early: list[Any] = field(default_factory=list)

    def on_hs_desc(self, event: Any) -> list[str]:
        """stem's HS_DESC listener (stem's thread); returns log lines to write."""
        with self.lock:
            if self.service_id is None:
                self.early.append(event)
                return []
        return self._event(event)

    def _event(self, event: Any) -> list[str]:
        action = str(event.action)
        now, mono = time.time(), time.monotonic()
        with self.lock:
            if action == "UPLOAD":
                if event.address == self.service_id:
                    self.uploads.upload(event.directory_fingerprint, now)
                return []
            if action not in ("UPLOADED", "FAILED"):
                return []
            ok = action == "UPLOADED"
            reason = None if ok else str(event.reason)
            ours = self.uploads.result(event.directory_fingerprint, ok, reason, now, mono)
        if ours and not ok:
            return [
                f"descriptor upload to HSDir {event.directory_fingerprint} failed"
                f" ({reason}); sending it again later"
            ]
        return []

    def publishing(self) -> None:
        """Before an ADD_ONION: a new descriptor will go to other directories."""
        with self.lock:
            self.uploads.reset()

    def published(self, service_id: str) -> list[str]:
        with self.lock:
            self.service_id = service_id
            self.last_publish_at = time.time()
            early, self.early = self.early, []
        return [line for event in early for line in self._event(event)]

    @property
    def degraded(self) -> str | None:
        with self.lock:
            reason = self.uploads.degraded
            if self.network == "down":
                reason = "tor says the network is down" + (f"; {reason}" if reason else "")
            if self.intro_points == 0:
                reason = "no introduction point established" + (f"; {reason}" if reason else "")
            return reason

    def snapshot(self) -> dict[str, Any]:
        degraded = self.degraded
        now = time.time()
        with self.lock:
            return {
                "state": "degraded" if degraded else "ok",
                "degraded": degraded,
                "bootstrap_percent": self.bootstrap,
                "network": self.network,
                "intro_points": self.intro_points,
                "last_publish_age_seconds": _age(now, self.last_publish_at),
                "last_upload_age_seconds": _age(now, self.uploads.last_uploaded_at),
                "upload_failures_total": self.uploads.failures_total,
                "uploads": {
                    hsdir: {
                        "result": u.result,
                        "age_seconds": _age(now, u.at),
                        "reason": u.reason,
                    }
                    for hsdir, u in sorted(self.uploads.uploads.items())
                },
                "pow_suggested_effort": self.pow_suggested_effort,
                "intro_rejected_total": self.intro_rejected_total,
                "poll_error": self.last_poll_error,
            }


def _age(now: float, then: float | None) -> float | None:
    return round(now - then, 1) if then is not None else None


def bootstrap_percent(phase: str) -> int | None:
    """From GETINFO status/bootstrap-phase ("NOTICE BOOTSTRAP PROGRESS=100 ...")."""
    m = re.search(r"PROGRESS=(\d+)", phase)
    return int(m.group(1)) if m else None
