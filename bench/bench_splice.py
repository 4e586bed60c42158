"""The relay's own cost of a DATA body: splice(2) vs a copy through user space.

Asks: what does moving a body cost the daemon, per GiB, with the kernel
doing it (transport/splice.py, as Session._copy_body does after the first
piece) against the user-space copy it replaced (a trio read and write of
256 KiB pieces, each under a deadline, as Session._copy_body still does
where no pipe is on either end)? Everything else is left out: a ``dd``
writes zeros into a pipe (256 KiB, as git-annex-p2p-torbridge sets its
pipes), the relay moves them into a second pipe, a ``dd`` reads them. The
two ways alternate, side by side in one run, and the CPU seconds of this
process (the relay) are compared, not the wall time: the two ``dd``
programs are the same for both.

    python -m bench.bench_splice                 # 1 GiB, 5 rounds
    python -m bench.bench_splice --mib 256 --rounds 3

Prints a table and a ``RESULT`` line: ``cpu_ratio`` = splice CPU / copy CPU
(below 1: splice is cheaper).

``--cluster N`` asks the same of a cluster PUT's fanout instead: a real
Session and ClusterChannel in this process, a client process writing one
PUT's body of zeros into a unix socket (as tor does), N node processes
speaking P2P on pipes (as p2p-annex program nodes) that read and drop the
body. ``copy`` is the user-space fanout (``kernel_fanout=False``), ``tee``
the kernel's (transport/fanout.py); the daemon's CPU seconds are given per
GiB of body and per GiB per node.

    python -m bench.bench_splice --cluster 3 --mib 512 --rounds 5
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import trio

from tests.harness.fakes import CLIENT_UUID, TOKEN, OneToken
from torbridge.config import Limits
from torbridge.protocol import cluster as c
from torbridge.server.endpoints import Endpoint
from torbridge.server.fdpass import PassedPipes
from torbridge.server.session import Session
from torbridge.transport import splice
from torbridge.transport.base import PeerChannel, SessionInfo, Transport
from torbridge.transport.cluster import ClusterNode, ClusterTransport
from torbridge.transport.process import open_process_channel

# This bench runs itself as the node and client programs: as a module of
# this checkout (``python -m bench.bench_splice``), wherever it is run from.
SELF = (sys.executable, "-m", "bench.bench_splice")
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p
    ),
}

PIECE = 256 * 1024
DEADLINE = 30.0


def _pipes(size: int) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    writer = subprocess.Popen(
        ["dd", "if=/dev/zero", f"bs={PIECE}", f"count={size // PIECE}", "status=none"],
        stdout=subprocess.PIPE,
    )
    reader = subprocess.Popen(
        ["dd", "of=/dev/null", f"bs={PIECE}", "status=none"], stdin=subprocess.PIPE
    )
    assert writer.stdout is not None and reader.stdin is not None
    for pipe in (writer.stdout, reader.stdin):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIECE)
    return writer, reader


async def by_splice(size: int) -> int:
    writer, reader = _pipes(size)
    assert writer.stdout is not None and reader.stdin is not None
    src, dst = writer.stdout.fileno(), reader.stdin.fileno()
    os.set_blocking(src, False)
    os.set_blocking(dst, False)
    moved = 0
    while True:
        with trio.fail_after(DEADLINE):
            n = await splice.splice_some(src, dst, 4 << 20)
        if not n:
            break
        moved += n
    reader.stdin.close()
    writer.stdout.close()
    reader.wait()
    writer.wait()
    return moved


async def by_copy(size: int) -> int:
    writer, reader = _pipes(size)
    assert writer.stdout is not None and reader.stdin is not None
    src = trio.lowlevel.FdStream(os.dup(writer.stdout.fileno()))
    dst = trio.lowlevel.FdStream(os.dup(reader.stdin.fileno()))
    writer.stdout.close()
    reader.stdin.close()
    moved = 0
    while True:
        with trio.fail_after(DEADLINE):
            data = await src.receive_some(PIECE)
        if not data:
            break
        with trio.fail_after(DEADLINE):
            await dst.send_all(data)
        moved += len(data)
    await dst.aclose()
    await src.aclose()
    reader.wait()
    writer.wait()
    return moved


def measure(way: Callable[[int], Awaitable[int]], size: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) for one body of ``size``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    moved = trio.run(way, size)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if moved != size:
        raise SystemExit(f"{way.__name__} moved {moved} bytes of {size}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


# --- a cluster PUT's fanout (--cluster N) ------------------------------------------

CLUSTER_UUID = "bc1c7e20-0000-4000-8000-00000000c1c7"
GATEWAY_UUID = "bc1c7e20-0000-4000-8000-0000000000a1"
KEY_UUIDS = [f"bc1c7e20-0000-4000-8000-{i:012d}" for i in range(1, 33)]
ZEROS = bytes(1 << 20)


def node_program(uuid: str) -> None:
    """A P2P node on stdin/stdout that takes any PUT and drops its body."""
    out = sys.stdout.buffer
    inp = io.BufferedReader(io.FileIO(0, "r"), buffer_size=1 << 20)  # has read1
    out.write(f"AUTH-SUCCESS {uuid}\n".encode())
    out.flush()
    while line := inp.readline():
        word, _, rest = line.decode().strip().partition(" ")
        if word == "VERSION":
            out.write(f"VERSION {rest}\n".encode())
        elif word == "PUT":
            out.write(b"PUT-FROM 0\n")
        elif word == "DATA":
            left = int(rest)
            while left:
                got = inp.read1(min(left, 1 << 20))
                if not got:
                    return
                left -= len(got)
            continue
        elif word in ("VALID", "INVALID"):
            out.write(b"SUCCESS\n" if word == "VALID" else b"FAILURE\n")
        elif word == "BYPASS":
            continue
        else:
            out.write(b"ERROR unexpected\n")
        out.flush()


def client_program(wfd: int, rfd: int, size: int) -> None:
    """One PUT of ``size`` zeros, written to ``wfd`` (a socket, or a pipe as
    git-annex's stdout), as git-annex would send it; answers read from ``rfd``."""
    reader = os.fdopen(rfd, "rb")

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view) :]

    send(f"AUTH {CLIENT_UUID} {TOKEN}\nVERSION 4\n".encode())
    for expected in (b"AUTH-SUCCESS", b"VERSION"):
        line = reader.readline()
        if not line.startswith(expected):
            raise SystemExit(f"client: {line!r}")
    send(f"PUT bench SHA256E-s{size}--{'ab' * 32}\n".encode())
    if reader.readline() != b"PUT-FROM 0\n":
        raise SystemExit("client: no PUT-FROM 0")
    send(f"DATA {size}\n".encode())
    left = size
    while left:
        n = min(left, len(ZEROS))
        send(ZEROS[:n])
        left -= n
    send(b"VALID\n")
    answer = reader.readline()
    if not answer.startswith(b"SUCCESS"):
        raise SystemExit(f"client: {answer!r}")


class NodeProgram(Transport):
    def __init__(self, name: str, uuid: str) -> None:
        self.name = name
        self.uuid = uuid

    async def open(
        self, nursery: trio.Nursery, session: SessionInfo, version: int, bypass: tuple[str, ...]
    ) -> PeerChannel:
        argv = [*SELF, "--node", self.uuid]
        return await open_process_channel(
            nursery, self.name, argv, CHILD_ENV, self.uuid, version, bypass, auth=None
        )


class AllWant:
    async def locations(self, key: str) -> frozenset[str]:
        return frozenset()

    async def wanted(self, remotes: Sequence[str], key: str, af: str | None) -> Mapping[str, bool]:
        return {r: True for r in remotes}


def client_ends(pipes: bool) -> tuple[trio.abc.Stream, list[int], list[int]]:
    """The session's end, the client's (write, read) descriptors, all to close after."""
    if not pipes:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = theirs.detach()
        return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), [fd, fd], [fd]
    to_r, to_w = os.pipe()  # git-annex's stdout, as git-annex-p2p-torbridge passes it
    from_r, from_w = os.pipe()
    for fd in (to_w, from_w):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIECE)
    control, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = PassedPipes(to_r, from_w, trio.SocketStream(trio.socket.from_stdlib_socket(control)))
    return stream, [to_w, from_r], [to_w, from_r]


def cluster_put(nodes: int, kernel: bool, pipes: bool) -> Callable[[int], Awaitable[int]]:
    async def put(size: int) -> int:
        limits = Limits(stall_timeout=DEADLINE * 4, peer_timeout=DEADLINE * 4)
        refs = [
            ClusterNode(
                c.NodeRef(KEY_UUIDS[i], f"n{i}", 200.0, frozenset()),
                NodeProgram(f"n{i}", KEY_UUIDS[i]),
            )
            for i in range(nodes)
        ]
        transport = ClusterTransport(
            "cl",
            CLUSTER_UUID,
            GATEWAY_UUID,
            refs,
            AllWant(),
            None,
            node_timeout=DEADLINE * 3,
            stall_timeout=DEADLINE * 3,
            rng=random.Random(0),
            members=frozenset(KEY_UUIDS[:nodes]),
            kernel_fanout=kernel,
        )
        endpoint = Endpoint("cl", CLUSTER_UUID, transport, Path("/nonexistent"), OneToken(), limits)
        stream, (wfd, rfd), close = client_ends(pipes)
        client = await trio.lowlevel.open_process(
            [*SELF, "--client", str(wfd), str(rfd), str(size)],
            pass_fds=tuple(close),
            env=CHILD_ENV,
        )
        for fd in close:
            os.close(fd)
        session = Session(stream, endpoint)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            with trio.fail_after(DEADLINE * 20):
                code = await client.wait()
            nursery.cancel_scope.cancel()
        if code != 0:
            raise SystemExit(f"the client failed ({code}); session: {session.outcome}")
        return size

    put.__name__ = "tee" if kernel else "copy"
    return put


def cluster_bench(args: argparse.Namespace) -> None:
    size = args.mib << 20
    n = args.cluster
    pipes = args.client == "pipes"
    ways = {"copy": cluster_put(n, False, pipes), "tee": cluster_put(n, True, pipes)}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    print(
        f"cluster of {n} program nodes, client on {args.client}; {args.mib} MiB per PUT,"
        f" {args.rounds} rounds; {os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    for i in range(args.rounds):
        order = list(ways) if i % 2 == 0 else list(reversed(ways))
        for name in order:
            c_, w_ = measure(ways[name], size)
            cpu[name].append(c_)
            wall[name].append(w_)
    per_gib = (1 << 30) / size
    print(
        f"{'way':6} {'CPU s/GiB':>10} {'per node':>9} {'min-max':>13} {'wall s/GiB':>11}"
        "   (daemon only; medians)"
    )
    for name in ways:
        med = statistics.median(cpu[name]) * per_gib
        lo, hi = min(cpu[name]) * per_gib, max(cpu[name]) * per_gib
        print(
            f"{name:6} {med:10.3f} {med / n:9.3f} {lo:6.2f}-{hi:<6.2f}"
            f" {statistics.median(wall[name]) * per_gib:11.2f}"
        )
    ratio = statistics.median(cpu["tee"]) / statistics.median(cpu["copy"])
    rounds = " ".join(f"{t / c_:.2f}" for t, c_ in zip(cpu["tee"], cpu["copy"], strict=True))
    print(f"tee / copy CPU: {ratio:.2f} (per round: {rounds})")
    print(
        f"RESULT nodes={n} client={args.client} cpu_ratio={ratio:.3f} copy_cpu_s_per_gib_node="
        f"{statistics.median(cpu['copy']) * per_gib / n:.3f} tee_cpu_s_per_gib_node="
        f"{statistics.median(cpu['tee']) * per_gib / n:.3f}"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--node":
        node_program(sys.argv[2])
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--client":
        client_program(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size (default 1024)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="a cluster PUT's fanout to N nodes instead of the single path",
    )
    parser.add_argument(
        "--client",
        choices=("socket", "pipes"),
        default="socket",
        help="--cluster: the client on a unix socket (tor) or on pipes (git-annex-p2p-torbridge)",
    )
    args = parser.parse_args()
    if args.cluster:
        cluster_bench(args)
        return
    size = args.mib << 20
    ways: dict[str, Callable[[int], Awaitable[int]]] = {"copy": by_copy, "splice": by_splice}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    print(f"{args.mib} MiB per body, {args.rounds} rounds; load average {os.getloadavg()}")
    for i in range(args.rounds):
        order = list(ways) if i % 2 == 0 else list(reversed(ways))  # alternate who goes first
        for name in order:
            c, w = measure(ways[name], size)
            cpu[name].append(c)
            wall[name].append(w)
    per_gib = (1 << 30) / size
    print(f"{'way':8} {'CPU s/GiB':>10} {'wall s/GiB':>11}   (medians)")
    for name in ways:
        print(
            f"{name:8} {statistics.median(cpu[name]) * per_gib:10.3f}"
            f" {statistics.median(wall[name]) * per_gib:11.3f}"
        )
    ratio = statistics.median(cpu["splice"]) / statistics.median(cpu["copy"])
    rounds = " ".join(f"{s / c:.2f}" for s, c in zip(cpu["splice"], cpu["copy"], strict=True))
    print(f"splice / copy CPU: {ratio:.2f} (per round: {rounds})")
    print(
        f"RESULT cpu_ratio={ratio:.3f} copy_cpu_s_per_gib="
        f"{statistics.median(cpu['copy']) * per_gib:.3f} splice_cpu_s_per_gib="
        f"{statistics.median(cpu['splice']) * per_gib:.3f}"
    )


if __name__ == "__main__":
    main()
