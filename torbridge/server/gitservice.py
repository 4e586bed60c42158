"""CONNECT: git upload-pack / receive-pack in the proxy's own repository.

git-annex's remotedaemon races git's exit against its last stdout chunk and
sometimes loses the tail of a pack. Here git's stdout is read to EOF, its
exit status awaited, and only then is exactly one CONNECTDONE sent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream
from torbridge.protocol.pktline import PktStream, pkt_line
from torbridge.server import pushguard
from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.process import StderrTail

log = logging.getLogger("torbridge.git")

CHUNK = 64 * 1024
# After its pipes are closed, seconds git has to finish on its own before it
# is killed. It reads EOF and its next write fails (keepalives come every 5 s
# in its long phases): it stops within moments, its cleanup done.
GIT_EXIT_GRACE = 60.0
# How often the CONNECT watchdog looks at whose turn it is (seconds).
WATCHDOG_STEP = 0.5
# Seconds to read what git still says on stderr, once it has exited.
STDERR_AFTER_EXIT = 1.0
SERVICES = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}


def exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


async def refuse_git_service(client: FramedStream, reason: str) -> None:
    """Make the client's git stop at once with "remote error: <reason>".

    A bare ERROR would leave git-remote-tor-annex waiting forever; an ERR
    pkt-line as the first thing git reads is git's own way to refuse.
    """
    packet = pkt_line(f"ERR {reason}\n")
    await client.send(m.Data(len(packet)))
    await client.send_body(packet)
    await client.send(m.ConnectDone(1))


async def end_git(process: trio.Process, service: str, grace: float = GIT_EXIT_GRACE) -> None:
    """Close git's pipes and wait for it, as git-annex does; kill it only after ``grace``.

    git reads EOF, and its next write fails: it stops on its own, and its
    own cleanup removes what it holds, ref ``.lock`` files and incoming
    objects among them. SIGKILL at once would leave them behind, and a
    ref's ``.lock`` fails every later push to that ref.
    """
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await pipe.aclose()
    with trio.move_on_after(grace):
        await process.wait()
    if process.returncode is None:
        log.warning("%s still running %.0fs after its pipes were closed: killed", service, grace)
        process.kill()
        await process.wait()


async def run_git_service(
    client: FramedStream,
    repository: Path,
    service: str,
    idle_timeout: float,
    guard_history: bool = True,
    stall_timeout: float = math.inf,
) -> int:
    """Relay one git service for the client; returns git's exit status.

    Two deadlines, both the client's: ``stall_timeout`` for a client that
    stops reading what git sends, ``idle_timeout`` for silence on both
    sides. git is never silent that long while it works (it sends
    keepalives every few seconds), but a client is while its own git
    prepares a big pack: that is client silence, as between requests.

    ``guard_history``: a push may not rewrite or delete a protected branch
    (server/pushguard.py); upload-pack is never affected.
    """
    if service != "git-receive-pack" or not guard_history:
        return await _run_git_service(
            client, repository, service, idle_timeout, stall_timeout, None
        )
    try:
        hooks = await trio.to_thread.run_sync(pushguard.prepare, repository)
    except (OSError, pushguard.GuardError) as e:
        log.error("cannot set up the push guard: %s", e)
        await refuse_git_service(client, "torbridge cannot check this push; refused")
        return 1
    try:
        env = pushguard.git_config_env(hooks, os.environ)
        return await _run_git_service(client, repository, service, idle_timeout, stall_timeout, env)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pushguard.remove, hooks)


async def _run_git_service(
    client: FramedStream,
    repository: Path,
    service: str,
    idle_timeout: float,
    stall_timeout: float,
    env: Mapping[str, str] | None,
) -> int:
    argv = ["git", SERVICES[service], str(repository)]
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=repository,
            env=env,
        )
    except OSError as e:
        log.error("cannot run %s: %s", argv, e)
        await refuse_git_service(client, f"cannot run git: {e.strerror}")
        return 1
    assert process.stdin and process.stdout and process.stderr
    last_activity = trio.current_time()
    stopped = False  # by the watchdog
    send_started = 0.0  # when the send to the client under way began
    packets = PktStream()  # git's output, as the client has it
    sending = False  # to the client, right now

    async def client_to_git() -> None:
        nonlocal last_activity
        assert process.stdin
        try:
            while True:
                event = await client.receive_event()
                if not isinstance(event, m.Data):
                    if not isinstance(event, (m.ConnectDone, EndOfStream)):
                        log.warning("client sent %r during CONNECT", event)
                    break
                while client.body_remaining:
                    chunk = await client.receive_body(CHUNK)
                    last_activity = trio.current_time()
                    if service == "git-receive-pack":
                        packets.client_wrote(chunk)
                    await process.stdin.send_all(chunk)
        except (StreamLost, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # git sees EOF and finishes or fails on its own
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()

    async def watchdog(cancel: trio.CancelScope) -> None:
        nonlocal stopped
        # Activity moves the deadlines on; polling them beats an Event per chunk.
        while True:
            if sending:
                limit, since, why = stall_timeout, send_started, "client not reading for"
            else:
                limit, since, why = idle_timeout, last_activity, "idle for"
            now = trio.current_time()
            if now >= since + limit:
                break
            await trio.sleep_until(min(since + limit, now + WATCHDOG_STEP))
        log.warning("%s %s %.0fs, stopping it", service, why, limit)
        stopped = True
        cancel.cancel()

    stderr = StderrTail(service)
    code: int | None = None
    client_gone = False
    async with trio.open_nursery() as outer:
        # git's stderr is read until git is done, whatever ends the relay.
        outer.start_soon(stderr.read, process.stderr)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_to_git)
                nursery.start_soon(watchdog, nursery.cancel_scope)
                try:
                    while data := await process.stdout.receive_some(CHUNK):
                        last_activity = trio.current_time()
                        sending, send_started = True, trio.current_time()
                        await client.send(m.Data(len(data)))
                        await client.send_body(bytes(data))
                        sending = False
                        packets.feed(bytes(data))
                except StreamLost as e:
                    # The client went away (killed git push, lost circuit): git
                    # is let finish below; there is nobody to send CONNECTDONE to.
                    log.info("%s: client lost: %s", service, e)
                    client_gone = True
                    nursery.cancel_scope.cancel()
                else:
                    # stdout is at EOF: every byte git wrote has been sent.
                    code = await process.wait()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await end_git(process, service)
                with trio.move_on_after(STDERR_AFTER_EXIT):
                    await stderr.finished.wait()  # (a hook git left may hold it open)
            outer.cancel_scope.cancel()
    if client_gone or stopped:
        assert process.returncode is not None
        ended = exit_text(process.returncode)
        log.info("git %s %s after its client left", SERVICES[service], ended)
    if client_gone:
        return 1
    if stopped and sending:
        # The client stopped reading (it is frozen, or its circuit is): it
        # is cut off mid-DATA, and nothing more can be said to it.
        log.info("%s: client not reading, session ended", service)
        return 1
    if code is None:  # stopped by the watchdog: git's output is incomplete
        code = 1
    if code:
        log.info("%s exited %d: %s", service, code, stderr.text())
    try:
        # The client may have stopped reading too: this wait is bounded as well.
        with trio.fail_after(min(idle_timeout, stall_timeout)):
            if code:
                tail = packets.failure_tail(f"torbridge: git {SERVICES[service]} {exit_text(code)}")
                await client.send(m.Data(len(tail)))
                await client.send_body(tail)
            await client.send(m.ConnectDone(code))
    except StreamLost:
        log.info("%s: client gone before CONNECTDONE", service)
    except trio.TooSlowError:
        log.info("%s: client not reading CONNECTDONE, session ended", service)
    return code
