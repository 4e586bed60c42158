#!/usr/bin/env python3
"""Scale-out benchmark: two bridge hosts behind one Onionbalance frontend.

One private Tor network (3 authorities + 4 relays), the world of
tests/tor/balanceworld.py (hosts A and B gateways of one cluster of two
path nodes, stock git-annex clients in a private namespace, each
connection on circuits of its own). In ONE run it reports:

* time from Onionbalance's start to the first connection through the
  frontend, and to both instances reached;
* copy throughput of ``--clients`` stock clients copying ``--mib`` MiB
  each at once (``git annex copy --to cl``), with 2 instances, then with
  instance B's tor stopped (1 instance), and the sessions each instance
  served in each phase.

On one machine every tor shares the same cores, so the 2-instance figure
shows the spread and its cost, not the gain of two machines.

    python bench/bench_balance.py                  # 3 clients x 5 MiB
    python bench/bench_balance.py --clients 4 --mib 10
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.harness import Client  # noqa: E402
from tests.tor.balanceworld import ENDPOINT, BalanceWorld  # noqa: E402
from tests.tor.torpath import leftovers, netns_unavailable  # noqa: E402
from torbridge.testnet import ONIONBALANCE_MIN_HSDIRS, TestNet  # noqa: E402

MIB = 1024 * 1024
TIMEOUT = 1800.0


def _copy_all(clients: list[Client], tag: str, mib: int) -> dict[str, float]:
    for i, c in enumerate(clients):
        c.add_file(f"{tag}-{i}.bin", os.urandom(mib * MIB))
    errors: list[str] = []

    def one(c: Client, i: int) -> None:
        result = c.annex("copy", "--to", ENDPOINT, f"{tag}-{i}.bin", check=False,
                         timeout=TIMEOUT)
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
    total = len(clients) * mib
    return {"seconds": round(seconds, 1), "MiB": total, "MiB/s": round(total / seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--mib", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, object] = {"clients": args.clients, "MiB each": args.mib}
    with tempfile.TemporaryDirectory(prefix="tb-bench-balance-") as tmp, TestNet(
        progress=logging.info, relays=ONIONBALANCE_MIN_HSDIRS - 3
    ) as net:
        net.start()
        world = BalanceWorld(net, Path(tmp), clients=args.clients, progress=logging.info)
        try:
            result["first connection through the frontend (s)"] = round(
                world.timings["first connection"], 1)
            result["both instances reached (s)"] = round(world.timings["both instances"], 1)
            clients = []
            for i in range(args.clients):
                c = world.client(f"client{i}")
                c.link(world.tokens[f"client{i}"], ENDPOINT, timeout=TIMEOUT)
                c.annex("pull", "--no-content", ENDPOINT, timeout=TIMEOUT)
                clients.append(c)
            a, b = world.bridges["A"], world.bridges["B"]
            before = (a.sessions(), b.sessions())
            result["2 instances"] = _copy_all(clients, "two", args.mib)
            result["2 instances: sessions A, B"] = [a.sessions() - before[0],
                                                    b.sessions() - before[1]]
            world.stop_instance("B")
            before = (a.sessions(), b.sessions())
            result["1 instance"] = _copy_all(clients, "one", args.mib)
            result["1 instance: sessions A, B"] = [a.sessions() - before[0],
                                                   b.sessions() - before[1]]
        finally:
            world.close()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    left = leftovers()
    if left:
        print("left behind: " + "; ".join(left), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
