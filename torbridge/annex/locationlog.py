"""The proxy's location log learns what the relay saw, off the data path.

Sessions drop ``(key, uuid, present)`` records into a bounded channel and
never wait; one task feeds them to ``git annex setpresentkey --batch`` in
the proxy repository, so git-annex writes its own log format.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import trio

from torbridge.protocol.fields import is_valid_key

log = logging.getLogger("torbridge.locationlog")

QUEUE = 10_000
RESTART_DELAY = 5.0
ACK_TIMEOUT = 60.0


class LocationLog:
    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._send, self._receive = trio.open_memory_channel[tuple[str, str, bool]](QUEUE)
        self.written = 0
        self.dropped = 0
        # Records queued / finished (written and acknowledged, or given up):
        # a reader of the location log waits until what was queued before it
        # is in (``settled``), so a GET right after a PUT finds the node.
        self._queued = 0
        self._finished = 0
        self._changed = trio.Event()

    def record(self, key: str, uuid: str, present: bool) -> None:
        """Never blocks; a record that does not fit is lost and counted."""
        if not is_valid_key(key) or not uuid or any(c.isspace() for c in uuid):
            return  # setpresentkey --batch stops at the first line it cannot parse
        try:
            self._send.send_nowait((key, uuid, present))
            self._queued += 1
        except trio.WouldBlock:
            self.dropped += 1
            log.warning("location log queue full: %s not recorded for %s", key, uuid)

    def _finish(self, count: int = 1) -> None:
        self._finished += count
        self._changed.set()
        self._changed = trio.Event()

    async def settled(self) -> None:
        """Wait until every record queued so far is written (or given up)."""
        target = self._queued
        while self._finished < target:
            await self._changed.wait()

    async def run(self) -> None:
        """Feed records to git-annex until cancelled; restart it if it dies."""
        while True:
            first = await self._receive.receive()
            if not await self._batch(first):
                await trio.sleep(RESTART_DELAY)

    async def flush(self) -> None:
        """Write what is still queued (at shutdown, after ``run`` was cancelled)."""
        lines = []
        while True:
            try:
                key, uuid, present = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            lines.append(f"{key} {uuid} {1 if present else 0}\n")
        if not lines:
            return
        self._finish(len(lines))
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            await trio.run_process(
                ["git", "annex", "setpresentkey", "--batch"],
                cwd=self.repository,
                stdin="".join(lines).encode("utf-8", "surrogateescape"),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            self.written += len(lines)

    async def _batch(self, first: tuple[str, str, bool]) -> bool:
        process = await trio.lowlevel.open_process(
            ["git", "annex", "setpresentkey", "--batch"],
            cwd=self.repository,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdin is not None and process.stdout is not None
        record: tuple[str, str, bool] | None = first
        replies = bytearray()
        try:
            while record is not None:
                key, uuid, present = record
                line = f"{key} {uuid} {1 if present else 0}\n"
                try:
                    await process.stdin.send_all(line.encode("utf-8", "surrogateescape"))
                    # One line of output per record, once it is in the journal.
                    with trio.fail_after(ACK_TIMEOUT):
                        while b"\n" not in replies:
                            data = await process.stdout.receive_some(4096)
                            if not data:
                                raise trio.BrokenResourceError("setpresentkey exited")
                            replies += data
                except trio.TooSlowError:
                    log.error("git annex setpresentkey did not answer; will restart")
                    return False
                finally:
                    self._finish()
                del replies[: replies.index(b"\n") + 1]
                self.written += 1
                # Idle for a while: let git-annex finish and commit its journal.
                with trio.move_on_after(2.0):
                    record = await self._receive.receive()
                    continue
                record = None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.error("git annex setpresentkey exited early; will restart")
            return False
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
                await process.stdout.aclose()
                with trio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        return True
