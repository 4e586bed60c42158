"""``torbridge testnet``: a private network, one client tor and one service
tor, until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from torbridge.testnet.network import TestNet
from torbridge.testnet.torrc_safety import TorTestNetError


class _Interrupted(Exception):
    pass


def cli_main(directory: Path | None, relays: int = 2) -> int:
    """Bring up the network, one client tor and one service tor; print
    ``socks=``, ``control=`` (the service tor's) and ``cookie=`` lines; run
    until SIGINT/SIGTERM, then tear everything down. ``relays``: besides
    the three authorities (every one an HSDir); Onionbalance needs 7 HSDirs
    in all, so 4 for a balanced service (docs/scale-out.md)."""

    def progress(message: str) -> None:
        print(f"testnet: {message}", file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        for s in handlers:  # a second Ctrl-C must not cut the teardown short
            signal.signal(s, signal.SIG_IGN)
        raise _Interrupted

    logging.getLogger("stem").setLevel(logging.WARNING)  # it logs every command at DEBUG
    handlers = [signal.SIGINT, signal.SIGTERM]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in handlers} if main_thread else {}
    for s in previous:
        signal.signal(s, interrupt)
    try:
        with TestNet(directory, progress=progress, relays=relays) as net:
            net.start()
            client = net.start_client("client")
            service = net.start_service_tor("service")
            print(f"socks={client.socks}", flush=True)
            print(f"control={service.control}", flush=True)
            print(f"cookie={service.cookie_path}", flush=True)
            progress("ready; Ctrl-C (or SIGTERM) stops the network")
            while True:
                net.check()
                time.sleep(1)
    except _Interrupted:
        return 0  # stop() has run and said so
    except TorTestNetError as e:
        progress(f"error: {e}")
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
