"""What git-annex knows of the proxy repository, asked of git-annex itself.

A cluster gateway picks nodes by the location log and by each node's
preferred content. Both are git-annex's formats and rules, so git-annex
answers: one long-running ``git annex whereis --batch-keys --json`` for
locations (it reads the journal on every query, so it sees what was
recorded a moment ago by any process), and ``git annex wanted`` /
``matchexpression`` for preferred content.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import trio

from torbridge.protocol.messages import is_valid_key
from torbridge.server.locationlog import LocationLog

log = logging.getLogger("torbridge.annexquery")

QUERY_TIMEOUT = 60.0
WANTED_TTL = 10.0  # seconds a node's preferred content expression is reused
_MATCH_NEEDS_DATA = 42  # matchexpression: "cannot match this expression without ..."


class QueryError(Exception):
    """git-annex could not be asked; the text says why."""


class AnnexQuery:
    def __init__(self, repository: Path, location_log: LocationLog | None = None) -> None:
        self.repository = repository
        self.location_log = location_log  # its pending writes are waited for first
        self._lock = trio.Lock()
        self._whereis: trio.Process | None = None
        self._buffer = bytearray()
        self._wanted: dict[str, tuple[float, str]] = {}

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

    async def aclose(self) -> None:
        async with self._lock:
            await self._stop()

    # --- preferred content -------------------------------------------------------------

    async def wants(self, remote: str, key: str, af: str | None) -> bool:
        """Whether remote ``remote``'s preferred content wants ``key``.

        An unset expression wants everything, as git-annex's gateway treats it.
        An expression git-annex cannot decide without more data than a key and
        a file name counts as wanting it: a copy too many is safe, a copy too
        few is not.
        """
        expression = await self._expression(remote)
        if expression in ("", "anything"):
            return True
        if expression == "nothing":
            return False
        argv = ["git", "annex", "matchexpression", f"--key={key}"]
        if af:
            argv.append(f"--file={af}")
        argv += ["--", expression]
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                done = await trio.run_process(
                    argv, cwd=self.repository, capture_stdout=True, capture_stderr=True,
                    check=False,
                )
        except (trio.TooSlowError, OSError) as e:
            log.warning("preferred content of %s not known (%s): sending it anyway", remote, e)
            return True
        if done.returncode in (0, 1):
            return done.returncode == 0
        if done.returncode != _MATCH_NEEDS_DATA:
            log.warning(
                "preferred content of %s (%r) not decided: %s", remote, expression,
                done.stderr.decode("utf-8", "replace").strip()[:200],
            )
        return True

    async def _expression(self, remote: str) -> str:
        now = trio.current_time()
        cached = self._wanted.get(remote)
        if cached is not None and now - cached[0] < WANTED_TTL:
            return cached[1]
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                done = await trio.run_process(
                    ["git", "annex", "wanted", remote], cwd=self.repository,
                    capture_stdout=True, capture_stderr=True, check=False,
                )
        except (trio.TooSlowError, OSError) as e:
            log.warning("git annex wanted %s failed: %s", remote, e)
            return ""
        expression = done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else ""
        self._wanted[remote] = (now, expression)
        return expression
