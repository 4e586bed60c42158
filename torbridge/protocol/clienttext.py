"""What a client may be told when something behind the bridge fails.

The client learns what failed in its own terms ("node1: unreachable",
"cluster: no node stored it"), never how the bridge reaches it: no onion
address, no token, no path on the proxy host. The detail (the exception's
text, the SOCKS error, the node's own words) goes to the operator's log
and nowhere else. docs/security.md lists what a client can learn.
"""

from __future__ import annotations

import re

from torbridge.protocol import messages as m

# The words the bridge itself uses for a failed peer; nothing else of a
# cause reaches the client (an exception's text may name an onion, a path).
UNREACHABLE = "unreachable"
CONNECTION_LOST = "connection lost"
PROTOCOL_ERROR = "protocol error"
FIXED_REASONS = frozenset(
    {
        "closed inside a DATA body",
        "connection closed",
        "connection lost",
        "connection lost during transfer",
        "line over the limit",
        "no message before the deadline",
        "no answer before the deadline",
        "not reading",
        "peer closed the connection",
        "stalled inside a DATA body",
        UNREACHABLE,
    }
)

# A node's own ERROR text is passed on only when it is plainly one of
# git-annex's own words: short, printable, and naming no path, address or
# URL (git-annex puts an exception's text, with the node's paths, in some).
_MAX_RELAYED = 200
_INTERNALS = re.compile(r"[/\\@]|\.onion\b|::|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+|[a-z]+:[0-9]")


# The relay's own words for a peer out of step: message types only.
_OUT_OF_STEP = re.compile(r"protocol error: unexpected [A-Za-z]+ (to|after) [A-Za-z]+")


def peer_reason(reason: str) -> str:
    """The part of an I/O layer's ``reason`` a client may hear."""
    if reason in FIXED_REASONS or _OUT_OF_STEP.fullmatch(reason):
        return reason
    if reason.startswith(PROTOCOL_ERROR):
        return PROTOCOL_ERROR
    return CONNECTION_LOST


def relayable(text: str) -> bool:
    """Whether a peer's ERROR text may reach the client as it is."""
    return len(text) <= _MAX_RELAYED and text.isprintable() and _INTERNALS.search(text) is None


def relayed_error(peer: str, error: m.Error) -> m.Error:
    """A peer's ERROR as the client hears it: as it is, or that ``peer`` failed."""
    if relayable(error.text):
        return error
    return m.Error(f"{peer}: failed (the gateway's log has the details)")
