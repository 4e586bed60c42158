"""``torbridge demo``: the whole job on an embedded default, in one command.

It makes a demo proxy repository, serves it, and proves the path with a
stock git-annex client (link, copy, get, git fetch) before handing out an
address. Nothing outside the demo directory is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from torbridge.config import Config, Expose, Limits
from torbridge.server.daemon import StartupError, check_git_annex, serve
from torbridge.tokens import TokenStore

log = logging.getLogger("torbridge.demo")

_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "torbridge demo",
    "GIT_AUTHOR_EMAIL": "demo@torbridge.invalid",
    "GIT_COMMITTER_NAME": "torbridge demo",
    "GIT_COMMITTER_EMAIL": "demo@torbridge.invalid",
}


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proxy = root / "proxy"
        self.client = root / "client"
        self.bin = root / "bin"
        self.env = dict(os.environ, **_GIT_IDENTITY)
        # git fetch/push over p2p-annex:: needs this name; the PyPI wheel lacks it.
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *argv: str, cwd: Path, stdin: str | None = None) -> str:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise StartupError(f"`{' '.join(argv)}` failed: {result.stderr.strip()[-500:]}")
        return result.stdout

    def prepare(self) -> Config:
        self._link_remote_helper()
        if not self.proxy.exists():
            _say(f"creating the demo proxy repository in {self.proxy}")
            self.proxy.mkdir(parents=True)
            self.run("git", "init", "-q", "-b", "main", cwd=self.proxy)
            self.run("git", "annex", "init", "-q", "demo proxy", cwd=self.proxy)
            (self.proxy / "welcome.txt").write_text("served through torbridge\n")
            self.run("git", "annex", "add", "-q", "welcome.txt", cwd=self.proxy)
            self.run("git", "commit", "-q", "-m", "demo content", cwd=self.proxy)
        return Config(
            path=self.root / "torbridge.toml",
            repository=self.proxy,
            state_dir=self.root / "state",
            socket_dir=self.root / "sock",
            socket_mode=0o660,
            log_format="text",
            expose=(Expose("hub", ".", 5000),),
            limits=Limits(),
        )

    def _link_remote_helper(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        link = self.bin / "git-remote-p2p-annex"
        real = _multicall_binary()
        if real is not None and not link.exists():
            link.symlink_to(real)

    def self_check(self, address: str) -> None:
        """A stock client does the job through the bridge, or this raises."""
        if self.client.exists():
            shutil.rmtree(self.client)
        self.client.mkdir()
        self.run("git", "init", "-q", "-b", "main", cwd=self.client)
        self.run("git", "annex", "init", "-q", "demo client", cwd=self.client)
        _say("client: git annex p2p --link")
        self.run(
            "git",
            "annex",
            "p2p",
            "--link",
            "--name",
            "bridge",
            cwd=self.client,
            stdin=address + "\n",
        )
        _say("client: git fetch bridge")
        self.run("git", "fetch", "-q", "bridge", cwd=self.client)
        self.run("git", "merge", "-q", "bridge/main", cwd=self.client)
        _say("client: git annex get welcome.txt --from bridge")
        self.run("git", "annex", "get", "-q", "welcome.txt", "--from", "bridge", cwd=self.client)
        text = (self.client / "welcome.txt").read_text()
        if text != "served through torbridge\n":
            raise StartupError(f"got wrong content through the bridge: {text!r}")
        (self.client / "hello.txt").write_text("sent through torbridge\n")
        self.run("git", "annex", "add", "-q", "hello.txt", cwd=self.client)
        self.run("git", "commit", "-q", "-m", "hello", cwd=self.client)
        _say("client: git annex copy hello.txt --to bridge")
        self.run("git", "annex", "copy", "-q", "hello.txt", "--to", "bridge", cwd=self.client)
        _say("client: git annex fsck --from bridge")
        self.run("git", "annex", "fsck", "-q", "--from", "bridge", "hello.txt", cwd=self.client)


def _multicall_binary() -> Path | None:
    """The real git-annex binary, which dispatches on the name it is run as.

    The PyPI wheel puts a wrapper script on PATH and the binary in the package.
    """
    try:
        import git_annex
    except ImportError:
        found = shutil.which("git-annex")
        return Path(found).resolve() if found else None
    real = Path(git_annex.__file__).parent / "git-annex"
    return real if real.exists() else None


async def _demo(demo: Demo, config: Config, check_only: bool) -> None:
    tokens = TokenStore(config.state_dir)
    name = f"demo-{len(tokens.list()) + 1}"
    token = tokens.add(name, "rw")
    address = f"p2p-annex::torbridge:{config.socket_path(config.expose[0])}:{token}"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, config)
        _say(f"serving {config.repository} on {config.socket_path(config.expose[0])}")
        await trio.to_thread.run_sync(demo.self_check, address)
        _say("self-check passed: link, fetch, get, copy and fsck through the bridge")
        print(address, flush=True)
        _say("a client links with:  echo 'THE LINE ABOVE' | git annex p2p --link --name bridge")
        if check_only:
            nursery.cancel_scope.cancel()
            return
        _say("serving until Ctrl-C")
        await trio.sleep_forever()


def run_demo(directory: Path | None, check_only: bool = False) -> int:
    check_git_annex()
    root = directory or Path(tempfile.mkdtemp(prefix="torbridge-demo-"))
    demo = Demo(root.resolve())
    config = demo.prepare()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_demo, demo, config, check_only)
    return 0
