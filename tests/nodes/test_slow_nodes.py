"""A node silent before it answers is waited for, as git-annex waits (issue 11, item 2).

A node that hashes a big file says nothing until it is done: the bridge,
with its default deadlines, must wait for it. The node's remotedaemon is
frozen (SIGSTOP, by the relay carrying its connection, tbnode.py) at the
line after which it would work quietly, and thawed ``SILENT`` seconds
later; the daemon runs with each deadline it applies by default scaled
down to ``SHORT`` (tests/e2e/test_slow_peers.py). The stock client's copy
and get complete, and the bytes are the same.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.e2e.test_slow_peers import SHORT, SILENT, scaled_defaults
from tests.harness.client import p2p_errors
from tests.harness.nodes import Setup, wait_location

pytestmark = pytest.mark.annex

MiB = 1024 * 1024
BIG = 8 * MiB
BOUND = 120.0


@contextmanager
def silent_node(s: Setup, **trigger: object) -> Iterator[list[float]]:
    """The node freezes when ``trigger`` passes and is thawed SILENT seconds later.

    Yields a list that gets the length of the silence, once it is over.
    """
    assert s.node.server is not None
    pid = s.node.server.pid
    s.net.set_fault(s.node.name, kill=pid, signal=int(signal.SIGSTOP), stop=False, **trigger)
    done = threading.Event()
    silence: list[float] = []

    def thaw() -> None:
        while not s.net.fired(s.node.name) and not done.wait(0.05):
            pass
        began = time.monotonic()
        done.wait(SILENT)
        os.kill(pid, signal.SIGCONT)
        silence.append(time.monotonic() - began)

    thread = threading.Thread(target=thaw, daemon=True)
    thread.start()
    try:
        yield silence
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


def test_node_silent_before_its_put_result(setup_node: Callable[..., Setup]) -> None:
    """The whole body and VALID are with the node; its SUCCESS comes SILENT s later."""
    s = setup_node("p2p", limits=scaled_defaults())
    data = os.urandom(BIG - 1) + b"\n"  # so that VALID starts a line the relay finds
    s.client.add_file("big", data)
    key = s.client.key("big")
    with silent_node(s, up_line="VALID") as silence:
        copy = s.client.annex(
            "copy", "--to", s.remote, "--debug", "big", check=False, timeout=BOUND
        )
    print(f"\nnode silent {silence[0]:.1f}s after VALID (bridge limits {scaled_defaults()})")
    assert s.net.fired(s.node.name)
    assert silence[0] >= SILENT > SHORT
    assert copy.ok and not p2p_errors(copy), copy.describe()
    s.node.assert_sound()
    s.node.assert_holds({key: data})
    wait_location(s.proxy, key, s.node.uuid, present=True)


def test_node_silent_before_its_data(setup_node: Callable[..., Setup]) -> None:
    """GET: the node says nothing for SILENT s before DATA."""
    s = setup_node("p2p", limits=scaled_defaults())
    data = os.urandom(BIG)
    s.client.add_file("big", data)
    s.client.annex("copy", "--to", s.remote, "big", timeout=BOUND)
    s.client.annex("drop", "big")
    with silent_node(s, up_line="GET ") as silence:
        get = s.client.annex(
            "get", "--from", s.remote, "--debug", "big", check=False, timeout=BOUND
        )
    print(f"\nnode silent {silence[0]:.1f}s before DATA")
    assert s.net.fired(s.node.name)
    assert silence[0] >= SILENT
    assert get.ok and not p2p_errors(get), get.describe()
    assert s.client.read("big") == data
