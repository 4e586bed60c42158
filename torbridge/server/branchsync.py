"""The git-annex branch of a balanced host meets the owner's (docs/scale-out.md).

Every gateway of a balanced service writes the location log of what it
relayed into its own repository; the client's records reach the git
owner through CONNECT. This task joins them:

* on a host with an owner remote (``[balance] owner_remote``): ``git
  fetch OWNER``, ``git annex merge`` (the owner's git-annex branch, and
  what other hosts pushed to it, join ours), ``git push OWNER
  git-annex:synced/git-annex``;
* on the owner: ``git annex merge`` takes in what the hosts pushed.

It runs every ``sync_interval`` seconds, and within a second after our
own location log wrote something. When our git-annex branch moved, the
location queries start afresh, so the next cluster request reads the
merged log. A failed sync is logged and tried again at the next turn.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import trio

from torbridge.annex.locationlog import LocationLog
from torbridge.annex.query import AnnexQuery

log = logging.getLogger("torbridge.branchsync")

SYNC_TIMEOUT = 300.0  # one git annex sync through Tor (first circuits can take a minute)
NUDGE_POLL = 1.0  # how often our own location log is looked at for new writes


@dataclass(eq=False)
class BranchSync:
    repository: Path
    interval: float
    socks: str  # for git-annex-p2p-torbridge (TORBRIDGE_SOCKS)
    owner_remote: str | None  # None: this host is the owner
    location_log: LocationLog
    query: AnnexQuery | None
    runs: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    last_error: str | None = field(default=None, init=False)

    def commands(self) -> list[list[str]]:
        merge = ["git", "annex", "merge", "--quiet"]
        if self.owner_remote is None:
            return [merge]
        # Not `git annex sync`: it does not push to a remote whose UUID is
        # the cluster's (the owner's endpoint announces the cluster).
        remote = self.owner_remote
        return [
            ["git", "fetch", "--quiet", "--", remote],  # the owner's refs, synced/* included
            merge,  # every */git-annex fetched joins ours
            ["git", "push", "--quiet", "--", remote, "git-annex:refs/heads/synced/git-annex"],
        ]

    async def run(self) -> None:
        written = self.location_log.written
        while True:
            deadline = trio.current_time() + self.interval
            # Soon after our own writes; otherwise every interval.
            while trio.current_time() < deadline:
                await trio.sleep(min(NUDGE_POLL, max(0.0, deadline - trio.current_time())))
                if self.location_log.written != written:
                    break
            written = self.location_log.written
            await self.once()

    async def once(self) -> bool:
        before = await self._branch()
        env = dict(os.environ, TORBRIDGE_SOCKS=self.socks)
        for argv in self.commands():
            try:
                with trio.fail_after(SYNC_TIMEOUT):
                    result = await trio.run_process(
                        argv,
                        cwd=self.repository,
                        env=env,
                        check=False,
                        stdin=subprocess.DEVNULL,
                        capture_stdout=True,
                        capture_stderr=True,
                    )
            except (OSError, trio.TooSlowError) as e:
                return self._failed(argv, str(e) or f"no end within {SYNC_TIMEOUT:.0f}s")
            if result.returncode != 0:
                text = (result.stderr or result.stdout).decode(errors="replace").strip()
                why = text.splitlines()[-1] if text else f"status {result.returncode}"
                return self._failed(argv, why)
        self.runs += 1
        self.last_error = None
        if await self._branch() != before and self.query is not None:
            await self.query.refresh()
        return True

    def _failed(self, argv: list[str], why: str) -> bool:
        self.failures += 1
        self.last_error = why
        log.warning("git-annex branch sync: %s failed: %s", " ".join(argv[:3]), why)
        return False

    async def _branch(self) -> str:
        result = await trio.run_process(
            ["git", "rev-parse", "--verify", "-q", "refs/heads/git-annex"],
            cwd=self.repository,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        return result.stdout.decode().strip()
