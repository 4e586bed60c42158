"""What the running daemon can tell about itself: sessions, peers, totals.

The registry reads live sessions' own counters when asked, so a session
pays nothing per message for being observable. It is served on a local
control socket (``torbridge status``) and as Prometheus text.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torbridge.protocol import messages as m


class Observable(Protocol):
    """What a Session exposes to the registry (server/session.py)."""

    id: int
    endpoint_name: str
    token_name: str | None
    started_wall: float

    @property
    def version(self) -> int: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    @property
    def current_request(self) -> m.Message | None: ...


@dataclass
class PeerHealth:
    last_error: str | None = None
    last_error_at: float | None = None
    last_open_seconds: float | None = None
    opens: int = 0
    failures: int = 0


@dataclass
class Registry:
    started: float = field(default_factory=time.time)
    sessions: dict[int, Observable] = field(default_factory=dict)
    peers: dict[str, PeerHealth] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    onion: str | None = None
    # "publishing" (READY is not sent yet), "published" (tor uploaded the
    # descriptor), "torrc" (tor's own service: torbridge cannot see uploads).
    onion_state: str | None = None
    onion_published_at: float | None = None  # wall time of the last publication
    # The publisher's "publish again" (new client keys): None = no error.
    republish: Callable[[bool], Awaitable[str | None]] | None = None
    # The publishing tor's health (torbridge/tor/health.py), None without one.
    tor_health: Callable[[], dict[str, Any]] | None = None
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    # The daemon's watch on the proxy repository's refs (server/refwatch.py).
    ref_watch: Callable[[], dict[str, Any]] | None = None
    # Each cluster endpoint's node health (transport/cluster.py), by cluster name.
    clusters: dict[str, Callable[[], dict[str, dict[str, Any]]]] = field(default_factory=dict)

    # --- what sessions report -----------------------------------------------------

    def session_started(self, session: Observable) -> None:
        self.sessions[session.id] = session
        self.counters["sessions_total"] += 1

    def session_ended(self, session: Observable, outcome: str, clean: bool) -> None:
        self.sessions.pop(session.id, None)
        self.counters["bytes_in_total"] += session.bytes_in
        self.counters["bytes_out_total"] += session.bytes_out
        if not clean:
            self.counters["sessions_failed_total"] += 1

    def auth_failed(self) -> None:
        self.counters["auth_failures_total"] += 1

    def connection_refused(self) -> None:
        self.counters["connections_refused_total"] += 1

    def onion_published(self, onion: str) -> None:
        """The publisher's report: tor uploaded the descriptor (again)."""
        self.onion, self.onion_state, self.onion_published_at = onion, "published", time.time()

    def peer_opened(self, peer: str, seconds: float) -> None:
        health = self.peers.setdefault(peer, PeerHealth())
        health.opens += 1
        health.last_open_seconds = seconds

    def peer_stopped_idle(self, peer: str) -> None:
        """A session's peer was stopped because its client was quiet (relay.peer_idle)."""
        self.counters["peers_stopped_idle_total"] += 1

    def peer_failed(self, peer: str, reason: str) -> None:
        health = self.peers.setdefault(peer, PeerHealth())
        health.failures += 1
        health.last_error = reason
        health.last_error_at = time.time()

    # --- what operators read ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        live_in = sum(s.bytes_in for s in self.sessions.values())
        live_out = sum(s.bytes_out for s in self.sessions.values())
        return {
            "uptime_seconds": round(now - self.started, 1),
            "onion": self.onion,
            "onion_state": self.onion_state,
            "onion_published_age_seconds": (
                round(now - self.onion_published_at, 1) if self.onion_published_at else None
            ),
            "endpoints": self.endpoints,
            "tor": self.tor_health() if self.tor_health is not None else None,
            "sessions": [
                {
                    "id": s.id,
                    "endpoint": s.endpoint_name,
                    "token": s.token_name,
                    "version": s.version,
                    "seconds": round(now - s.started_wall, 1),
                    "request": m.redacted(s.current_request) if s.current_request else None,
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                }
                for s in sorted(self.sessions.values(), key=lambda s: s.id)
            ],
            "peers": {
                name: {
                    "opens": h.opens,
                    "failures": h.failures,
                    "last_open_seconds": h.last_open_seconds,
                    "last_error": h.last_error,
                    "last_error_age_seconds": (
                        round(now - h.last_error_at, 1) if h.last_error_at else None
                    ),
                }
                for name, h in sorted(self.peers.items())
            },
            "ref_watch": self.ref_watch() if self.ref_watch is not None else None,
            "clusters": {name: nodes() for name, nodes in sorted(self.clusters.items())},
            "totals": {
                **dict(self.counters),
                "bytes_in_total": self.counters["bytes_in_total"] + live_in,
                "bytes_out_total": self.counters["bytes_out_total"] + live_out,
            },
        }

    def metrics(self) -> str:
        """Prometheus text exposition format."""
        snap = self.snapshot()
        totals = snap["totals"]
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP torbridge_{name} {help_text}")
            lines.append(f"# TYPE torbridge_{name} {kind}")
            lines.extend(f"torbridge_{name}{labels} {_number(value)}" for labels, value in samples)

        per_endpoint = Counter(s["endpoint"] for s in snap["sessions"])
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            [("", snap["uptime_seconds"])],
        )
        metric(
            "sessions",
            "gauge",
            "Authenticated sessions in flight.",
            [(f'{{endpoint="{_label(e)}"}}', n) for e, n in sorted(per_endpoint.items())]
            or [("", 0)],
        )
        for key, help_text in (
            ("sessions_total", "Authenticated sessions started."),
            ("sessions_failed_total", "Sessions that ended uncleanly."),
            ("auth_failures_total", "Failed AUTH attempts."),
            (
                "connections_refused_total",
                "Connections turned away (the oldest evicted over the pre-auth cap; circuit caps).",
            ),
            (
                "peers_stopped_idle_total",
                "Peer connections (git-annex-shell, nodes) stopped while their client was quiet.",
            ),
            ("bytes_in_total", "Bytes received from clients."),
            ("bytes_out_total", "Bytes sent to clients."),
        ):
            metric(key, "counter", help_text, [("", totals.get(key, 0))])
        tor = snap["tor"]
        if tor is not None:
            for key, kind, help_text, value in (
                (
                    "tor_bootstrap_percent",
                    "gauge",
                    "Bootstrap progress of the publishing tor.",
                    tor["bootstrap_percent"],
                ),
                (
                    "onion_degraded",
                    "gauge",
                    "1 while the onion is degraded (see status).",
                    1 if tor["degraded"] else 0,
                ),
                (
                    "onion_intro_points",
                    "gauge",
                    "Established introduction points.",
                    tor["intro_points"],
                ),
                (
                    "onion_upload_failures_total",
                    "counter",
                    "Failed descriptor uploads.",
                    tor["upload_failures_total"],
                ),
                (
                    "onion_last_upload_age_seconds",
                    "gauge",
                    "Seconds since an HSDir last took the descriptor.",
                    tor["last_upload_age_seconds"],
                ),
                (
                    "onion_pow_suggested_effort",
                    "gauge",
                    "tor's proof-of-work suggested effort (MetricsPort).",
                    tor["pow_suggested_effort"],
                ),
                (
                    "onion_intro_rejected_total",
                    "counter",
                    "Introductions tor rejected (MetricsPort).",
                    tor["intro_rejected_total"],
                ),
            ):
                if value is not None:
                    metric(key, kind, help_text, [("", value)])
        peers = snap["peers"]
        metric(
            "peer_failures_total",
            "counter",
            "Failures reaching or talking to a peer.",
            [(f'{{peer="{_label(p)}"}}', h["failures"]) for p, h in peers.items()],
        )
        metric(
            "peer_open_seconds",
            "gauge",
            "Time the last connection to a peer took to open.",
            [
                (f'{{peer="{_label(p)}"}}', h["last_open_seconds"])
                for p, h in peers.items()
                if h["last_open_seconds"] is not None
            ],
        )
        nodes = [
            (f'{{cluster="{_label(cl)}",node="{_label(n)}"}}', state)
            for cl, states in snap["clusters"].items()
            for n, state in sorted(states.items())
        ]
        metric(
            "cluster_node_up",
            "gauge",
            "1 while a cluster node is up, 0 while it is down (skipped until a probe answers).",
            [(labels, 1 if state["up"] else 0) for labels, state in nodes],
        )
        metric(
            "cluster_node_down_seconds",
            "gauge",
            "Seconds a cluster node has been down (0 while up).",
            [(labels, state["down_seconds"] or 0) for labels, state in nodes],
        )
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    # Counters stay exact integers; %g would round a byte count to 6 digits.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(snapshot: dict[str, Any]) -> str:
    """``torbridge status`` for a person."""
    lines = [f"torbridge up {_duration(snapshot['uptime_seconds'])}"]
    if snapshot["onion"]:
        state = snapshot.get("onion_state")
        age = snapshot.get("onion_published_age_seconds")
        published = f", published {_duration(age)} ago" if age is not None else ""
        lines.append(f"onion: {snapshot['onion']} ({state}{published})")
    elif snapshot.get("onion_state") == "publishing":
        lines.append("onion: publishing (not reachable yet)")
    tor = snapshot.get("tor")
    if tor:
        lines += _render_tor(tor)
    for e in snapshot["endpoints"]:
        lines.append(f"endpoint {e['name']}: port {e['port']}, {e['target']}, {e['socket']}")
    sessions = snapshot["sessions"]
    lines.append(f"sessions in flight: {len(sessions)}")
    for s in sessions:
        rate = (s["bytes_in"] + s["bytes_out"]) / max(s["seconds"], 0.1)
        lines.append(
            f"  [{s['id']}] {s['endpoint']} token {s['token']} v{s['version']}"
            f" {_duration(s['seconds'])} in {_size(s['bytes_in'])} out {_size(s['bytes_out'])}"
            f" ({_size(rate)}/s) {s['request'] or 'idle'}"
        )
    for name, p in snapshot["peers"].items():
        state = (
            f"last error {p['last_error_age_seconds']}s ago: {p['last_error']}"
            if p["last_error"]
            else "no errors"
        )
        opened = p["last_open_seconds"]
        latency = f", opens in {opened:.2f}s" if opened is not None else ""
        lines.append(f"peer {name}: {p['opens']} opens, {p['failures']} failures{latency}; {state}")
    for cluster, nodes in (snapshot.get("clusters") or {}).items():
        for name, n in sorted(nodes.items()):
            if n["up"]:
                state = "up"
            else:
                probe = (
                    "probing now" if n["probing"] else f"next probe in {n['next_probe_seconds']}s"
                )
                state = f"DOWN for {n['down_seconds']}s, {probe}; last error: {n['last_error']}"
            lines.append(f"cluster {cluster} node {name}: {state}")
    watch = snapshot.get("ref_watch")
    if watch and watch["sessions"]:
        lines.append(
            f"ref watch ({watch['mechanism'] or 'starting'}): {watch['sessions']} session(s)"
            f" waiting for changes, {watch['snapshots']} snapshots"
        )
    t = snapshot["totals"]
    lines.append(
        f"totals: {t.get('sessions_total', 0)} sessions ({t.get('sessions_failed_total', 0)}"
        f" failed), {t.get('auth_failures_total', 0)} failed AUTH,"
        f" in {_size(t['bytes_in_total'])}, out {_size(t['bytes_out_total'])}"
    )
    return "\n".join(lines) + "\n"


def _render_tor(tor: dict[str, Any]) -> list[str]:
    state = f"degraded: {tor['degraded']}" if tor["degraded"] else "ok"
    facts = []
    if tor["bootstrap_percent"] is not None:
        facts.append(f"bootstrap {tor['bootstrap_percent']}%")
    if tor["network"] is not None:
        facts.append(f"network {tor['network']}")
    if tor["intro_points"] is not None:
        facts.append(f"{tor['intro_points']} introduction points")
    if tor["pow_suggested_effort"] is not None:
        facts.append(f"PoW suggested effort {tor['pow_suggested_effort']:g}")
    if tor["intro_rejected_total"] is not None:
        facts.append(f"{tor['intro_rejected_total']:g} introductions rejected")
    lines = [f"tor: {state}" + (f"; {', '.join(facts)}" if facts else "")]
    uploads = tor["uploads"]
    published = tor["last_publish_age_seconds"]
    uploaded = tor["last_upload_age_seconds"]
    lines.append(
        "  descriptor: "
        + (f"published {_duration(published)} ago" if published is not None else "not published")
        + (f", last upload {_duration(uploaded)} ago" if uploaded is not None else "")
        + f", {tor['upload_failures_total']} failed uploads"
    )
    for hsdir, u in uploads.items():
        why = f" ({u['reason']})" if u["reason"] else ""
        lines.append(f"  HSDir {hsdir}: {u['result']} {_duration(u['age_seconds'])} ago{why}")
    if tor["poll_error"]:
        lines.append(f"  (could not ask tor: {tor['poll_error']})")
    return lines


def _duration(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def as_json(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True)
