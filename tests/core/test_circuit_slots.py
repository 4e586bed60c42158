"""Which SOCKS credentials (and so which tor circuit) a stream to a node gets."""

from __future__ import annotations

from torbridge.transport.network import CircuitSlots


def test_parallel_streams_spread_and_sequential_ones_reuse_the_first() -> None:
    slots = CircuitSlots(4)
    first = slots.take()
    slots.give_back(first)
    assert slots.take() == first == 0  # one after another: the same circuit
    taken = [slots.take() for _ in range(3)]  # while the first is open
    assert sorted([0, *taken]) == [0, 1, 2, 3]
    assert slots.take() == 0  # more than 4: share, the least loaded first
    slots.give_back(2)
    assert slots.take() == 2
    names = {slots.credentials(i)[0] for i in range(4)}
    assert len(names) == 4 and all(n.startswith(slots.prefix) for n in names)
    assert CircuitSlots(4).prefix != slots.prefix  # per daemon


def test_one_slot_means_one_circuit() -> None:
    slots = CircuitSlots(1)
    assert [slots.take() for _ in range(3)] == [0, 0, 0]
    assert CircuitSlots(0).busy == [0]
