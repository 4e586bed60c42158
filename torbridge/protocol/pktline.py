"""git's pkt-line framing, as far as the bridge reads it: no I/O.

During CONNECT the bridge passes git's smart protocol through untouched
(server/gitservice.py carries the bytes); this is what it knows of them:
where git's output stands in packets, so that a git that dies mid-stream
can be told to the client in git's own terms, and whether a push asked
for side-band.
"""

from __future__ import annotations

CAPS_WINDOW = 4096  # bytes of a push request searched for its capabilities


def pkt_line(text: str | bytes) -> bytes:
    payload = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return b"%04x" % (len(payload) + 4) + payload


class PktStream:
    """Where git's output stands in pkt-lines, so that a failure can be told in git's terms.

    upload-pack and receive-pack write nothing but pkt-lines (in the pack
    phase, side-band packets: a first payload byte of 1, 2 or 3). When git
    dies in the middle of that, a client given only the truncated stream
    waits for the rest forever (git fetch does, and git-annex's helper with
    it); a complete packet, then an error message on the channel the
    client reads, ends it with "remote error: ...".
    """

    def __init__(self) -> None:
        self._header = b""  # the 4 hex digits of the packet under way, as far as seen
        self._remaining = 0  # payload bytes of the packet under way not seen yet
        self._first = True  # the next byte is the first one of a payload
        self.sideband = False  # the last payload started with a side-band number
        # receive-pack answers a push that asked for side-band in side-band,
        # though all it sent before (the ref advertisement) was plain.
        self.client_asked_sideband = False
        self._request_head = b""  # the start of a push request, where its capabilities are

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                if self._first:
                    self.sideband = view[0] in (1, 2, 3)
                    self._first = False
                n = min(self._remaining, len(view))
                self._remaining -= n
                view = view[n:]
                continue
            n = min(4 - len(self._header), len(view))
            self._header += bytes(view[:n])
            view = view[n:]
            if len(self._header) == 4:
                try:
                    length = int(self._header, 16)
                except ValueError:
                    length = 0  # not pkt-lines after all: nothing sensible to complete
                self._header = b""
                self._remaining = max(0, length - 4)
                self._first = True

    def client_wrote(self, data: bytes) -> None:
        """The next bytes of the client's push request (receive-pack's input).

        Its capabilities are on its first command line: whether it asked
        for side-band is looked for in its first ``CAPS_WINDOW`` bytes.
        """
        if len(self._request_head) < CAPS_WINDOW:
            self._request_head += data[: CAPS_WINDOW - len(self._request_head)]
            self.client_asked_sideband = b"side-band" in self._request_head

    def failure_tail(self, message: str) -> bytes:
        """Bytes that complete the packet under way, then say ``message`` as an error."""
        tail = b""
        if self._header:  # "1" becomes a 4096-byte packet, "0".."000" a flush
            tail = b"0" * (4 - len(self._header))
            self.feed(tail)
        if self._remaining:
            tail += bytes(self._remaining)  # its content is lost anyway
            self._remaining = 0
        if self.sideband or self.client_asked_sideband:
            return tail + pkt_line(b"\x03" + message.encode("utf-8", "replace") + b"\n")
        return tail + pkt_line(f"ERR {message}\n")
