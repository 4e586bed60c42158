"""The one table of what each P2P protocol version supports (protocol/versions.py)."""

from __future__ import annotations

import pytest

from torbridge.protocol import messages as m
from torbridge.protocol import versions as v
from torbridge.protocol.versions import Feature


@pytest.mark.parametrize(
    ("version", "has"),
    [
        (0, set()),
        (1, {Feature.VALIDITY}),
        (2, {Feature.VALIDITY, Feature.BYPASS, Feature.PLUS}),
        (3, {Feature.VALIDITY, Feature.BYPASS, Feature.PLUS, Feature.CLOCK}),
        (4, set(Feature)),
    ],
)
def test_what_each_version_has(version: int, has: set[Feature]) -> None:
    """As P2P/Protocol.hs: VALID from 1, BYPASS and -PLUS from 2, the clock
    from 3, DATA-PRESENT from 4."""
    assert {f for f in Feature if v.supports(version, f)} == has


def test_every_feature_has_a_version() -> None:
    assert set(v.SINCE) == set(Feature)
    assert max(v.SINCE.values()) == v.MAX_VERSION == m.MAX_VERSION


@pytest.mark.parametrize(
    ("asked", "server", "agreed"), [(4, 4, 4), (9, 4, 4), (1, 4, 1), (4, 2, 2)]
)
def test_agreed_is_the_lower(asked: int, server: int, agreed: int) -> None:
    assert v.agreed(asked, server) == agreed


def test_without() -> None:
    assert v.without(1, Feature.VALIDITY) == 0
    assert v.without(4, Feature.CLOCK) == 2
    assert v.without(1, Feature.CLOCK) == 1
