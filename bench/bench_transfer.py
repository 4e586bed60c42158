#!/usr/bin/env python3
"""Transfer benchmark: a stock git-annex client, directly vs through torbridge.

Both paths end in the SAME server repository, served by
`git-annex-shell p2pstdio`:

  direct  client -> git-annex-p2p-direct (written here; execs git-annex-shell)
  bridge  client -> git-annex-p2p-torbridge -> unix socket -> torbridge serve
                 -> git-annex-shell

Each round times `git annex copy --to` and `git annex get --from` for one big
file and for many 4 KiB files on both paths, alternating which path goes
first, and resets the server between runs so every timed copy transfers.
It reports medians, bridge/direct ratios and the peak RSS (VmHWM) of the
torbridge daemon for the big and the small workload. See bench/README.md.

Stdlib only; everything runs on this machine (pipes and unix sockets).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

MIB = 1024 * 1024
SMALL_SIZE = 4096
PATHS = ("direct", "bridge")
WORKLOADS = ("big", "small")
OPS = ("copy", "get")
SOCKET_WAIT = 20.0  # seconds to wait for the daemon's socket
BIG_TARGET = "big.bin"
SMALL_TARGET = "small"

# The generic P2P transport for `p2p-annex::direct:<server repo>`: git-annex
# runs `git-annex-p2p-direct <server repo>` and speaks the P2P protocol over
# its stdin/stdout. git-annex-shell p2pstdio expects an authenticated caller
# and starts with AUTH-SUCCESS <uuid> itself, which is exactly the reply the
# client waits for after its AUTH line. So: consume the AUTH line (byte by
# byte, so that nothing after it is read away from git-annex-shell) and exec.
DIRECT_PROGRAM = '''\
#!{python}
"""git-annex-p2p-direct REPO: the P2P protocol straight to git-annex-shell."""
import os
import sys

line = b""
while not line.endswith(b"\\n"):
    byte = os.read(0, 1)
    if not byte or len(line) > 32768:
        sys.exit(1)
    line += byte
fields = line.rstrip(b"\\r\\n").decode().split(" ")
if len(fields) < 2 or fields[0] != "AUTH":
    sys.exit(1)
os.execvp("git-annex-shell", ["git-annex-shell", "p2pstdio", sys.argv[1], fields[1]])
'''


class BenchError(Exception):
    """A setup or run failure, reported as one clear message."""


@dataclass
class Workload:
    name: str
    target: str  # the path handed to git annex, relative to the client repo
    files: int
    size: int  # total bytes

    @property
    def label(self) -> str:
        if self.name == "big":
            return f"big ({self.size // MIB} MiB)"
        return f"small ({self.files} x {SMALL_SIZE // 1024} KiB)"


@dataclass
class Results:
    seconds: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    rss_kib: dict[str, int] = field(default_factory=dict)  # workload -> peak VmHWM
    rss_idle_kib: int | None = None
    rss_peak_resettable: bool = True

    def add(self, path: str, workload: str, op: str, secs: float) -> None:
        self.seconds.setdefault((path, workload, op), []).append(secs)

    def median(self, path: str, workload: str, op: str) -> float | None:
        values = self.seconds.get((path, workload, op))
        return statistics.median(values) if values else None


QUICK = {"big_mib": 20, "small": 50, "rounds": 1}  # --quick: a smoke run


def workload_parser(description: str) -> argparse.ArgumentParser:
    """The options every bridge-vs-direct bench takes (sizes, rounds, paths, --keep)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--big-mib", type=int, default=1024, help="big file size (default 1024)")
    parser.add_argument("--small", type=int, default=1000, help="number of 4 KiB files")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median over them)")
    parser.add_argument("--only", choices=PATHS, help="run one path only (no ratios)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --big-mib 20 --small 50 --rounds 1 (the figures mean little)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (for debugging)")
    return parser


def parse_workload_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.big_mib < 1 or args.small < 1 or args.rounds < 1:
        parser.error("--big-mib, --small and --rounds must be at least 1")
    return args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = workload_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--torbridge",
        help="torbridge command (default: `torbridge` on PATH, else python -m torbridge)",
    )
    return parse_workload_args(parser, argv)


# ---------------------------------------------------------------- environment


def real_git_annex() -> Path | None:
    """The git-annex multi-call binary inside the PyPI wheel, if installed.

    Symlinking it as git-annex / git-annex-shell skips the Python wrapper
    scripts (and pyenv shims) on every call; PATH is the fallback.
    """
    spec = importlib.util.find_spec("git_annex")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "git-annex"
    return binary if os.access(binary, os.X_OK) else None


def make_env(root: Path) -> dict[str, str]:
    home = root / "home"
    bindir = root / "bin"
    home.mkdir()
    bindir.mkdir()
    (home / ".gitconfig").write_text(
        "[user]\n\tname = torbridge bench\n\temail = bench@localhost\n"
        "[init]\n\tdefaultBranch = main\n"
    )
    env = dict(os.environ)
    env.pop("GIT_ANNEX_P2P_AUTHTOKEN", None)  # would override the stored tokens
    env["HOME"] = str(home)
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    binary = real_git_annex()
    if binary is not None:
        for name in ("git-annex", "git-annex-shell"):
            (bindir / name).symlink_to(binary)
        magic = binary.parent / "magic.mgc"  # what the wheel's wrapper sets
        if magic.exists():
            env["MAGIC"] = str(magic)
    direct = bindir / "git-annex-p2p-direct"
    direct.write_text(DIRECT_PROGRAM.format(python=sys.executable))
    direct.chmod(0o755)
    return env


class Runner:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(
        self, cmd: Sequence[str], cwd: Path, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            proc = subprocess.run(
                list(cmd), cwd=cwd, env=self.env, input=stdin, capture_output=True, check=False
            )
        except FileNotFoundError as exc:
            raise BenchError(f"cannot run {cmd[0]!r}: {exc}") from exc
        if proc.returncode != 0:
            raise BenchError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}) in {cwd}:\n"
                + tail(proc.stdout + proc.stderr)
            )
        return proc

    def annex_json(self, cwd: Path, args: Sequence[str], expect: int) -> float:
        """Run `git annex ARGS --json`, check `expect` files succeeded, return seconds."""
        start = time.perf_counter()
        proc = self.run(["git", "annex", *args, "--json"], cwd)
        elapsed = time.perf_counter() - start
        ok = 0
        for line in proc.stdout.splitlines():
            if line.strip() and json.loads(line).get("success") is True:
                ok += 1
        if ok != expect:
            raise BenchError(
                f"`git annex {' '.join(args)}` handled {ok} files, expected {expect}:\n"
                + tail(proc.stdout + proc.stderr)
            )
        return elapsed


def tail(data: bytes, lines: int = 20) -> str:
    text = data.decode(errors="replace").rstrip().splitlines()
    return "\n".join("    " + line for line in text[-lines:])


# ---------------------------------------------------------------- repositories


def make_repos(
    runner: Runner, root: Path, args: argparse.Namespace
) -> tuple[Path, Path, list[Workload]]:
    server = root / "server"
    client = root / "client"
    for repo in (server, client):
        runner.run(["git", "init", "-q", str(repo)], root)
        runner.run(["git", "annex", "init", repo.name], repo)
    workloads = add_workload(runner, client, args.big_mib, args.small)
    return server, client, workloads


def add_workload(runner: Runner, client: Path, big_mib: int, small: int) -> list[Workload]:
    """Add the big file and the small files to ``client`` (committed); their Workloads."""
    with open(client / BIG_TARGET, "wb") as out:
        for _ in range(big_mib):
            out.write(os.urandom(MIB))
    (client / SMALL_TARGET).mkdir()
    for i in range(small):
        (client / SMALL_TARGET / f"f{i:05d}").write_bytes(os.urandom(SMALL_SIZE))
    runner.run(["git", "annex", "add", "--quiet", BIG_TARGET, SMALL_TARGET], client)
    runner.run(["git", "commit", "-q", "-m", "bench workload"], client)
    return [
        Workload("big", BIG_TARGET, 1, big_mib * MIB),
        Workload("small", SMALL_TARGET, small, small * SMALL_SIZE),
    ]


def link_direct(runner: Runner, client: Path, server: Path) -> None:
    # `p2p --link` runs the transport, sends AUTH, learns the server's UUID
    # from AUTH-SUCCESS and stores the token. Our transport ignores the token
    # (git-annex-shell does no auth), but --link wants one: any alnum string.
    line = f"p2p-annex::direct:{server}:{'0f' * 64}\n"
    runner.run(["git", "annex", "p2p", "--link", "--name", "direct"], client, line.encode())


class Daemon:
    """`torbridge --config CFG serve`, with its log in the temp dir."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self._log_file.close()
            raise BenchError(f"cannot start {cmd[0]!r}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, socket: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if self.proc.poll() is not None:
                raise BenchError(
                    f"`torbridge serve` exited with code {self.proc.returncode} before"
                    f" creating {socket} (is the daemon implemented yet?):\n"
                    + tail(self.log.read_bytes())
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"`torbridge serve` did not create {socket} within {timeout:.0f} s:\n"
                    + tail(self.log.read_bytes())
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def torbridge_command(args: argparse.Namespace) -> list[str]:
    if args.torbridge:
        return str(args.torbridge).split()
    found = shutil.which("torbridge")
    return [found] if found else [sys.executable, "-m", "torbridge"]


def start_bridge(
    runner: Runner, root: Path, client: Path, server: Path, args: argparse.Namespace
) -> Daemon:
    if shutil.which("git-annex-p2p-torbridge", path=runner.env["PATH"]) is None:
        raise BenchError(
            "git-annex-p2p-torbridge is not on PATH (install torbridge: pip install -e .)"
        )
    config = root / "torbridge.toml"
    config.write_text(
        f"repository = {json.dumps(str(server))}\n"
        f"state_dir = {json.dumps(str(root / 'state'))}\n"
        f"socket_dir = {json.dumps(str(root / 'sock'))}\n"
        "\n[[expose]]\n"
        'name = "hub"\n'
        'remote = "."\n'
        "port = 5000\n"
    )
    cmd = [*torbridge_command(args), "--config", str(config)]
    try:
        proc = runner.run([*cmd, "token", "add", "bench", "--mode", "rw"], root)
    except BenchError as exc:
        raise BenchError(f"`torbridge token add` failed (is torbridge ready yet?): {exc}") from exc
    socket = root / "sock" / "hub.sock"
    addresses = [
        line.strip()
        for line in proc.stdout.decode().splitlines()
        if line.strip().startswith("p2p-annex::torbridge:")
    ]
    address = next((a for a in addresses if f"{socket}:" in a), addresses[0] if addresses else "")
    if not address:
        raise BenchError(
            "`torbridge token add` printed no p2p-annex::torbridge: address:\n" + tail(proc.stdout)
        )
    daemon = Daemon([*cmd, "serve"], runner.env, root / "torbridge.log")
    try:
        daemon.wait_for(socket, SOCKET_WAIT)
        runner.run(
            ["git", "annex", "p2p", "--link", "--name", "bridge"], client, f"{address}\n".encode()
        )
    except BaseException:
        daemon.stop()
        raise
    return daemon


# ---------------------------------------------------------------- measuring


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure_path(
    runner: Runner, client: Path, remote: str, workload: Workload, results: Results
) -> None:
    """Timed copy --to, then timed get --from; leaves the server empty again."""
    target = [workload.target]
    secs = runner.annex_json(client, ["copy", "--to", remote, *target], workload.files)
    results.add(remote, workload.name, "copy", secs)
    runner.annex_json(client, ["drop", "--force", *target], workload.files)
    secs = runner.annex_json(client, ["get", "--from", remote, *target], workload.files)
    results.add(remote, workload.name, "get", secs)
    runner.annex_json(client, ["drop", "--from", remote, "--force", *target], workload.files)


def run_rounds(
    runner: Runner,
    client: Path,
    paths: Sequence[str],
    workloads: Sequence[Workload],
    rounds: int,
    daemon_pid: int | None,
) -> Results:
    results = Results()
    if daemon_pid is not None:
        results.rss_idle_kib = proc_status_kib(daemon_pid, "VmHWM")
    for rnd in range(rounds):
        order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
        for workload in workloads:
            for path in order:
                print(f"  round {rnd + 1}/{rounds}: {path:6} {workload.label}", flush=True)
                if path == "bridge" and daemon_pid is not None:
                    results.rss_peak_resettable &= reset_peak_rss(daemon_pid)
                measure_path(runner, client, path, workload, results)
                if path == "bridge" and daemon_pid is not None:
                    hwm = proc_status_kib(daemon_pid, "VmHWM")
                    results.rss_kib[workload.name] = max(results.rss_kib.get(workload.name, 0), hwm)
    return results


# ---------------------------------------------------------------- reporting


def ratio(results: Results, workload: str, op: str) -> float | None:
    direct = results.median("direct", workload, op)
    bridge = results.median("bridge", workload, op)
    if direct is None or bridge is None or direct <= 0 or bridge <= 0:
        return None
    if workload == "big":
        return direct / bridge  # throughput ratio: bridge MiB/s over direct MiB/s
    return bridge / direct  # elapsed ratio


def fmt(value: float | None, digits: int = 3) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def report(results: Results, workloads: Sequence[Workload], paths: Sequence[str]) -> None:
    print()
    print(f"{'path':8} {'workload':22} {'op':5} {'seconds':>9} {'MiB/s':>9}")
    for workload in workloads:
        for op in OPS:
            for path in paths:
                secs = results.median(path, workload.name, op)
                if secs is None:
                    continue
                rate = workload.size / MIB / secs
                print(f"{path:8} {workload.label:22} {op:5} {secs:9.3f} {rate:9.1f}")
    ratios = {
        f"{workload}_{op}_ratio": ratio(results, workload, op)
        for workload in WORKLOADS
        for op in OPS
    }
    print()
    if "direct" in paths and "bridge" in paths:
        print("bridge/direct (medians):")
        for op in OPS:
            print(
                f"  big   {op:4}  throughput ratio {fmt(ratios[f'big_{op}_ratio'])}"
                "  (target >= 0.95)"
            )
        for op in OPS:
            print(
                f"  small {op:4}  elapsed ratio    {fmt(ratios[f'small_{op}_ratio'])}"
                "  (target <= 1.05)"
            )
    else:
        print("ratios: n/a (only one path was run)")
    if "bridge" in paths:
        note = "" if results.rss_peak_resettable else " (peak since start: clear_refs unavailable)"
        print(
            f"torbridge daemon VmHWM: idle {results.rss_idle_kib} KiB,"
            f" big {results.rss_kib.get('big')} KiB, small {results.rss_kib.get('small')} KiB{note}"
        )
    rss_big = results.rss_kib.get("big")
    rss_small = results.rss_kib.get("small")
    print()
    print(
        "RESULT "
        + " ".join(f"{key}={fmt(value)}" for key, value in ratios.items())
        + f" rss_big_kib={rss_big if rss_big is not None else 'nan'}"
        + f" rss_small_kib={rss_small if rss_small is not None else 'nan'}"
    )


# ---------------------------------------------------------------- main


def spread(results: Results, workloads: Sequence[Workload], paths: Sequence[str]) -> None:
    """Per run: min..max and (max - min) / median; per round: the bridge/direct ratio."""
    print("\nspread between rounds (seconds: min..max, (max-min)/median):")
    for workload in workloads:
        for op in OPS:
            for path in paths:
                values = results.seconds.get((path, workload.name, op), [])
                if not values:
                    continue
                med = statistics.median(values)
                print(
                    f"  {path:6} {workload.name:5} {op:4}  {min(values):8.3f}..{max(values):8.3f}"
                    f"  {100 * (max(values) - min(values)) / med:5.1f}%"
                )
    if "direct" not in paths or "bridge" not in paths:
        return
    print("per-round ratios (big: throughput bridge/direct; small: elapsed bridge/direct):")
    for workload in workloads:
        for op in OPS:
            direct = results.seconds[("direct", workload.name, op)]
            bridge = results.seconds[("bridge", workload.name, op)]
            ratios = [
                d / b if workload.name == "big" else b / d
                for d, b in zip(direct, bridge, strict=True)
            ]
            print(f"  {workload.name:5} {op:4}  {'  '.join(fmt(r) for r in ratios)}")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the cleanup in `finally` runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_disk(root: Path, args: argparse.Namespace) -> None:
    need = 2 * args.big_mib * MIB + 4 * args.small * SMALL_SIZE + 256 * MIB
    free = shutil.disk_usage(root).free
    if free < need:
        raise BenchError(
            f"{root} has {free // MIB} MiB free, the workload needs about {need // MIB} MiB"
            " (use a smaller --big-mib or point TMPDIR elsewhere)"
        )


def bench(root: Path, args: argparse.Namespace) -> None:
    paths = [args.only] if args.only else list(PATHS)
    env = make_env(root)
    runner = Runner(env)
    check_disk(root, args)
    version = runner.run(["git", "annex", "version", "--raw"], root).stdout.decode().strip()
    print(f"git-annex {version}; {os.cpu_count()} CPUs; paths: {', '.join(paths)};")
    print(f"big file {args.big_mib} MiB, {args.small} small files, {args.rounds} round(s)")
    print(f"temp dir {root}")
    print("setting up repositories...", flush=True)
    server, client, workloads = make_repos(runner, root, args)
    daemon: Daemon | None = None
    try:
        if "direct" in paths:
            link_direct(runner, client, server)
        if "bridge" in paths:
            daemon = start_bridge(runner, root, client, server, args)
        load_before = loadavg()
        print(f"measuring... (load average {load_before})", flush=True)
        pid = daemon.pid if daemon is not None else None
        results = run_rounds(runner, client, paths, workloads, args.rounds, pid)
        load_after = loadavg()
    finally:
        if daemon is not None:
            daemon.stop()
    report(results, workloads, paths)
    spread(results, workloads, paths)
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")


def remove_tree(root: Path) -> None:
    """rmtree that also works as non-root: git-annex makes object dirs read-only."""
    for dirpath, _dirnames, _filenames in os.walk(root):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def run_in_temp_dir(
    prog: str,
    prefix: str,
    body: Callable[[Path, argparse.Namespace], None],
    args: argparse.Namespace,
) -> int:
    """Run ``body(root, args)`` in a fresh temp dir, removed after (unless --keep); exit code."""
    root = Path(tempfile.mkdtemp(prefix=prefix))  # short: unix socket paths
    try:
        with sigterm_as_interrupt():
            body(root, args)
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            remove_tree(root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_in_temp_dir("bench_transfer", "tb-bench-", bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
