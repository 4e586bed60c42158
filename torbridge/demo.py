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
from dataclasses import replace
from pathlib import Path

import trio

from torbridge.annex.host import StartupError, check_git_annex
from torbridge.config import Config, Expose, Limits, Tor
from torbridge.server.daemon import serve
from torbridge.tokens import TokenStore
from torbridge.tor.onion import stored_onion

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

    def run(
        self, *argv: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> str:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=dict(self.env, **(env or {})),
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

    def self_check(self, address: str, remote: str, env: dict[str, str] | None = None) -> None:
        """A stock client does the whole job through the bridge, or this raises."""
        first = not self.client.exists()
        if first:
            self.client.mkdir()
            self.run("git", "init", "-q", "-b", "main", cwd=self.client)
            self.run("git", "annex", "init", "-q", "demo client", cwd=self.client)

        def client(*argv: str, stdin: str | None = None) -> None:
            _say(f"client: {' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''}")
            self.run(*argv, cwd=self.client, stdin=stdin, env=env)

        client("git", "annex", "p2p", "--link", "--name", remote, stdin=address + "\n")
        client("git", "fetch", "-q", remote)
        if first:
            client("git", "merge", "-q", f"{remote}/main")
        else:
            client("git", "annex", "drop", "-q", "--force", "welcome.txt")
        client("git", "annex", "get", "-q", "welcome.txt", "--from", remote)
        text = (self.client / "welcome.txt").read_text()
        if text != "served through torbridge\n":
            raise StartupError(f"got wrong content through the bridge: {text!r}")
        name = f"hello-{remote}.txt"
        (self.client / name).write_text(f"sent through torbridge ({remote})\n")
        client("git", "annex", "add", "-q", name)
        client("git", "commit", "-q", "-m", name)
        client("git", "annex", "copy", "-q", name, "--to", remote)
        client("git", "annex", "fsck", "-q", "--from", remote, name)


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


async def _demo(demo: Demo, config: Config, check_only: bool, tor_socks: str | None) -> None:
    tokens = TokenStore(config.state_dir)
    token = tokens.add(f"demo-{len(tokens.list()) + 1}", "rw")
    expose = config.expose[0]
    local = f"p2p-annex::torbridge:{config.socket_path(expose)}:{token}"
    async with trio.open_nursery() as nursery:
        if tor_socks:
            _say("publishing the demo repository on an onion service...")
        await nursery.start(serve, config)
        onion = stored_onion(config.state_dir) if tor_socks else None
        _say(f"serving {config.repository} on {config.socket_path(expose)}")
        if onion:
            _say(f"and on the onion {onion}, port {expose.port}")
        await trio.to_thread.run_sync(demo.self_check, local, "bridge")
        _say("self-check passed on the local socket: link, fetch, get, copy, fsck")
        lines = [local]
        if onion and tor_socks:
            over_tor = f"p2p-annex::torbridge:{onion}:{expose.port}:{token}"
            await trio.to_thread.run_sync(
                demo.self_check, over_tor, "bridge-tor", {"TORBRIDGE_SOCKS": tor_socks}
            )
            _say("self-check passed over Tor: the same, through the bridge's onion")
            lines = [f"tor-annex::{onion}:{expose.port}:{token}", over_tor, local]
        for line in lines:
            print(line, flush=True)
        _say(
            "a client links with:  echo 'ONE OF THE LINES ABOVE' | git annex p2p --link --name hub"
        )
        if onion:
            _say(
                "the onion is on a private Tor network on 127.0.0.1: reach it with the"
                f" p2p-annex::torbridge line and TORBRIDGE_SOCKS={tor_socks}"
            )
        if check_only:
            nursery.cancel_scope.cancel()
            return
        _say("serving until Ctrl-C")
        await trio.sleep_forever()


def run_demo(directory: Path | None, check_only: bool = False, use_tor: bool = True) -> int:
    check_git_annex()
    root = (directory or Path(tempfile.mkdtemp(prefix="torbridge-demo-"))).resolve()
    demo = Demo(root)
    config = demo.prepare()
    net = None
    tor_socks = None
    if use_tor and shutil.which("tor") and shutil.which("tor-gencert"):
        from torbridge.testnet import TestNet

        logging.getLogger("stem").setLevel(logging.WARNING)
        _say("bringing up a private Tor network on 127.0.0.1 (nothing leaves this machine)")
        net = TestNet(root / "tor", progress=lambda text: _say(f"tor: {text}"))
    elif use_tor:
        _say("tor is not installed: serving on the local socket only (apt-get install tor)")
    try:
        if net is not None:
            net.start()
            client_tor = net.start_client("client")
            service_tor = net.start_service_tor("service")
            tor_socks = client_tor.socks
            config = replace(config, tor=Tor(socks=tor_socks or "", control=service_tor.control))
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_demo, demo, config, check_only, tor_socks)
    finally:
        if net is not None:
            net.stop()
    return 0
