"""The daemon's onion service, kept published for as long as it runs.

tor's control port is watched from trio (tor/onion.py's blocking calls run
in threads): the service is published again when tor loses it or its
authorized clients change, and tor's health is read for server/status.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from torbridge.tor.health import (
    TorHealth,
    bootstrap_percent,
    count_intro_points,
    parse_metrics,
    scrape,
)
from torbridge.tor.onion import (
    ControlSpec,
    PowDefenses,
    PublishFailed,
    TorError,
    close_rendezvous,
    connect,
    publish,
)

log = logging.getLogger("torbridge.tor")

RETRY_MAX = 30.0
HEALTH_INTERVAL = 20.0  # seconds between looks at tor's state
DEFAULT_POW = PowDefenses()


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
        pow_defenses: PowDefenses = DEFAULT_POW,
        on_published: Callable[[str], None] | None = None,
        client_keys: Callable[[], list[str]] | None = None,
        metrics_port: str | None = None,
    ) -> None:
        self.spec = spec
        self.metrics_port = metrics_port  # tor's MetricsPort, for PoW figures
        self.health = TorHealth()
        self.on_published = on_published
        self.client_keys = client_keys  # read at each publication; None = no client auth
        self._wake = trio.Event()
        self._cut = False
        self._republished: list[tuple[trio.Event, list[str | None]]] = []
        self.state_dir = state_dir
        self.ports = ports
        self.max_streams = max_streams
        self.pow_defenses = pow_defenses
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
                await trio.to_thread.run_sync(self._watch_uploads, controller)
                self._wake = trio.Event()  # this publication reads the current clients
                onion = await trio.to_thread.run_sync(self._publish, controller)
            except TorError as e:
                self.last_error = str(e)
                self._answer(str(e))
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
            if self.on_published is not None:
                self.on_published(onion)
            self._answer(None)
            if first:
                first = False
                task_status.started(onion)
            try:
                async with trio.open_nursery() as watching:
                    watching.start_soon(self._health_loop, controller)
                    await self._serve_requests(controller, onion, closed)
                    watching.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    # Closing the control connection also removes the service.
                    await trio.to_thread.run_sync(controller.close)

    async def _serve_requests(self, controller: Any, onion: str, closed: trio.Event) -> None:
        """Until tor's control connection closes, or a republication fails."""
        while not closed.is_set():
            await _either(closed, self._wake)
            if self._wake.is_set() and not closed.is_set():
                self._wake = trio.Event()
                again = await self._republish(controller, onion)
                if again is None:  # gone: reconnect and publish from scratch
                    return
                onion = again
        log.warning("lost tor's control connection; publishing again when tor is back")

    def _watch_uploads(self, controller: Any) -> None:
        """Blocking: HS_DESC events into ``health`` for as long as the connection lasts."""
        from stem.control import EventType  # type: ignore[import-untyped]

        def listener(event: Any) -> None:
            for line in self.health.on_hs_desc(event):
                log.warning("%s", line)

        controller.add_event_listener(listener, EventType.HS_DESC)

    async def _health_loop(self, controller: Any) -> None:
        """Poll tor's state, and send failed uploads again, every HEALTH_INTERVAL."""
        while True:
            await trio.to_thread.run_sync(self._poll, controller)
            await trio.sleep(HEALTH_INTERVAL)

    def _poll(self, controller: Any) -> None:
        """Blocking (a worker thread): one look at tor; errors are kept, not raised."""
        import stem  # type: ignore[import-untyped]

        health = self.health
        try:
            phase = controller.get_info("status/bootstrap-phase", "")
            liveness = controller.get_info("network-liveness", None)
            circuits = controller.get_info("circuit-status", "")
            with health.lock:
                service_id = health.service_id
                health.bootstrap = bootstrap_percent(phase)
                health.network = liveness
                if service_id is not None:
                    health.intro_points = count_intro_points(circuits, service_id)
                due = health.uploads.due(time.monotonic())
            if due and service_id is not None:
                self._upload_again(controller, service_id, due)
            if self.metrics_port is not None and service_id is not None:
                figures = parse_metrics(scrape(self.metrics_port), service_id)
                with health.lock:
                    health.pow_suggested_effort = figures.get("pow_suggested_effort")
                    health.intro_rejected_total = figures.get("intro_rejected_total")
            with health.lock:
                health.last_poll_error = None
        except (stem.ControllerError, OSError, ValueError) as e:
            with health.lock:
                health.last_poll_error = str(e) or type(e).__name__

    def _upload_again(self, controller: Any, service_id: str, hsdirs: list[str]) -> None:
        """HSPOST our current descriptor to directories whose upload failed."""
        descriptor = controller.get_info(f"hs/service/desc/id/{service_id}")
        for hsdir in hsdirs:
            log.info("sending the onion descriptor again to HSDir %s", hsdir)
            with self.health.lock:
                self.health.uploads.upload(hsdir, time.time())
            reply = controller.msg(f"HSPOST SERVER={hsdir} HSADDRESS={service_id}\n{descriptor}")
            if not reply.is_ok():
                log.warning("tor refused to send the descriptor to %s: %s", hsdir, reply)
                with self.health.lock:
                    self.health.uploads.result(
                        hsdir, False, str(reply), time.time(), time.monotonic()
                    )

    def _publish(self, controller: Any) -> str:
        """Blocking (a worker thread): one ADD_ONION with the current client keys."""
        from torbridge.tor.clientauth import ClientAuthError

        try:
            keys = self.client_keys() if self.client_keys is not None else None
        except ClientAuthError as e:
            raise PublishFailed(f"cannot read the authorized clients: {e}") from None
        self.health.publishing()
        onion = publish(
            controller,
            self.state_dir,
            self.ports,
            self.max_streams,
            self.publish_timeout,
            True,
            self.pow_defenses,
            keys,
        )
        for line in self.health.published(onion.removesuffix(".onion")):
            log.warning("%s", line)
        return onion

    async def _republish(self, controller: Any, onion: str) -> str | None:
        """DEL_ONION and ADD_ONION again (tor cannot change an ephemeral service's
        clients in place); the new onion, or None when that failed. After a
        revocation, the rendezvous circuits are closed too."""
        import stem

        cut, self._cut = self._cut, False

        def again() -> str:
            try:
                controller.remove_ephemeral_hidden_service(onion.removesuffix(".onion"))
            except stem.ControllerError as e:
                raise PublishFailed(f"tor refused to remove the onion service: {e}") from None
            new = self._publish(controller)
            if cut:
                n = close_rendezvous(controller, new.removesuffix(".onion"))
                log.info("closed %d rendezvous circuit(s): every client introduces itself again", n)
            return new

        log.info("publishing the onion service again (its authorized clients changed)")
        try:
            new = await trio.to_thread.run_sync(again)
        except TorError as e:
            self.last_error = str(e)
            log.warning("%s; publishing from scratch", e)
            self._answer(str(e))
            return None
        self.published += 1
        log.info("onion service %s published again", new)
        if self.on_published is not None:
            self.on_published(new)
        self._answer(None)
        return new

    async def republish(self, cut: bool = False) -> str | None:
        """Publish again with the current client keys; None when done, else the error.
        ``cut``: also close the rendezvous circuits (a client was revoked)."""
        self._cut = self._cut or cut
        done = trio.Event()
        result: list[str | None] = []
        self._republished.append((done, result))
        self._wake.set()
        await done.wait()
        return result[0]

    def _answer(self, error: str | None) -> None:
        waiting, self._republished = self._republished, []
        for done, result in waiting:
            result.append(error)
            done.set()


async def _either(a: trio.Event, b: trio.Event) -> None:
    """Until one of the two events is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, a)
        nursery.start_soon(wait, b)
