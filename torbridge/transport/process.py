"""Peers that are local programs speaking P2P on stdin/stdout.

``git-annex-shell p2pstdio`` serves the proxy's own repository (and, with
``--uuid``, the remotes git-annex itself can proxy); later the generic
``git-annex-p2p-NET`` programs run the same way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.cluster import deadline_kept_here
from torbridge.protocol.framing import LineEvent
from torbridge.protocol.permissions import Mode
from torbridge.protocol.versions import MAX_VERSION, Feature, supports, without
from torbridge.transport.base import (
    PeerChannel,
    PeerUnavailable,
    SessionInfo,
    StreamChannel,
    Transport,
    negotiate,
)
from torbridge.transport.framed import FramedStream

log = logging.getLogger("torbridge.transport")

EXIT_GRACE = 5.0  # seconds a peer program gets to exit after its stdin closes
STDERR_KEEP = 4096  # bytes of a peer program's stderr kept for error texts

# Pipes to a peer program hold this much (F_SETPIPE_SZ), not Linux's 64 KiB:
# a DATA body then moves in pieces of up to 256 KiB (the session's chunk)
# rather than 64 KiB ones, which cut the daemon's CPU for a big GET or PUT
# through a node by a third or more (bench/bench_nodes.py).
PIPE_SIZE = 256 * 1024
# The kernel counts pipe pages per user (fs.pipe-user-pages-soft, 16384 by
# default) and gives every new pipe of a user past it a single page, so only
# this many pipes are enlarged at once: 1/8 of that limit; the rest keep 64 KiB.
MAX_LARGE_PIPES = 32


class PipeBudget:
    """How many of our pipes are enlarged right now (one daemon, one trio thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def enlarge(self, fds: Sequence[int]) -> int:
        """Enlarge what the budget allows of ``fds``; how many were (release them later)."""
        done = 0
        for fd in fds:
            if self.used >= self.limit:
                break
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over the kernel's limits: the default size works too
                break
            self.used += 1
            done += 1
        return done

    def release(self, count: int) -> None:
        self.used -= count


PIPES = PipeBudget(MAX_LARGE_PIPES)

# A client UUID goes into an argv: only the shape git-annex makes, so that it
# can never be taken for an option or carry anything but a UUID.
_ARGV_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")


def argv_safe_uuid(uuid: str) -> bool:
    return _ARGV_UUID.fullmatch(uuid) is not None


class ProcessChannel(StreamChannel):
    """A StreamChannel whose stream is a child process's stdin/stdout."""

    def __init__(
        self,
        framed: FramedStream,
        uuid: str,
        version: int,
        process: trio.Process,
        large_pipes: int = 0,
    ) -> None:
        super().__init__(framed, uuid, version)
        self.process = process
        self.large_pipes = large_pipes  # released to PIPES on close

    async def aclose(self) -> None:
        large, self.large_pipes = self.large_pipes, 0
        try:
            await stop_process(self.process, self.framed)
        finally:
            PIPES.release(large)


async def stop_process(process: trio.Process, framed: FramedStream) -> None:
    """EOF on stdin is how a P2P program is told to finish; kill if it lingers."""
    with trio.CancelScope(shield=True):
        await framed.aclose()
        with trio.move_on_after(EXIT_GRACE):
            await process.wait()
            return
        log.warning("peer program %s did not exit, killing it", process.args)
        process.kill()
        await process.wait()


class StderrTail:
    """Keeps the end of a child's stderr for error messages, and logs it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = b""
        self.finished = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while chunk := await stream.receive_some(STDERR_KEEP):
                self.data = (self.data + chunk)[-STDERR_KEEP:]
                for line in chunk.decode("utf-8", "replace").splitlines():
                    log.debug("%s stderr: %s", self.name, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.finished.set()

    def text(self) -> str:
        lines = self.data.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""


async def open_process_channel(
    nursery: trio.Nursery,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    expected_uuid: str,
    version: int,
    bypass: tuple[str, ...],
    auth: m.Auth | None,
    cwd: Path | None = None,
) -> PeerChannel:
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
        )
    except OSError as e:
        raise PeerUnavailable(f"{name}: cannot run {argv[0]}: {e.strerror}") from e
    assert process.stdin and process.stdout and process.stderr
    pipes = (process.stdin, process.stdout)
    large = PIPES.enlarge([p.fileno() for p in pipes if isinstance(p, trio.lowlevel.FdStream)])
    framed = FramedStream(trio.StapledStream(process.stdin, process.stdout))
    stderr = StderrTail(name)
    nursery.start_soon(stderr.read, process.stderr)
    try:
        agreed = await negotiate(framed, name, expected_uuid, version, bypass, auth)
    except PeerUnavailable as e:
        await stop_process(process, framed)
        PIPES.release(large)
        with trio.move_on_after(1):
            await stderr.finished.wait()
        detail = stderr.text()
        raise PeerUnavailable(f"{e}: {detail}" if detail else str(e)) from None
    except BaseException:
        await stop_process(process, framed)
        PIPES.release(large)
        raise
    return ProcessChannel(framed, expected_uuid, agreed, process, large)


class SpecialRemoteChannel(PeerChannel):
    """A special remote that git-annex-shell proxies, with the clock it lacks.

    git-annex-shell proxying a special remote dies on GETTIMESTAMP and
    REMOVE-BEFORE (10.20261026: "thread blocked indefinitely in an STM
    transaction"), which a stock client sends to drop from it while another
    remote's lock proves the copies. A special remote has no clock to keep
    such a deadline by; the bridge, on the same host, keeps it: GETTIMESTAMP
    is answered with our monotonic clock, and ``REMOVE-BEFORE t`` becomes
    REMOVE while that clock is before ``t``, else FAILURE, as git-annex's
    own server decides it.
    """

    def __init__(self, inner: PeerChannel) -> None:
        self.inner = inner
        self.uuid = inner.uuid
        self.version = inner.version
        self._answers: deque[LineEvent] = deque()  # answered here, not by the peer

    async def send(self, message: m.Message) -> None:
        if isinstance(message, m.GetTimestamp):
            self._answers.append(m.Timestamp(int(time.monotonic())))
        elif isinstance(message, m.RemoveBefore):
            remove = deadline_kept_here(message, int(time.monotonic()))
            if remove is not None:
                await self.inner.send(remove)
            else:
                self._answers.append(m.Failure())
        else:
            await self.inner.send(message)

    async def receive_event(self) -> LineEvent:
        if self._answers:
            return self._answers.popleft()
        return await self.inner.receive_event()

    async def send_body(self, data: bytes) -> None:
        await self.inner.send_body(data)

    async def receive_body(self, max_bytes: int) -> bytes:
        return await self.inner.receive_body(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def framed_stream(self) -> FramedStream | None:
        return self.inner.framed_stream()


class AnnexShellTransport(Transport):
    """A repository served by ``git-annex-shell p2pstdio`` on this host.

    git-annex does the storage, content locking and drop safety; the bridge
    only relays. The token's mode is passed down as a second wall.
    """

    def __init__(
        self,
        name: str,
        repository: Path,
        uuid: str,
        target: str | None = None,
        special: bool = False,
    ) -> None:
        self.name = name
        self.repository = repository
        self.uuid = uuid
        self.target = target  # --uuid: a remote git-annex proxies for us
        self.special = special  # that remote is a special remote

    async def open(
        self,
        nursery: trio.Nursery,
        session: SessionInfo,
        version: int,
        bypass: tuple[str, ...],
    ) -> PeerChannel:
        if not argv_safe_uuid(session.client_uuid):
            raise PeerUnavailable(f"{self.name}: client UUID is not a UUID")
        argv = ["git-annex-shell", "p2pstdio", str(self.repository), session.client_uuid]
        if self.target is not None:
            argv += ["--uuid", self.target]
        env = dict(os.environ)
        env.pop("GIT_ANNEX_SHELL_READONLY", None)
        env.pop("GIT_ANNEX_SHELL_APPENDONLY", None)
        if session.mode is Mode.READ_ONLY:
            env["GIT_ANNEX_SHELL_READONLY"] = "1"
        elif session.mode is Mode.APPEND_ONLY:
            env["GIT_ANNEX_SHELL_APPENDONLY"] = "1"
        if not self.special:
            channel = await open_process_channel(
                nursery, self.name, argv, env, self.uuid, version, bypass, auth=None
            )
            if self.target is None:
                self._learn_max_version(version, channel.version)
            return channel
        # At version 1 (VALID, but not yet what version 2 brings)
        # git-annex-shell takes the VALID after a PUT's body for the next
        # request and dies; below VALID's version there is none to send.
        if supports(version, Feature.VALIDITY) and not supports(version, Feature.PLUS):
            version = without(version, Feature.VALIDITY)
        channel = await open_process_channel(
            nursery, self.name, argv, env, self.uuid, version, bypass, auth=None
        )
        return SpecialRemoteChannel(channel)

    def _learn_max_version(self, asked: int, agreed: int) -> None:
        """What git-annex-shell serving its own repository agrees to, learnt once.

        It answers VERSION n with min(n, its maximum) (P2P/Protocol.hs), at
        any time and for anyone; so after one answer below what was asked,
        or of our own maximum, every later VERSION can be answered without
        starting it. Not for --uuid: a proxied remote's answer is the
        remote's, and can change with it.
        """
        if agreed < asked or agreed == MAX_VERSION:
            self.known_max_version = agreed
