"""What git-annex knows of the proxy repository, asked of git-annex itself.

A cluster gateway picks nodes by the location log and by each node's
preferred content. Both are git-annex's formats and rules, so git-annex
answers: one long-running ``git annex whereis --batch-keys --json`` for
locations (it reads the journal on every query, so it sees what was
recorded a moment ago by any process), and ``git annex find
--want-get-by`` for preferred content (annex/preferred.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from torbridge.annex.locationlog import LocationLog
from torbridge.annex.preferred import PreferredContent
from torbridge.protocol.fields import is_valid_key

log = logging.getLogger("torbridge.annexquery")

QUERY_TIMEOUT = 60.0


class QueryError(Exception):
    """git-annex could not be asked; the text says why."""


class AnnexQuery:
    def __init__(
        self,
        repository: Path,
        location_log: LocationLog | None = None,
        scratch_parent: Path | None = None,
    ) -> None:
        self.repository = repository
        self.location_log = location_log  # its pending writes are waited for first
        self._lock = trio.Lock()
        self._whereis: trio.Process | None = None
        self._buffer = bytearray()
        # Its scratch work trees go under scratch_parent (the system's temp dir if None).
        self.preferred = PreferredContent(repository, scratch_parent)

    # --- locations -------------------------------------------------------------------

    async def locations(self, key: str) -> frozenset[str]:
        """Every repository the location log says has ``key`` (clusters included)."""
        if not is_valid_key(key):
            raise QueryError(f"not a key: {key!r}")
        if self.location_log is not None:
            with trio.move_on_after(QUERY_TIMEOUT):
                await self.location_log.settled()
        async with self._lock:
            try:
                with trio.fail_after(QUERY_TIMEOUT):
                    line = await self._ask(key)
            except (trio.TooSlowError, OSError, trio.BrokenResourceError) as e:
                await self._stop()
                raise QueryError(f"git annex whereis failed: {e or 'no answer'}") from None
        if not line.strip():
            return frozenset()  # a key git-annex knows nothing of
        try:
            answer = json.loads(line)
            found = [*answer.get("whereis", []), *answer.get("untrusted", [])]
            return frozenset(str(entry["uuid"]) for entry in found)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise QueryError(f"git annex whereis answered {line[:200]!r}: {e}") from None

    async def _ask(self, key: str) -> str:
        if self._whereis is None or self._whereis.returncode is not None:
            self._buffer.clear()
            self._whereis = await trio.lowlevel.open_process(
                ["git", "annex", "whereis", "--batch-keys", "--json"],
                cwd=self.repository,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        process = self._whereis
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send_all(key.encode("utf-8", "surrogateescape") + b"\n")
        while (end := self._buffer.find(b"\n")) < 0:
            data = await process.stdout.receive_some(65536)
            if not data:
                raise OSError("git annex whereis exited")
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line.decode("utf-8", "replace")

    async def _stop(self) -> None:
        process, self._whereis = self._whereis, None
        if process is not None:
            with trio.CancelScope(shield=True):
                if process.stdin is not None:
                    await process.stdin.aclose()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    async def refresh(self) -> None:
        """Ask a new git-annex next time: the git-annex branch moved under
        the running one (a merge from another host, server/branchsync.py)."""
        async with self._lock:
            await self._stop()

    async def aclose(self) -> None:
        async with self._lock:
            await self._stop()
        self.preferred.close()

    # --- preferred content -------------------------------------------------------------

    async def wanted(self, remotes: Sequence[str], key: str, af: str | None) -> dict[str, bool]:
        """Whether each remote's preferred content wants ``key`` (annex/preferred.py)."""
        return await self.preferred.wanted(remotes, key, af)
