"""The P2P protocol by hand, for wire-level tests: a blocking client
(:class:`RawSession`) and a trio one (:class:`AsyncSession`, a thread per
connection would not scale to the load tests' thousands).

Unix sockets only; every read has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from tests.harness.load import Obj, Stats


class SessionClosed(EOFError):
    """The peer closed the connection."""


class RawSession:
    """A blocking unix-socket client speaking the P2P protocol by hand."""

    def __init__(self, path: Path | str, connect_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        self.sock.connect(self.path)
        self.buf = bytearray()
        self.eof = False
        self.client_uuid = str(uuid.uuid4())

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # sending
    def send_raw(self, data: bytes, *, may_close: bool = False) -> None:
        """Send bytes; with ``may_close`` the daemon hanging up meanwhile is fine."""
        self.sock.settimeout(30.0)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if not may_close:
                raise

    def send_line(self, line: str | bytes) -> None:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send_raw(data + b"\n")

    def send_data(self, payload: bytes) -> None:
        """``DATA n`` and the payload in one write."""
        self.send_raw(b"DATA %d\n" % len(payload) + payload)

    # receiving
    def _fill(self, deadline: float) -> None:
        """Receive at least one more chunk or raise."""
        if self.eof:
            raise SessionClosed("connection closed by the daemon")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the daemon in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            raise TimeoutError("no data from the daemon in time") from None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise SessionClosed("connection closed by the daemon")
        self.buf += chunk

    def read_line(self, timeout: float = 10.0) -> str:
        """The next line, without ``\\n`` (and ``\\r``), decoded as UTF-8."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line.rstrip(b"\r").decode("utf-8", errors="replace")
            try:
                self._fill(deadline)
            except SessionClosed:
                if self.buf:
                    raise SessionClosed(
                        f"connection closed after a partial line {bytes(self.buf)[:200]!r}"
                    ) from None
                raise

    def read_exact(self, n: int, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_data(self, timeout: float = 30.0) -> bytes:
        """A ``DATA n`` line and its n bytes."""
        line = self.read_line(timeout)
        m = re.fullmatch(r"DATA (\d+)", line)
        assert m, f"expected DATA n, got {line!r}"
        return self.read_exact(int(m.group(1)), timeout)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` for the daemon to close; True if it did.

        Data that arrives meanwhile is kept in the buffer (readable later).
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            try:
                self._fill(deadline)
            except SessionClosed:
                return True
            except TimeoutError:
                return False
        return True

    def assert_closed(self, timeout: float = 5.0) -> None:
        assert self.is_closed(timeout), (
            f"the daemon kept the connection open for {timeout}s "
            f"(unread: {bytes(self.buf)[:200]!r})"
        )

    def pending(self, wait: float = 0.0) -> bytes:
        """Whatever has arrived (after waiting up to ``wait`` s), without blocking."""
        end = time.monotonic() + wait
        while True:
            r, _, _ = select.select([self.sock], [], [], max(0.0, end - time.monotonic()))
            if not r:
                break
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        data = bytes(self.buf)
        self.buf.clear()
        return data

    # protocol steps
    def auth(self, token: str, server_uuid: str | None = None) -> str:
        """``AUTH clientuuid token``; returns the reply line."""
        self.send_line(f"AUTH {self.client_uuid} {token}")
        reply = self.read_line()
        if server_uuid is not None:
            assert reply == f"AUTH-SUCCESS {server_uuid}", f"AUTH answered {reply!r}"
        return reply

    def version(self, n: int = 4) -> str:
        self.send_line(f"VERSION {n}")
        return self.read_line()

    def expect(self, want: str, timeout: float = 10.0) -> None:
        got = self.read_line(timeout)
        assert got == want, f"expected {want!r}, got {got!r}"


# --- the wire, with trio ------------------------------------------------------------


class ProtocolMismatch(AssertionError):
    """The daemon answered something else than expected."""


CONNECT_RETRY = 0.01  # seconds between attempts while the listen backlog is full


async def connect_unix(
    path: Path | str, seconds: float = 30.0, stats: Stats | None = None
) -> trio.SocketStream:
    """Connect to a unix socket; retries (for up to ``seconds``) while its backlog is full.

    A non-blocking AF_UNIX connect fails with EAGAIN instead of waiting when
    the listener's backlog is full; this is retried rather than reported.
    """
    deadline = time.monotonic() + seconds
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"backlog of {path} full for {seconds}s") from None
            if stats is not None:
                stats.connect_retries += 1
            await trio.sleep(CONNECT_RETRY)
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class AsyncSession:
    """The P2P protocol by hand over one trio stream; every read has a deadline."""

    def __init__(self, stream: trio.SocketStream, reply_timeout: float = 30.0) -> None:
        self.stream = stream
        self.reply_timeout = reply_timeout  # default deadline of every read
        self.buf = bytearray()
        self.eof = False
        self.client_uuid = str(uuid.uuid4())

    @classmethod
    async def open(
        cls,
        path: Path | str,
        seconds: float = 30.0,
        stats: Stats | None = None,
        reply_timeout: float = 30.0,
    ) -> AsyncSession:
        return cls(await connect_unix(path, seconds, stats), reply_timeout)

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as e:
            raise SessionClosed(f"send failed: {e.__cause__ or e}") from None

    async def send_line(self, line: str) -> None:
        await self.send(line.encode() + b"\n")

    async def _fill(self) -> None:
        if self.eof:
            raise SessionClosed("connection closed by the daemon")
        try:
            chunk = await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise SessionClosed(
                "connection closed by the daemon"
                + (f" after {bytes(self.buf)[:100]!r}" if self.buf else "")
            )
        self.buf += chunk

    async def read_line(self, seconds: float | None = None) -> str:
        with trio.fail_after(self.reply_timeout if seconds is None else seconds):
            while (nl := self.buf.find(b"\n")) < 0:
                await self._fill()
        line = bytes(self.buf[:nl])
        del self.buf[: nl + 1]
        return line.rstrip(b"\r").decode("utf-8", errors="replace")

    async def read_exact(self, n: int, seconds: float | None = None) -> bytes:
        with trio.fail_after(self.reply_timeout if seconds is None else seconds):
            while len(self.buf) < n:
                await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def expect(self, want: str, seconds: float | None = None) -> None:
        got = await self.read_line(seconds)
        if got != want:
            raise ProtocolMismatch(f"expected {want!r}, got {got!r}")

    async def wait_closed(self, seconds: float) -> bool:
        """Read (and drop) until the daemon closes; False if it did not within ``seconds``."""
        with trio.move_on_after(seconds):
            try:
                while True:
                    await self._fill()
                    self.buf.clear()
            except SessionClosed:
                return True
        return False

    # protocol steps
    async def auth(self, token: str, server_uuid: str, seconds: float | None = None) -> None:
        await self.send_line(f"AUTH {self.client_uuid} {token}")
        await self.expect(f"AUTH-SUCCESS {server_uuid}", seconds)

    async def version(self, seconds: float | None = None) -> None:
        await self.send_line("VERSION 4")
        await self.expect("VERSION 4", seconds)

    async def checkpresent(self, key: str, present: bool) -> None:
        await self.send_line(f"CHECKPRESENT {key}")
        await self.expect("SUCCESS" if present else "FAILURE")

    async def get(self, obj: Obj, af: str = "file.bin") -> None:
        await self.send_line(f"GET 0 {af} {obj.key}")
        line = await self.read_line()
        m = re.fullmatch(r"DATA (\d+)", line)
        if not m:
            raise ProtocolMismatch(f"GET: expected DATA n, got {line!r}")
        data = await self.read_exact(int(m.group(1)))
        if data != obj.content:
            raise ProtocolMismatch(f"GET {obj.key}: {len(data)} bytes differ from the object")
        await self.expect("VALID")
        await self.send_line("SUCCESS")

    async def put(self, obj: Obj, af: str = "new.bin") -> None:
        await self.send_line(f"PUT {af} {obj.key}")
        await self.expect("PUT-FROM 0")
        await self.send(b"DATA %d\n" % len(obj.content) + obj.content + b"VALID\n")
        await self.expect("SUCCESS")
