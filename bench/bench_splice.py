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

    python bench/bench_splice.py                 # 1 GiB, 5 rounds
    python bench/bench_splice.py --mib 256 --rounds 3

Prints a table and a ``RESULT`` line: ``cpu_ratio`` = splice CPU / copy CPU
(below 1: splice is cheaper).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torbridge.transport import splice

PIECE = 256 * 1024
DEADLINE = 30.0


def _pipes(size: int) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    writer = subprocess.Popen(
        ["dd", "if=/dev/zero", f"bs={PIECE}", f"count={size // PIECE}", "status=none"],
        stdout=subprocess.PIPE,
    )
    reader = subprocess.Popen(["dd", "of=/dev/null", f"bs={PIECE}", "status=none"],
                              stdin=subprocess.PIPE)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size (default 1024)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
        print(f"{name:8} {statistics.median(cpu[name]) * per_gib:10.3f}"
              f" {statistics.median(wall[name]) * per_gib:11.3f}")
    ratio = statistics.median(cpu["splice"]) / statistics.median(cpu["copy"])
    rounds = " ".join(f"{s / c:.2f}" for s, c in zip(cpu["splice"], cpu["copy"], strict=True))
    print(f"splice / copy CPU: {ratio:.2f} (per round: {rounds})")
    print(f"RESULT cpu_ratio={ratio:.3f} copy_cpu_s_per_gib="
          f"{statistics.median(cpu['copy']) * per_gib:.3f} splice_cpu_s_per_gib="
          f"{statistics.median(cpu['splice']) * per_gib:.3f}")


if __name__ == "__main__":
    main()
