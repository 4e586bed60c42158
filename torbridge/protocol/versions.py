"""What each version of git-annex's P2P protocol supports: the one table.

A conversation starts at version 0; a client's ``VERSION n`` is answered
with ``min(n, the server's maximum)`` and from then on both sides speak
that version (P2P/Protocol.hs). Every "from protocol version N" decision in
torbridge asks ``supports`` rather than comparing numbers, so what a
version means is written here once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

DEFAULT_VERSION: Final = 0
"""The version of a conversation in which no VERSION was exchanged."""

MAX_VERSION: Final = 4
"""Highest protocol version torbridge (and git-annex 10.20261026) speaks."""


class Feature(enum.Enum):
    """A part of the protocol that not every version has."""

    VALIDITY = "VALID or INVALID after a DATA body"
    BYPASS = "BYPASS (the UUIDs a proxied request must not loop through)"
    PLUS = "the -PLUS answers (ALREADY-HAVE-PLUS, SUCCESS-PLUS, FAILURE-PLUS)"
    CLOCK = "the repository's clock: GETTIMESTAMP and REMOVE-BEFORE"
    DATA_PRESENT = "DATA-PRESENT (the content is at the server already)"


SINCE: Final[Mapping[Feature, int]] = {
    Feature.VALIDITY: 1,
    Feature.BYPASS: 2,
    Feature.PLUS: 2,
    Feature.CLOCK: 3,
    Feature.DATA_PRESENT: 4,
}
"""The first protocol version with each feature."""


def supports(version: int, feature: Feature) -> bool:
    """Whether a conversation at ``version`` has ``feature``."""
    return version >= SINCE[feature]


def agreed(asked: int, server_max: int = MAX_VERSION) -> int:
    """The version a server at ``server_max`` answers to ``VERSION asked``."""
    return min(asked, server_max)


def without(version: int, feature: Feature) -> int:
    """The highest version up to ``version`` that lacks ``feature``.

    For a peer known to mishandle a feature (transport/process.py's special
    remotes and VALID): ask it for this version instead.
    """
    return min(version, SINCE[feature] - 1)
