#!/usr/bin/env python3
"""Scale-out benchmark: two bridge hosts behind one Onionbalance frontend.

One private Tor network (3 authorities + 4 relays), the world of
tests/harness/balanceworld.py (hosts A and B gateways of one cluster of two
path nodes, stock git-annex clients in a private namespace, each
connection on circuits of its own). In ONE run it reports:

* time from Onionbalance's start to the first connection through the
  frontend, and to both instances reached;
* copy throughput of ``--clients`` stock clients copying ``--files``
  files of ``--mib`` MiB each at once (one ``git annex copy --to cl``, so
  one connection, per file), with 2 instances, then with
  instance B's tor stopped (1 instance), and the sessions each instance
  served in each phase;
* after B's tor stopped, when each client's attempts to copy a small file
  ended (a first attempt can wait for tor's SocksTimeout), before the
  1-instance throughput is measured.

With ``--window`` it measures instead how long the introduction points of
a stopped instance still ACK introductions (B's tor SIGTERM, A's SIGKILL,
connections to each instance's own onion at offsets after the stop).

On one machine every tor shares the same cores, so the 2-instance figure
shows the spread and its cost, not the gain of two machines.

    python -m bench.bench_balance                  # 3 clients x 4 files x 4 MiB
    python -m bench.bench_balance --clients 4 --files 2 --mib 10
    python -m bench.bench_balance --stop kill      # B's tor gets SIGKILL
    python -m bench.bench_balance --window         # introduction points after a stop
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.harness.annex import Client
from tests.harness.balanceworld import ENDPOINT, BalanceWorld
from tests.harness.tor import leftovers, netns_unavailable
from torbridge.testnet import ONIONBALANCE_MIN_HSDIRS, TestNet

MIB = 1024 * 1024
TIMEOUT = 1800.0


def _copy_all(clients: list[Client], tag: str, mib: int, files: int) -> dict[str, float]:
    """Every client copies ``files`` files of ``mib`` MiB, one ``git annex
    copy`` (so one connection, on circuits of its own) per file, the
    clients at once."""
    for i, c in enumerate(clients):
        for f in range(files):
            c.add_file(f"{tag}-{i}-{f}.bin", os.urandom(mib * MIB))
    errors: list[str] = []

    def one(c: Client, i: int) -> None:
        for f in range(files):
            result = c.annex(
                "copy", "--to", ENDPOINT, f"{tag}-{i}-{f}.bin", check=False, timeout=TIMEOUT
            )
            if not result.ok:
                errors.append(result.describe())

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    if errors:
        raise RuntimeError("a copy failed:\n" + "\n".join(errors))
    total = len(clients) * files * mib
    return {"seconds": round(seconds, 1), "MiB": total, "MiB/s": round(total / seconds, 2)}


def _until_through(clients: list[Client], tag: str) -> list[list[float]]:
    """Each client copies a small file, all at once, retrying until its copy
    goes through; per client, the seconds (since the call) at which each
    attempt ended. After an instance stopped, a client's first attempt can
    hang until tor's SocksTimeout (docs/scale-out.md)."""
    for i, c in enumerate(clients):
        c.add_file(f"{tag}-{i}.bin", os.urandom(50_000))
    ends: list[list[float]] = [[] for _ in clients]
    t0 = time.monotonic()

    def one(c: Client, i: int) -> None:
        while time.monotonic() - t0 < TIMEOUT:
            r = c.annex("copy", "--to", ENDPOINT, f"{tag}-{i}.bin", check=False, timeout=TIMEOUT)
            ends[i].append(round(time.monotonic() - t0, 1))
            if r.ok:
                return

    threads = [threading.Thread(target=one, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ends


WINDOW_OFFSETS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def _intro_window(world: BalanceWorld) -> dict[str, list[list[object]]]:
    """How long the stopped instances' introduction points still ACK:
    B's tor gets SIGTERM and A's SIGKILL at the same moment, then a probe
    to each instance's OWN onion (no other instance to fall over to) is
    started at each offset, on circuits of its own. A probe that gets an
    ACK hangs until tor gives up on the rendezvous; one that gets a NACK
    fails at once."""
    onions = {name: bridge.onion for name, bridge in world.bridges.items()}
    for name, onion in onions.items():  # both descriptors fetched, both alive
        _took, answer = world.probe_outcome(onion, f"pre{name}", timeout=120)
        if answer != "AUTH-SUCCESS":
            raise RuntimeError(f"instance {name} not reachable before the stop: {answer}")
    t0 = time.monotonic()
    world.stop_instance("B")
    world.stop_instance("A", kill=True)
    rows: dict[str, list[list[object]]] = {"SIGTERM (B)": [], "SIGKILL (A)": []}
    lock = threading.Lock()

    def one(name: str, row: str, offset: float) -> None:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        took, answer = world.probe_outcome(onions[name], f"w{name}{offset}", timeout=300)
        with lock:
            rows[row].append([offset, round(took, 1), answer])

    threads = [
        threading.Thread(target=one, args=(name, row, off))
        for off in WINDOW_OFFSETS
        for name, row in (("B", "SIGTERM (B)"), ("A", "SIGKILL (A)"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {row: sorted(r, key=lambda x: float(str(x[0]))) for row, r in rows.items()}


def _throughput(world: BalanceWorld, args: argparse.Namespace, result: dict[str, object]) -> None:
    """The copy phases of the module docstring, into ``result``."""
    clients = []
    for i in range(args.clients):
        c = world.client(f"client{i}")
        c.link(world.tokens[f"client{i}"], ENDPOINT, timeout=TIMEOUT)
        c.annex("pull", "--no-content", ENDPOINT, timeout=TIMEOUT)
        clients.append(c)
    a, b = world.bridges["A"], world.bridges["B"]
    names = [f"client{i}" for i in range(args.clients)]

    def served() -> tuple[int, int]:  # client sessions (not B's relays and syncs)
        return (sum(a.session_starts(n) for n in names), sum(b.session_starts(n) for n in names))

    before = served()
    result["2 instances"] = _copy_all(clients, "two", args.mib, args.files)
    after = served()
    result["2 instances: client sessions A, B"] = [after[0] - before[0], after[1] - before[1]]
    world.stop_instance("B", kill=args.stop == "kill")
    result["B stopped by"] = "SIGKILL" if args.stop == "kill" else "SIGTERM"
    result["B stopped: each client's copy attempts ended at (s)"] = _until_through(
        clients, "probe-after-stop"
    )
    before = served()
    result["1 instance"] = _copy_all(clients, "one", args.mib, args.files)
    after = served()
    result["1 instance: client sessions A, B"] = [after[0] - before[0], after[1] - before[1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--files", type=int, default=4, help="files per client and phase")
    ap.add_argument("--mib", type=int, default=4, help="MiB per file")
    ap.add_argument(
        "--stop",
        choices=("term", "kill"),
        default="term",
        help="how instance B's tor is stopped before the 1-instance phase",
    )
    ap.add_argument(
        "--window",
        action="store_true",
        help="instead: how long a stopped instance's introduction points still ACK",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, object] = {
        "clients": args.clients,
        "files each": args.files,
        "MiB per file": args.mib,
        "load average at start": os.getloadavg()[0],
    }
    with (
        tempfile.TemporaryDirectory(prefix="tb-bench-balance-") as tmp,
        TestNet(progress=logging.info, relays=ONIONBALANCE_MIN_HSDIRS - 3) as net,
    ):
        net.start()
        world = BalanceWorld(net, Path(tmp), clients=args.clients, progress=logging.info)
        try:
            result["first connection through the frontend (s)"] = round(
                world.timings["first connection"], 1
            )
            result["both instances reached (s)"] = round(world.timings["both instances"], 1)
            if args.window:
                result["probe to the stopped instance's own onion: [offset s, took s, answer]"] = (
                    _intro_window(world)
                )
            else:
                _throughput(world, args, result)
        finally:
            world.close()
    return _report(result, args.json)


def _report(result: dict[str, object], path: Path | None) -> int:
    print(json.dumps(result, indent=1))
    if path:
        path.write_text(json.dumps(result, indent=1))
    left = leftovers()
    if left:
        print("left behind: " + "; ".join(left), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
