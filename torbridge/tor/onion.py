"""Publishing the bridge's onion service through tor's control port.

stem is synchronous and thread-based, so every stem call runs in a worker
thread and its events come back into trio through ``trio.from_thread``:
stem never blocks the data path. One onion service carries one virtual
port per endpoint, each forwarded to that endpoint's unix socket. Its
ED25519-V3 key is kept in the state directory, so the address survives
restarts; the service is published again whenever tor or the control
connection comes back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("torbridge.tor")

MIN_TOR = (0, 4, 0)  # ED25519-V3 ephemeral services with unix-socket targets
KEY_FILE = "onion_ed25519_v3.key"
HOSTNAME_FILE = "onion_hostname"
RETRY_MAX = 30.0


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
) -> str:
    """Blocking: publish (creating the key the first time); returns NAME.onion.

    Returns only once tor says the descriptor reached at least one HSDir.
    """
    import stem

    key = read_key(state_dir)
    mapping = {port: f"unix:{path}" for port, path in ports.items()}
    try:
        response = controller.create_ephemeral_hidden_service(
            mapping,
            key_type="ED25519-V3" if key else "NEW",
            key_content=key or "ED25519-V3",
            await_publication=wait,
            timeout=timeout,
            max_streams=max_streams,
        )
    except stem.Timeout:
        raise PublishFailed(
            f"tor did not upload the onion descriptor within {timeout:.0f}s: is tor connected"
            " to the Tor network?"
        ) from None
    except (stem.ControllerError, stem.OperationFailed) as e:
        raise PublishFailed(f"tor refused to publish the onion service: {e}") from None
    if not key:
        write_secret(state_dir / KEY_FILE, f"{response.private_key}")
    onion = f"{response.service_id}.onion"
    write_secret(state_dir / HOSTNAME_FILE, onion)
    return onion


def torrc_snippet(
    hidden_service_dir: Path,
    ports: dict[int, Path],
    max_streams: int = 32,
    export_circuit_id: bool = False,
) -> str:
    """For operators who keep onion services in torrc: lines for /etc/tor/torrc.d/."""
    lines = [
        "# torbridge onion service: put this in /etc/tor/torrc.d/torbridge.conf",
        f"HiddenServiceDir {hidden_service_dir}",
        # torbridge (in group debian-tor) reads the hostname file; keys stay 0600.
        "HiddenServiceDirGroupReadable 1",
    ]
    lines += [f"HiddenServicePort {port} unix:{path}" for port, path in sorted(ports.items())]
    if max_streams:
        lines += [f"HiddenServiceMaxStreams {max_streams}", "HiddenServiceMaxStreamsCloseCircuit 1"]
    # Abuse controls of tor itself (tor >= 0.4.8 for proof-of-work).
    lines += ["HiddenServiceEnableIntroDoSDefense 1", "HiddenServicePoWDefensesEnabled 1"]
    if export_circuit_id:
        lines.append("HiddenServiceExportCircuitID haproxy")
    return "\n".join(lines) + "\n"


def torrc_onion(hidden_service_dir: Path) -> str:
    path = hidden_service_dir / "hostname"
    try:
        return path.read_text().strip()
    except OSError as e:
        raise TorError(
            f"cannot read {path}: {e.strerror}; is the torrc snippet installed and tor reloaded?"
        ) from None


def _on_closed(
    closed: trio.Event, token: trio.lowlevel.TrioToken
) -> Callable[[object, object, float], None]:
    """A stem status listener (called in stem's thread) that sets ``closed``."""

    def listener(_controller: object, state: object, _timestamp: float) -> None:
        if str(state) == "Closed":
            with contextlib.suppress(trio.RunFinishedError):  # the daemon is gone already
                trio.from_thread.run_sync(closed.set, trio_token=token)

    return listener


class OnionPublisher:
    """Keeps the onion service published for as long as ``run`` runs."""

    def __init__(
        self,
        spec: ControlSpec,
        state_dir: Path,
        ports: dict[int, Path],
        max_streams: int | None = None,
        publish_timeout: float = 120.0,
    ) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.ports = ports
        self.max_streams = max_streams
        self.publish_timeout = publish_timeout
        self.onion: str | None = None
        self.published = 0  # times published; > 1 after tor came back
        self.last_error: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish, report the address, and publish again whenever tor comes back.

        The first failure is raised (the daemon cannot be ready without its
        onion); later ones are logged and retried with backoff.
        """
        first = True
        delay = 1.0
        while True:
            closed = trio.Event()
            on_status = _on_closed(closed, trio.lowlevel.current_trio_token())
            controller = None
            try:
                controller = await trio.to_thread.run_sync(connect, self.spec)
                controller.add_status_listener(on_status)
                onion = await trio.to_thread.run_sync(
                    publish,
                    controller,
                    self.state_dir,
                    self.ports,
                    self.max_streams,
                    self.publish_timeout,
                )
            except TorError as e:
                self.last_error = str(e)
                if controller is not None:
                    await trio.to_thread.run_sync(controller.close)
                if first:
                    raise
                log.warning("%s; trying again in %.0fs", e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.onion, self.published, self.last_error, delay = (
                onion,
                self.published + 1,
                None,
                1.0,
            )
            log.info("onion service %s published (ports %s)", onion, sorted(self.ports))
            if first:
                first = False
                task_status.started(onion)
            try:
                await closed.wait()
                log.warning("lost tor's control connection; publishing again when tor is back")
            finally:
                with trio.CancelScope(shield=True):
                    # Closing the control connection also removes the service.
                    await trio.to_thread.run_sync(controller.close)
