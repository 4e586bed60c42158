"""The private network: authorities and relays voting a consensus on
127.0.0.1, client and service tors on top, and their teardown.

Some 510 lines, left whole: one class, ``TestNet``, whose start and
teardown read best side by side; torrcs, keys, one tor process and the
socket audit are modules of their own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import stem  # type: ignore[import-untyped]

from torbridge.testnet.audit import Watchdog
from torbridge.testnet.keys import KeyCache, default_key_cache, make_keys
from torbridge.testnet.process import STOP_GRACE, TOR_ENV, TorProcess, free_ports, tor_command
from torbridge.testnet.torrc import (
    INITIAL_VOTING_INTERVAL,
    Authority,
    Network,
    Node,
    authority_torrc,
    client_torrc,
    first_vote_lead,
    relay_torrc,
    service_torrc,
    vote_offset,
)
from torbridge.testnet.torrc_safety import LOOPBACK, TorTestNetError, write_checked_torrc

# Onionbalance 0.2.4 needs this many relays with the HSDir flag (every
# authority and relay here has it): with fewer its hash ring never completes.
ONIONBALANCE_MIN_HSDIRS = 7
MARKER = ".torbridge-testnet"  # marks a directory as ours (safe to wipe and reuse)

_NICKNAME = re.compile(r"[A-Za-z0-9]{1,19}")


class TestNet:
    """A private Tor network on 127.0.0.1. Use as a context manager.

    ``start()`` brings up the authorities and relays; ``start_client()`` and
    ``start_service_tor()`` add tors on top. ``stop()`` kills them all (by
    PID) and removes the working directory if we made it; it may be called
    from another thread, and a start() in progress then fails cleanly.
    ``progress`` gets one-line messages (from the watchdog thread too).
    A given ``workdir`` must be empty or an earlier testnet's, and is kept.

    Nothing is registered until ``start()``: it installs an atexit hook that
    stops this network if the interpreter exits with it still up, and
    ``stop()`` removes the hook again.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        key_cache: Path | None = None,
        progress: Callable[[str], None] | None = None,
        authorities: int = 3,
        relays: int = 2,
    ) -> None:
        if authorities < 1 or authorities + relays < 4:
            raise ValueError("need at least one authority and four relays in all")
        self.n_authorities = authorities
        self.n_relays = relays
        self.key_cache = KeyCache(key_cache or default_key_cache())
        self._requested_workdir = workdir
        self._progress = progress
        self.workdir: Path | None = None
        self.authorities: list[TorProcess] = []
        self.relays: list[TorProcess] = []
        self.tors: list[TorProcess] = []  # every tor started, in order
        self.violation: str | None = None
        self.watchdog: Watchdog | None = None
        self._network: Network | None = None
        self._own_workdir = False
        self._lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._t0 = time.monotonic()
        self._helpers: list[subprocess.Popen[bytes]] = []  # tor-gencert, --list-fingerprint

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> TestNet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        """Authorities and relays; returns once every authority serves a
        consensus listing every relay. On failure everything is stopped."""
        with self._lock:
            if self._started or self._stopped:
                raise TorTestNetError("a TestNet starts once")
            self._started = True
            atexit.register(self._stop_at_exit)
        try:
            with self._stop_means_stopped():
                self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every tor by PID (SIGKILL after a grace), close our control
        connections, remove the workdir if we made it. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            tors, helpers = list(self.tors), list(self._helpers)
        atexit.unregister(self._stop_at_exit)
        # Signal first, close our control connections after: the monitor
        # connection owns its tor (stem sends TAKEOWNERSHIP), and a tor told
        # to exit both ways at once can hang on exit.
        processes = [t.process for t in tors] + helpers
        for p in processes:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        killed = 0
        for p in processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed += 1
        for tor in tors:
            tor._close_controllers()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.workdir is not None and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if tors:
            hung = f" ({killed} hung on exit: SIGKILLed)" if killed else ""
            self._say(f"stopped {len(tors)} tor processes{hung}")

    def _stop_at_exit(self) -> None:
        """The atexit hook of a started network (start() installs it, stop() removes it)."""
        with contextlib.suppress(Exception):
            self.stop()

    @contextlib.contextmanager
    def _stop_means_stopped(self) -> Iterator[None]:
        """stop() from another thread closes what a waiting loop uses: say so."""
        try:
            yield
        except Exception as e:
            if self._stopped and not isinstance(e, TorTestNetError):
                raise TorTestNetError("the test network was stopped") from e
            raise

    def check(self) -> None:
        """Raise TorTestNetError if the watchdog fired or a tor of ours died."""
        if self.violation is not None:
            raise TorTestNetError(f"safety watchdog killed every tor: {self.violation}")
        if self._stopped:
            raise TorTestNetError("the test network was stopped")
        for tor in self.tors:
            code = tor.process.poll()
            if code is not None:
                raise TorTestNetError(f"tor {tor.name} exited (status {code}):\n{tor.log_tail()}")

    # ---------------------------------------------------------- bring-up
    def _start(self, deadline: float) -> None:
        for tool in ("tor", "tor-gencert"):
            if shutil.which(tool) is None:
                raise TorTestNetError(f"{tool} not found on PATH")
        self._t0 = time.monotonic()
        workdir = self._make_workdir()
        empty = workdir / "empty"
        empty.write_bytes(b"")
        self.watchdog = Watchdog(self._processes, self._on_violation)
        self.watchdog.start()

        names = [f"auth{i}" for i in range(self.n_authorities)]
        names += [f"relay{i}" for i in range(self.n_relays)]
        ports = iter(free_ports(2 * len(names) + self.n_authorities))
        nodes = {n: Node(n, workdir / n, next(ports)) for n in names}
        or_ports = {n: next(ports) for n in names}
        dir_ports = {n: next(ports) for n in names[: self.n_authorities]}
        for node in nodes.values():
            (node.datadir / "keys").mkdir(parents=True, mode=0o700)
            os.chmod(node.datadir, 0o700)
        fingerprints, v3idents = make_keys(
            nodes, or_ports, empty, deadline, self.key_cache, self._helper, self._say
        )

        authorities = tuple(
            Authority(n, or_ports[n], dir_ports[n], fingerprints[n], v3idents[n])
            for n in names[: self.n_authorities]
        )
        self._network = net = Network(authorities, empty, os.getpid())
        bandwidth_file = workdir / "bandwidths"
        bandwidth_file.write_text(
            f"{int(time.time())}\n"
            + "".join(f"node_id=${fingerprints[n]} bw=1000\n" for n in names)
        )
        # The latest first vote the grid allows, ~3 s from now; moved once the
        # descriptors are in (_time_first_vote).
        valid_after = int(time.time()) + INITIAL_VOTING_INTERVAL
        offset = vote_offset(valid_after)
        for name in names:
            node = nodes[name]
            if name in dir_ports:
                text = authority_torrc(
                    net,
                    node,
                    or_port=or_ports[name],
                    dir_port=dir_ports[name],
                    vote_offset=offset,
                    bandwidth_file=bandwidth_file,
                )
                role = "authority"
            else:
                text = relay_torrc(net, node, or_port=or_ports[name])
                role = "relay"
            tor = self._launch(node, text, role=role, or_port=or_ports[name])
            (self.authorities if role == "authority" else self.relays).append(tor)
        self._say(f"{len(names)} tors launched")
        for tor in self.authorities + self.relays:
            tor.connect_monitor(deadline, self.check)
        self._time_first_vote(valid_after, offset, deadline)
        self._wait_consensus(deadline)

    def _make_workdir(self) -> Path:
        requested = self._requested_workdir
        if requested is None:
            workdir = Path(tempfile.mkdtemp(prefix="torbridge-testnet-"))
            self._own_workdir = True
        else:
            workdir = requested.absolute()
            if workdir.exists() and any(workdir.iterdir()):
                if not (workdir / MARKER).exists():
                    raise TorTestNetError(f"{workdir} is not empty (and not a testnet directory)")
                for child in workdir.iterdir():  # an earlier testnet's: start afresh
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        (workdir / MARKER).write_text("a torbridge private Tor network; safe to delete\n")
        self.workdir = workdir
        self._say(f"working directory {workdir}")
        return workdir

    def _helper(self, argv: list[str], stdin: Path | None = None) -> subprocess.Popen[bytes]:
        with self._lock, open(stdin or os.devnull, "rb") as input_file:
            if self._stopped:
                raise TorTestNetError("the test network was stopped")
            p = subprocess.Popen(
                argv,
                stdin=input_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **TOR_ENV),
                start_new_session=True,
            )
            self._helpers.append(p)
        return p

    def _launch(
        self,
        node: Node,
        text: str,
        *,
        role: str,
        or_port: int | None = None,
        socks: str | None = None,
    ) -> TorProcess:
        """Write the torrc, check it as written, start tor on it."""
        assert self._network is not None
        node.datadir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(node.datadir, 0o700)
        torrc = node.datadir / "torrc"
        write_checked_torrc(torrc, text, self._network.empty_file)
        argv = tor_command(torrc, self._network.empty_file)
        with self._lock:
            if self._stopped:
                raise TorTestNetError("the test network was stopped")
            with open(node.datadir / "stdout.log", "wb") as out:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **TOR_ENV),
                    start_new_session=True,  # Ctrl-C reaches us, and we stop them
                )
            tor = TorProcess(
                name=node.nickname,
                datadir=node.datadir,
                torrc=torrc,
                process=process,
                control_port=node.control_port,
                cookie_path=node.datadir / "control_auth_cookie",
                socks=socks,
                role=role,
                or_port=or_port,
            )
            self.tors.append(tor)
        return tor

    def _wait(
        self,
        done: Callable[[], bool],
        deadline: float,
        what: Callable[[], str],
        tors: Sequence[TorProcess] = (),
    ) -> None:
        while not done():
            self.check()
            if time.monotonic() > deadline:
                logs = "".join(f"\n--- {t.name}:\n{t.log_tail()}" for t in tors)
                raise TorTestNetError(f"timed out waiting for {what()}{logs}")
            time.sleep(0.05)

    def _time_first_vote(self, valid_after: int, offset: int, deadline: float) -> None:
        """Hold the first vote until every authority has every relay's
        descriptor, then bring it forward to just after that.

        A first vote without them gives a consensus that lacks relays (or
        none at all), and the next round comes 5-10 s later: under CPU load
        tor can take 3 s to start. SETCONF of the start offset makes tor
        recalculate its schedule (dirauth_config.c), within the 5 s grid.
        """
        lead = first_vote_lead()

        def move(to: int) -> None:
            nonlocal valid_after, offset
            if vote_offset(to) == offset:  # unchanged options do not reschedule
                to -= 1
            valid_after, offset = to, vote_offset(to)
            for a in self.authorities:
                a._monitor.set_options({"TestingV3AuthVotingStartOffset": str(offset)})

        while not self._authorities_have_all_descriptors():
            self.check()
            now = time.time()
            if time.monotonic() > deadline:
                raise TorTestNetError("timed out waiting for the relays' descriptors")
            if valid_after - lead - 0.8 < now < valid_after - lead - 0.2:
                move(int(now) + INITIAL_VOTING_INTERVAL)  # postpone
                self._say("descriptors still missing: first vote postponed")
            time.sleep(0.05)
        soonest = int(time.time() + lead + 0.5) + 1
        if soonest < valid_after:
            move(soonest)
        self._say(f"descriptors in; authorities voting in {valid_after - lead - time.time():.1f}s")

    def _authorities_have_all_descriptors(self) -> bool:
        want = len(self.authorities) + len(self.relays)
        for a in self.authorities:
            try:
                descriptors = a._monitor.get_info("desc/all-recent", "")
            except stem.ControllerError:
                return False
            if len(re.findall(r"^router ", descriptors, re.M)) < want:
                return False
        return True

    def _wait_consensus(self, deadline: float) -> None:
        want = len(self.authorities) + len(self.relays)
        counts = dict.fromkeys((a.name for a in self.authorities), 0)

        def complete() -> bool:
            for a in self.authorities:
                if counts[a.name] < want:
                    try:
                        ns = a._monitor.get_info("ns/all", "")
                    except stem.ControllerError:
                        continue
                    counts[a.name] = len(re.findall(r"^r ", ns, re.M))
            return min(counts.values()) >= want

        self._wait(
            complete,
            deadline,
            lambda: f"a consensus listing all {want} relays (authorities have {counts})",
            self.authorities,
        )
        self._say(f"consensus has {want} relays")

    def _wait_bootstrapped(self, tor: TorProcess, deadline: float) -> None:
        self._wait(
            lambda: tor._bootstrap_progress() >= 100,
            deadline,
            lambda: f"{tor.name} to bootstrap ({tor._bootstrap_progress()}%)",
            [tor],
        )

    # ------------------------------------------------------- client tors
    def start_client(
        self,
        name: str,
        *,
        socks_port: int | None = None,
        extra: Sequence[str] = (),
        timeout: float = 60,
    ) -> TorProcess:
        """A client tor: SocksPort 127.0.0.1:PORT ExtendedErrors (a free port
        unless given), a ControlPort; waits for bootstrap 100%. ``extra``
        torrc lines (e.g. HiddenServiceDir/HiddenServicePort) are checked
        like the rest."""
        control_port, free_socks = free_ports(2)
        port = socks_port if socks_port is not None else free_socks
        node = self._new_node(name, control_port)
        text = client_torrc(self._net(), node, socks_port=port, extra=extra)
        tor = self._launch(node, text, role="client", socks=f"{LOOPBACK}:{port}")
        self._finish_start(tor, time.monotonic() + timeout)
        return tor

    def start_service_tor(
        self, name: str, *, extra: Sequence[str] = (), timeout: float = 60
    ) -> TorProcess:
        """A tor for onion services published over its control port
        (ADD_ONION): SocksPort 0, cookie auth; waits for bootstrap 100%.
        ``extra`` torrc lines (checked like the rest) add torrc onion
        services, e.g. an Onionbalance instance: HiddenServiceDir,
        HiddenServicePort, ``HiddenServiceOnionBalanceInstance 1`` (its
        ``ob_config`` written in the directory before this call)."""
        node = self._new_node(name, free_ports(1)[0])
        tor = self._launch(node, service_torrc(self._net(), node, extra=extra), role="service")
        self._finish_start(tor, time.monotonic() + timeout)
        return tor

    def _net(self) -> Network:
        if self._network is None or not self.relays:
            raise TorTestNetError("start() the network first")
        return self._network

    def _new_node(self, name: str, control_port: int) -> Node:
        if not _NICKNAME.fullmatch(name):
            raise TorTestNetError(f"tor name {name!r}: 1-19 letters or digits")
        assert self.workdir is not None
        if any(t.name == name for t in self.tors) or name.startswith(("auth", "relay")):
            raise TorTestNetError(f"tor name {name!r} is taken")
        return Node(name, self.workdir / name, control_port)

    def _finish_start(self, tor: TorProcess, deadline: float) -> None:
        try:
            with self._stop_means_stopped():
                tor.connect_monitor(deadline, self.check)
                self._wait_bootstrapped(tor, deadline)
        except BaseException:
            self._terminate(tor)
            raise
        self._say(f"{tor.name} bootstrapped")

    def _terminate(self, tor: TorProcess) -> None:
        if tor.process.poll() is None:
            tor.process.terminate()
            try:
                tor.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                tor.process.kill()
                tor.process.wait()
        tor._close_controllers()
        with self._lock:
            if tor in self.tors:
                self.tors.remove(tor)

    # ---------------------------------------------------- onion services
    def wait_for_descriptor(self, tor: TorProcess, onion: str, timeout: float = 60) -> None:
        """Wait until tor (the service side) has uploaded the descriptor of
        ``onion`` to at least one HSDir and has no upload still in flight: a
        client caches a failed descriptor fetch, so connect only after this.
        Events are recorded from the tor's start, so a publication that
        already happened counts."""
        if tor._monitor is None:
            raise TorTestNetError(f"{tor.name} is not a client or service tor of this network")
        tor.wait_for_upload(onion, timeout, self.check)

    # ----------------------------------------------------------- plumbing
    def _processes(self) -> list[subprocess.Popen[bytes]]:
        with self._lock:
            return [t.process for t in self.tors] + list(self._helpers)

    def _on_violation(self, why: str) -> None:
        self.violation = why
        self._say(f"SAFETY WATCHDOG: {why}; killed every tor")

    def _say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(f"[{time.monotonic() - self._t0:5.1f}s] {message}")
