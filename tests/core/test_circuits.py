"""tor's exported circuit ids: the PROXY line, per-circuit caps and AUTH backoff."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol.proxyline import ProxyLineError, parse_proxy_line
from torbridge.server.admission import CircuitGuard

# TORBRIDGE_FUZZ_SCALE multiplies the examples (tests/fuzz.py).
PROPS = settings(
    max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# What tor 0.4.x writes for circuit 0x0000002a to virtual port 5000.
TOR_LINE = b"PROXY TCP6 fc00:dead:beef:4dad::0:2a ::1 65535 5000\r\n"


def test_tor_line_gives_the_circuit_and_its_length() -> None:
    line = parse_proxy_line(TOR_LINE + b"AUTH u t\n")
    assert line is not None
    assert line.circuit == 42
    assert (TOR_LINE + b"AUTH u t\n")[line.length :] == b"AUTH u t\n"


def test_highest_circuit_id() -> None:
    line = parse_proxy_line(b"PROXY TCP6 fc00:dead:beef:4dad::ffff:ffff ::1 65535 1\r\n")
    assert line is not None and line.circuit == 0xFFFFFFFF


@pytest.mark.parametrize("cut", range(len(TOR_LINE) - 1))
def test_a_partial_line_needs_more(cut: int) -> None:
    assert parse_proxy_line(TOR_LINE[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"AUTH 1234 abc\n",  # a client talking first: not tor's stream
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 2001:db8::1 ::1 65535 5000\r\n",  # not tor's circuit prefix
        b"PROXY TCP6 fc00:dead:beef:4dad::0:2a ::1 65535\r\n",
        b"PROXY TCP6 nonsense ::1 65535 5000\r\n",
        b"PROXY " + b"x" * 200,
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyLineError):
        parse_proxy_line(data)


@PROPS
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_refuse(data: bytes) -> None:
    with contextlib.suppress(ProxyLineError):
        parse_proxy_line(data)


def test_cap_per_circuit() -> None:
    guard = CircuitGuard(max_per_circuit=2)
    assert guard.admit(7, 0.0) is None
    assert guard.admit(7, 0.0) is None
    assert guard.admit(7, 0.0) is not None  # the third from the same circuit
    assert guard.admit(8, 0.0) is None  # another circuit is not affected
    guard.leave(7)
    assert guard.admit(7, 0.0) is None


def test_failed_auth_backs_off_doubling_until_success() -> None:
    guard = CircuitGuard(max_per_circuit=8, backoff_start=1.0, backoff_max=10.0)
    guard.auth_failed(5, now=100.0)
    assert guard.admit(5, 100.5) is not None
    assert guard.admit(5, 101.0) is None
    guard.leave(5)
    guard.auth_failed(5, now=101.0)  # second failure: 2 s
    assert guard.admit(5, 102.5) is not None
    for _ in range(10):
        guard.auth_failed(5, now=103.0)
    assert guard.admit(5, 112.9) is not None  # capped at backoff_max
    assert guard.admit(5, 113.0) is None
    guard.auth_succeeded(5)
    guard.leave(5)
    guard.auth_failed(5, now=200.0)  # counting starts again after a success
    assert guard.admit(5, 201.0) is None


def test_memory_stays_bounded_under_many_circuits() -> None:
    guard = CircuitGuard(max_per_circuit=1, backoff_start=1000.0)
    for circuit in range(CircuitGuard.MAX_TRACKED * 2):
        guard.auth_failed(circuit, now=0.0)
    assert len(guard.blocked_until) <= CircuitGuard.MAX_TRACKED
    assert len(guard.failures) <= CircuitGuard.MAX_TRACKED + 1
