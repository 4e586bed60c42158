"""Helpers of the ops tier (doctor, init, onion wait): plain git without
git-annex's test environment, a tor-annex remote as ``git annex p2p --link``
leaves it (no network), and a fake tor control port (just enough for stem).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

from torbridge.annex.remotes import creds_escape

GITCONFIG = """\
[user]
\tname = torbridge ops tests
\temail = ops@torbridge.invalid
[init]
\tdefaultBranch = main
[annex]
\tautocommit = false
"""

ONION = "a" * 56 + ".onion"  # a syntactically valid v3 onion; nothing connects to it
TOKEN = "0123456789abcdef" * 8


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def add_tor_remote(repo: Path, name: str, *, token: str | None = TOKEN, proxy: bool = True) -> None:
    """A linked tor-annex remote, as `git annex p2p --link` leaves it (no network)."""
    git(repo, "remote", "add", name, f"tor-annex::{ONION}:5000")
    git(repo, "config", f"remote.{name}.annex-uuid", "5f4e3d2c-0000-4000-8000-00000000beef")
    if proxy:
        git(repo, "config", f"remote.{name}.annex-proxy", "true")
    if token is not None:
        creds = repo / ".git" / "annex" / "creds"
        creds.mkdir(parents=True, exist_ok=True)
        (creds / creds_escape(ONION)).write_text(token + "\n")


# --- a fake tor control port -------------------------------------------------------


class FakeTor:
    """Just enough of tor's control protocol for stem to connect and authenticate.

    ``auth``: "NULL" (no authentication), "HASHEDPASSWORD", or "silent" (accept
    connections and never answer).
    """

    def __init__(
        self,
        path: Path,
        auth: str = "NULL",
        version: str = "0.4.8.10",
        consensus_at: float | None = None,
    ) -> None:
        self.path = path
        self.auth = auth
        self.version = version
        # when the consensus it reports was made (None: it has none)
        self.consensus_at = consensus_at
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            if self.auth != "silent":
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        replies = {
            "PROTOCOLINFO": (
                f"250-PROTOCOLINFO 1\r\n250-AUTH METHODS={self.auth}\r\n"
                f'250-VERSION Tor="{self.version}"\r\n250 OK\r\n'
            ),
            "AUTHENTICATE": "250 OK\r\n",
            "GETINFO version": f"250-version={self.version}\r\n250 OK\r\n",
            "QUIT": "250 closing connection\r\n",
        }
        with conn, conn.makefile("rb") as lines:
            for raw in lines:
                line = raw.decode().strip()
                if self.consensus_at is not None:
                    after = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.consensus_at))
                    until = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.gmtime(self.consensus_at + 3 * 3600)
                    )
                    replies["GETINFO consensus/valid-after"] = (
                        f"250-consensus/valid-after={after}\r\n250 OK\r\n"
                    )
                    replies["GETINFO consensus/valid-until"] = (
                        f"250-consensus/valid-until={until}\r\n250 OK\r\n"
                    )
                reply = next(
                    (r for cmd, r in replies.items() if line.startswith(cmd)),
                    "552 Unrecognized key\r\n" if line.startswith("GETINFO") else "250 OK\r\n",
                )
                try:
                    conn.sendall(reply.encode())
                except OSError:
                    return
                if line.startswith("QUIT"):
                    return

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()
        self.thread.join(5)
