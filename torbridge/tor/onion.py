"""Publishing the bridge's onion service through tor's control port.

stem is synchronous and thread-based, so every stem call runs in a worker
thread and its events come back into trio through ``trio.from_thread``:
stem never blocks the data path. One onion service carries one virtual
port per endpoint, each forwarded to that endpoint's unix socket. Its
ED25519-V3 key is kept in the state directory, so the address survives
restarts. This module is the blocking part (stem calls, keys, torrc);
tor/publisher.py's ``OnionPublisher`` keeps the service published from
trio, again whenever tor or the control connection comes back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torbridge.config import Tor
from torbridge.tor.health import UploadTracker

log = logging.getLogger("torbridge.tor")

MIN_TOR = (0, 4, 0)  # ED25519-V3 ephemeral services with unix-socket targets
# ADD_ONION's PoWDefensesEnabled, PoWQueueRate and PoWQueueBurst (tor MR 835).
MIN_TOR_POW = (0, 4, 9, 2)
KEY_FILE = "onion_ed25519_v3.key"
HOSTNAME_FILE = "onion_hostname"


class TorError(Exception):
    """A Tor problem the operator can act on; the text says what to do."""


class ControlUnreachable(TorError):
    pass


class ControlAuthFailed(TorError):
    pass


class TorTooOld(TorError):
    pass


class PublishFailed(TorError):
    pass


@dataclass(frozen=True)
class ControlSpec:
    """Where tor's control port is, and how to authenticate to it."""

    address: str  # "unix:/run/tor/control" or "HOST:PORT"
    password: str | None = None


def connect(spec: ControlSpec) -> Any:  # a stem Controller
    """Blocking: an authenticated stem Controller, or a TorError saying why not."""
    import stem  # type: ignore[import-untyped]
    import stem.connection  # type: ignore[import-untyped]
    from stem.control import Controller  # type: ignore[import-untyped]

    try:
        if spec.address.startswith("unix:"):
            controller = Controller.from_socket_file(spec.address[len("unix:") :])
        else:
            host, _, port = spec.address.rpartition(":")
            controller = Controller.from_port(address=host.strip("[]"), port=int(port))
    except stem.SocketError as e:
        raise ControlUnreachable(
            f"cannot reach tor's control port {spec.address}: {e}; is tor running, and is"
            " ControlPort (or ControlSocket) set in its torrc?"
        ) from None
    try:
        controller.authenticate(password=spec.password)
    except stem.connection.UnreadableCookieFile as e:
        controller.close()
        raise ControlAuthFailed(
            f"cannot read tor's auth cookie ({e.cookie_path}): add the torbridge user to the"
            " debian-tor group (Debian: CookieAuthFileGroupReadable 1)"
        ) from None
    except stem.connection.MissingPassword:
        controller.close()
        raise ControlAuthFailed(
            f"tor's control port {spec.address} wants a password: set [tor] password"
        ) from None
    except stem.connection.AuthenticationFailure as e:
        controller.close()
        raise ControlAuthFailed(f"tor refused our authentication at {spec.address}: {e}") from None
    version = controller.get_version()
    if (version.major, version.minor, version.micro) < MIN_TOR:
        controller.close()
        raise TorTooOld(f"tor {version} is too old: {'.'.join(map(str, MIN_TOR))} or newer needed")
    return controller


@dataclass(frozen=True)
class PowDefenses:
    """tor's proof-of-work defense for the onion service against introduction floods.

    Off by default in tor; on by default here. Under an introduction flood,
    tor asks clients for a proof of work and serves the introductions with
    the most work first, at ``queue_rate`` per second (bursts of
    ``queue_burst``); None keeps tor's own values (250 and 2500).
    """

    enabled: bool = True
    queue_rate: int | None = None
    queue_burst: int | None = None

    @classmethod
    def of(cls, tor: Tor) -> PowDefenses:
        return cls(tor.pow_defenses, tor.pow_queue_rate, tor.pow_queue_burst)

    def add_onion_args(self) -> list[str]:
        """ADD_ONION's keywords (nothing when off: tor's default, and older tors')."""
        if not self.enabled:
            return []
        args = ["PoWDefensesEnabled=1"]
        if self.queue_rate is not None:
            args.append(f"PoWQueueRate={self.queue_rate}")
        if self.queue_burst is not None:
            args.append(f"PoWQueueBurst={self.queue_burst}")
        return args

    def torrc_lines(self) -> list[str]:
        if not self.enabled:
            return []
        lines = ["HiddenServicePoWDefensesEnabled 1"]
        if self.queue_rate is not None:
            lines.append(f"HiddenServicePoWQueueRate {self.queue_rate}")
        if self.queue_burst is not None:
            lines.append(f"HiddenServicePoWQueueBurst {self.queue_burst}")
        return lines


def add_onion_command(
    ports: dict[int, Path],
    key_type: str,
    key_content: str,
    max_streams: int | None,
    pow_defenses: PowDefenses,
    client_keys: list[str] | None = None,
) -> str:
    """The ADD_ONION line (control-spec 3.27) for the bridge's service.

    MaxStreams comes with the MaxStreamsCloseCircuit flag: a circuit that
    asks for more streams is closed, not just refused the extra ones.
    ``client_keys`` (x25519 public keys, base32) turn on client
    authorization (V3Auth): None = off; an empty list would be off in tor,
    so the caller passes a key nobody holds instead.
    """
    parts = [f"ADD_ONION {key_type}:{key_content}"]
    flags = []
    if max_streams:
        flags.append("MaxStreamsCloseCircuit")
    if client_keys is not None:
        flags.append("V3Auth")
    if flags:
        parts.append(f"Flags={','.join(flags)}")
    if max_streams:
        parts.append(f"MaxStreams={max_streams}")
    parts += pow_defenses.add_onion_args()
    parts += [f"Port={port},unix:{path}" for port, path in sorted(ports.items())]
    parts += [f"ClientAuthV3={key}" for key in client_keys or ()]
    return " ".join(parts)


def tor_supports_pow(controller: Any) -> bool:
    """Whether this tor takes the proof-of-work keywords in ADD_ONION."""
    version = controller.get_version()
    return (version.major, version.minor, version.micro, version.patch) >= MIN_TOR_POW


def read_key(state_dir: Path) -> str | None:
    path = state_dir / KEY_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TorError(
            f"cannot read the onion key {path}: {e.strerror}; it must belong to the user"
            " torbridge runs as (run torbridge commands as that user, e.g. sudo -u torbridge)"
        ) from None


def write_secret(path: Path, text: str) -> None:
    """Atomically, mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stored_onion(state_dir: Path) -> str | None:
    """The onion address published last time (``None`` before the first)."""
    try:
        name = (state_dir / HOSTNAME_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name if re.fullmatch(r"[a-z2-7]{56}\.onion", name) else None


def publish(
    controller: Any,
    state_dir: Path,
    ports: dict[int, Path],
    max_streams: int | None,
    timeout: float,
    wait: bool = True,
    pow_defenses: PowDefenses = PowDefenses(),
    client_keys: list[str] | None = None,
) -> str:
    """Blocking: publish (creating the key the first time); returns NAME.onion.

    Returns once one HSDir has the descriptor and the others tor sent it to
    have answered (``_await_upload``).
    ADD_ONION is sent as a raw command: stem 1.8 knows no PoW keywords.
    """
    import stem
    import stem.response  # type: ignore[import-untyped]
    from stem.control import EventType

    if pow_defenses.enabled and not tor_supports_pow(controller):
        log.warning(
            "tor %s cannot turn on its proof-of-work defense for an ephemeral onion service"
            " (tor %s or newer can): publishing without it. Upgrade tor, or use"
            ' onion = "torrc" with the lines of `torbridge onion-snippet`',
            controller.get_version(),
            ".".join(map(str, MIN_TOR_POW)),
        )
        pow_defenses = PowDefenses(enabled=False)
    key = read_key(state_dir)
    if client_keys is not None and not client_keys:
        from torbridge.tor.clientauth import dummy_public_key

        log.warning(
            "client authorization is on and no client is authorized yet: nobody can reach"
            " the onion until `torbridge client add NAME`"
        )
        client_keys = [dummy_public_key()]
    request = add_onion_command(
        ports,
        "ED25519-V3" if key else "NEW",
        key or "ED25519-V3",
        max_streams,
        pow_defenses,
        client_keys,
    )
    events: queue.Queue[Any] = queue.Queue()
    if wait:
        controller.add_event_listener(events.put, EventType.HS_DESC)
    try:
        deadline = time.monotonic() + timeout
        response = controller.msg(request)
        if not response.is_ok():
            raise PublishFailed(f"tor refused to publish the onion service: {response}")
        stem.response.convert("ADD_ONION", response)
        if wait:
            _await_upload(events, response.service_id, deadline, timeout)
    except stem.ControllerError as e:
        raise PublishFailed(f"tor refused to publish the onion service: {e}") from None
    finally:
        if wait:
            with contextlib.suppress(stem.ControllerError):
                controller.remove_event_listener(events.put)
    if not key:
        write_secret(state_dir / KEY_FILE, f"{response.private_key}")
    onion = f"{response.service_id}.onion"
    write_secret(state_dir / HOSTNAME_FILE, onion)
    return onion


# After the first HSDir has the descriptor, how long the others may take.
# A client's tor uses the first descriptor it finds on any responsible HSDir:
# one still holding the previous version (other client keys, old introduction
# points) sends it away ("bad client auth", a failed introduction) until its
# cached copy is replaced, so a publication waits for all of them.
ALL_UPLOADS_GRACE = 30.0


class UploadWait:
    """Which HSDirs have the descriptor: tor's HS_DESC events kept by the
    publisher's own per-HSDir ``UploadTracker``, no I/O.

    tor names the service in UPLOAD events only (one per directory, all sent
    before any answer comes back); UPLOADED and FAILED are matched to them by
    the directory.
    """

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        self.tracker = UploadTracker()

    def event(self, action: str, address: str, directory: str, reason: str | None = None) -> None:
        if action == "UPLOAD":
            if address == self.service_id:  # a new batch: its own answer is awaited
                self.tracker.upload(directory, time.time())
        elif action in ("UPLOADED", "FAILED"):
            ok = action == "UPLOADED"
            self.tracker.result(
                directory, ok, None if ok else reason or "failed", time.time(), time.monotonic()
            )

    def _with(self, result: str) -> set[str]:
        return {h for h, u in self.tracker.uploads.items() if u.result == result}

    @property
    def directories(self) -> set[str]:
        return set(self.tracker.uploads)

    @property
    def uploaded(self) -> set[str]:
        return self._with("uploaded")

    @property
    def failures(self) -> dict[str, str]:
        return {
            h: u.reason or "failed" for h, u in self.tracker.uploads.items() if u.result == "failed"
        }

    @property
    def reached_one(self) -> bool:
        return bool(self.uploaded)

    @property
    def all_answered(self) -> bool:
        return bool(self.tracker.uploads) and not self.pending()

    @property
    def all_failed(self) -> bool:
        return bool(self.tracker.uploads) and self._with("failed") == self.directories

    def pending(self) -> set[str]:
        return self._with("pending")


def _await_upload(
    events: queue.Queue[Any], service_id: str, deadline: float, timeout: float
) -> None:
    """Until every HSDir tor sent our descriptor to has answered, and one has it;
    the others get ALL_UPLOADS_GRACE after the first success (then tor's own
    retries and the publisher's re-uploads take over)."""
    wait = UploadWait(service_id)
    settle_by: float | None = None
    while True:
        now = time.monotonic()
        if wait.reached_one:
            if settle_by is None:
                settle_by = min(deadline, now + ALL_UPLOADS_GRACE)
            if wait.all_answered:
                return
            if now >= settle_by:
                log.info(
                    "onion descriptor on %d HSDir(s); %d upload(s) still under way",
                    len(wait.uploaded),
                    len(wait.pending()),
                )
                return
        elif wait.all_failed:
            raise PublishFailed(
                "tor could not upload the onion descriptor to any directory: "
                + "; ".join(f"{d}: {r}" for d, r in sorted(wait.failures.items()))
            )
        elif now >= deadline:
            raise PublishFailed(
                f"tor did not upload the onion descriptor within {timeout:.0f}s: is tor"
                " connected to the Tor network?"
            )
        until = settle_by if settle_by is not None else deadline
        try:
            event = events.get(timeout=max(until - now, 0.0))
        except queue.Empty:
            continue
        wait.event(
            str(event.action),
            event.address,
            event.directory_fingerprint,
            getattr(event, "reason", None),
        )


def close_rendezvous(controller: Any, service_id: str) -> int:
    """Blocking: close the service's rendezvous circuits, so that clients must
    introduce themselves again. tor keeps them open when a service is
    removed or reloaded, and a client with an open one keeps getting in,
    revoked or not. Returns how many were closed."""
    import stem

    closed = 0
    for line in controller.get_info("circuit-status", "").splitlines():
        if "PURPOSE=HS_SERVICE_REND" in line and f"REND_QUERY={service_id}" in line:
            with contextlib.suppress(stem.ControllerError):  # gone already
                controller.close_circuit(line.split(" ", 1)[0])
                closed += 1
    return closed


def reload_for_clients(controller: Any, service_id: str, cut: bool, timeout: float) -> None:
    """Blocking, torrc mode: reload tor so that it reads ``authorized_clients/``
    again, and return once it has uploaded the descriptor for the new list (as
    ``publish`` does: one HSDir has it and the others have answered).
    ``cut``: close the service's rendezvous circuits too. tor rebuilds only
    the descriptor's client layer on a reload: the introduction points stay,
    so a revoked client whose tor kept the old descriptor can still introduce
    itself until tor restarts. PublishFailed if no upload came in time."""
    import stem
    from stem.control import EventType

    events: queue.Queue[Any] = queue.Queue()
    controller.add_event_listener(events.put, EventType.HS_DESC)
    try:
        deadline = time.monotonic() + timeout
        controller.signal("RELOAD")
        if cut:
            close_rendezvous(controller, service_id)
        _await_upload(events, service_id, deadline, timeout)
    finally:
        with contextlib.suppress(stem.ControllerError):
            controller.remove_event_listener(events.put)


def torrc_snippet(
    hidden_service_dir: Path,
    ports: dict[int, Path],
    max_streams: int = 512,
    export_circuit_id: bool = False,
    pow_defenses: PowDefenses = PowDefenses(),
    onionbalance_instance: bool = False,
) -> str:
    """For operators who keep onion services in torrc: lines for /etc/tor/torrc.d/.

    ``onionbalance_instance``: the service is one instance behind an
    Onionbalance frontend; tor then reads ``ob_config`` in its directory
    (``torbridge balance instance-config``) when it starts.
    """
    lines = [
        "# torbridge onion service: put this in /etc/tor/torrc.d/torbridge.conf",
        f"HiddenServiceDir {hidden_service_dir}",
        # torbridge (in group debian-tor) reads the hostname file; keys stay 0600.
        "HiddenServiceDirGroupReadable 1",
    ]
    lines += [f"HiddenServicePort {port} unix:{path}" for port, path in sorted(ports.items())]
    if max_streams:
        lines += [f"HiddenServiceMaxStreams {max_streams}", "HiddenServiceMaxStreamsCloseCircuit 1"]
    # Abuse controls of tor itself (tor >= 0.4.8 for proof-of-work). The
    # introduction rate limit exists in torrc only, not in ADD_ONION.
    lines.append("HiddenServiceEnableIntroDoSDefense 1")
    lines += pow_defenses.torrc_lines()
    if export_circuit_id:
        lines.append("HiddenServiceExportCircuitID haproxy")
    if onionbalance_instance:
        lines.append("HiddenServiceOnionBalanceInstance 1")
    return "\n".join(lines) + "\n"


def torrc_onion(hidden_service_dir: Path) -> str:
    path = hidden_service_dir / "hostname"
    try:
        return path.read_text().strip()
    except OSError as e:
        raise TorError(
            f"cannot read {path}: {e.strerror}; is the torrc snippet installed and tor reloaded?"
        ) from None
