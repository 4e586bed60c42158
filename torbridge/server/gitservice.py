"""CONNECT: git upload-pack / receive-pack in the proxy's own repository.

git-annex's remotedaemon races git's exit against its last stdout chunk and
sometimes loses the tail of a pack. Here git's stdout is read to EOF, its
exit status awaited, and only then is exactly one CONNECTDONE sent.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import trio

from torbridge.protocol import messages as m
from torbridge.protocol.framing import EndOfStream
from torbridge.transport.framed import FramedStream, StreamLost
from torbridge.transport.process import StderrTail

log = logging.getLogger("torbridge.git")

CHUNK = 64 * 1024
SERVICES = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}


def pkt_line(text: str) -> bytes:
    payload = text.encode("utf-8", "replace")
    return b"%04x" % (len(payload) + 4) + payload


async def refuse_git_service(client: FramedStream, reason: str) -> None:
    """Make the client's git stop at once with "remote error: <reason>".

    A bare ERROR would leave git-remote-tor-annex waiting forever; an ERR
    pkt-line as the first thing git reads is git's own way to refuse.
    """
    packet = pkt_line(f"ERR {reason}\n")
    await client.send(m.Data(len(packet)))
    await client.send_body(packet)
    await client.send(m.ConnectDone(1))


async def run_git_service(
    client: FramedStream, repository: Path, service: str, idle_timeout: float
) -> int:
    """Relay one git service for the client; returns git's exit status."""
    argv = ["git", SERVICES[service], str(repository)]
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=repository,
        )
    except OSError as e:
        log.error("cannot run %s: %s", argv, e)
        await refuse_git_service(client, f"cannot run git: {e.strerror}")
        return 1
    assert process.stdin and process.stdout and process.stderr
    last_activity = trio.current_time()
    stopped = False  # by the watchdog
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
                    await process.stdin.send_all(chunk)
        except (StreamLost, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # git sees EOF and finishes or fails on its own
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()

    async def watchdog(cancel: trio.CancelScope) -> None:
        nonlocal stopped
        # Activity moves the deadline on; polling it beats an Event per chunk.
        while trio.current_time() - last_activity < idle_timeout:  # noqa: ASYNC110
            await trio.sleep_until(last_activity + idle_timeout)
        log.warning("%s idle for %.0fs, stopping it", service, idle_timeout)
        stopped = True
        cancel.cancel()

    stderr = StderrTail(service)
    code: int | None = None
    client_gone = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_to_git)
            nursery.start_soon(stderr.read, process.stderr)
            nursery.start_soon(watchdog, nursery.cancel_scope)
            try:
                while data := await process.stdout.receive_some(CHUNK):
                    last_activity = trio.current_time()
                    sending = True
                    await client.send(m.Data(len(data)))
                    await client.send_body(bytes(data))
                    sending = False
            except StreamLost as e:
                # The client went away (killed git fetch, lost circuit): git
                # is stopped below; there is nobody to send CONNECTDONE to.
                log.info("%s: client lost: %s", service, e)
                client_gone = True
                nursery.cancel_scope.cancel()
            else:
                # stdout is at EOF: every byte git wrote has been sent.
                code = await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdout.aclose()
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
        with trio.fail_after(idle_timeout):
            await client.send(m.ConnectDone(code))
    except StreamLost:
        log.info("%s: client gone before CONNECTDONE", service)
    except trio.TooSlowError:
        log.info("%s: client not reading CONNECTDONE, session ended", service)
    return code
