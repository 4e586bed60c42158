"""The PROXY v1 line tor prepends with ``HiddenServiceExportCircuitID haproxy``.

tor writes ``PROXY TCP6 fc00:dead:beef:4dad::AABB:CCDD ::1 65535 PORT\\r\\n``
before a stream's first byte; the low 32 bits of the source address are the
id of the rendezvous circuit the client came in on: the only per-client key
an onion service has, used for connection caps and failed-AUTH backoff.
Parsing only, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_PROXY_LINE = 107  # the PROXY v1 limit, CRLF included
_PREFIX = ipaddress.IPv6Network("fc00:dead:beef:4dad::/96")


class ProxyLineError(ValueError):
    pass


@dataclass(frozen=True)
class ProxyLine:
    circuit: int
    length: int  # bytes of the line, CRLF included


def parse_proxy_line(data: bytes) -> ProxyLine | None:
    """The PROXY line at the start of ``data``; None if more bytes are needed.

    Raises ProxyLineError if the stream does not start with one tor wrote.
    """
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= MAX_PROXY_LINE or not b"PROXY ".startswith(data[:6]):
            raise ProxyLineError("stream does not start with a PROXY line")
        return None
    if end + 2 > MAX_PROXY_LINE:
        raise ProxyLineError("PROXY line too long")
    fields = data[:end].split(b" ")
    if len(fields) != 6 or fields[0] != b"PROXY" or fields[1] != b"TCP6":
        raise ProxyLineError("not a PROXY TCP6 line")
    try:
        source = ipaddress.IPv6Address(fields[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyLineError("bad source address in PROXY line") from None
    if source not in _PREFIX:
        raise ProxyLineError("PROXY source address is not tor's circuit-id prefix")
    return ProxyLine(int(source) & 0xFFFFFFFF, end + 2)
