"""Byte transcripts of opening a peer (torbridge/protocol/handshake.py).

Each test plays the peer's side as the bytes it writes, decoded as a
transport decodes them, and checks the exact bytes the bridge writes and
the version it ends at, or the text its refusal carries. The order is
git-annex's own client's (P2P/Protocol.hs: AUTH, VERSION, then BYPASS
from version 2 on).
"""

from __future__ import annotations

import pytest

from torbridge.protocol import messages as m
from torbridge.protocol.framing import Chunk, Decoder, NeedData
from torbridge.protocol.handshake import Handshake, HandshakeFailed

NAME = "node1"
PEER_UUID = "11111111-2222-4333-8444-555555555555"
OTHER_UUID = "66666666-7777-4888-9999-000000000000"
BRIDGE_UUID = "a0a0a0a0-0000-4000-8000-000000000001"
TOKEN = "0123456789abcdef" * 8
AUTH = m.Auth(BRIDGE_UUID, TOKEN)
LOOP_UUID = "c11e4700-1111-4111-8111-111111111111"


def converse(handshake: Handshake, peer_writes: bytes, eof: bool = False) -> bytes:
    """Drive ``handshake`` as a transport does; the bytes the bridge wrote."""
    decoder = Decoder()
    decoder.feed(peer_writes)
    if eof:
        decoder.feed_eof()
    wrote = b"".join(m.serialise(x) for x in handshake.start())
    while not handshake.done:
        event = decoder.next_event()
        assert not isinstance(event, NeedData), "the bridge waits for more than the peer said"
        assert not isinstance(event, Chunk)
        wrote += b"".join(m.serialise(x) for x in handshake.receive(event))
    assert not isinstance(decoder.next_event(), m.Message), "the peer's later lines were read"
    return wrote


def test_token_then_version() -> None:
    h = Handshake(NAME, PEER_UUID, 4, (), AUTH)
    wrote = converse(h, f"AUTH-SUCCESS {PEER_UUID}\nVERSION 4\n".encode())
    assert wrote == f"AUTH {BRIDGE_UUID} {TOKEN}\nVERSION 4\n".encode()
    assert h.agreed == 4


def test_git_annex_shell_speaks_first() -> None:
    """git-annex-shell p2pstdio greets unasked: no AUTH is sent."""
    h = Handshake(NAME, PEER_UUID, 4, (), None)
    assert converse(h, f"AUTH-SUCCESS {PEER_UUID}\nVERSION 2\n".encode()) == b"VERSION 4\n"
    assert h.agreed == 2


def test_version_zero_sends_no_version() -> None:
    h = Handshake(NAME, PEER_UUID, 0, (LOOP_UUID,), None)
    assert converse(h, f"AUTH-SUCCESS {PEER_UUID}\n".encode()) == b""
    assert h.agreed == 0


@pytest.mark.parametrize(("agreed", "bypass_sent"), [(1, False), (2, True), (3, True), (4, True)])
def test_bypass_only_from_version_2(agreed: int, bypass_sent: bool) -> None:
    h = Handshake(NAME, PEER_UUID, 4, (LOOP_UUID, OTHER_UUID), AUTH)
    wrote = converse(h, f"AUTH-SUCCESS {PEER_UUID}\nVERSION {agreed}\n".encode())
    expected = f"AUTH {BRIDGE_UUID} {TOKEN}\nVERSION 4\n".encode()
    if bypass_sent:
        expected += f"BYPASS {LOOP_UUID} {OTHER_UUID}\n".encode()
    assert wrote == expected
    assert h.agreed == agreed


@pytest.mark.parametrize(
    ("peer_writes", "eof", "why"),
    [
        (b"AUTH-FAILURE\n", False, f"{NAME} refused our token (AUTH-FAILURE)"),
        (
            f"AUTH-SUCCESS {OTHER_UUID}\n".encode(),
            False,
            f"{NAME} is repository {OTHER_UUID}, expected {PEER_UUID}",
        ),
        (
            f"AUTH-SUCCESS {PEER_UUID}\nVERSION 5\n".encode(),
            False,
            f"{NAME} answered VERSION 5 > 4",
        ),
        (b"ERROR no such repository\n", False, f"{NAME}: peer said ERROR no such repository"),
        (b"", True, f"{NAME}: peer closed the connection"),
        (
            f"AUTH-SUCCESS {PEER_UUID}\n".encode(),
            True,
            f"{NAME}: peer closed the connection",
        ),
        (
            f"AUTH-SUCCESS {PEER_UUID}\nSUCCESS\n".encode(),
            False,
            f"{NAME}: unexpected Success from peer",
        ),
        (b"HELLO\n", False, f"{NAME}: unexpected BadLine from peer"),
    ],
)
def test_refusals_say_why(peer_writes: bytes, eof: bool, why: str) -> None:
    h = Handshake(NAME, PEER_UUID, 4, (), AUTH)
    with pytest.raises(HandshakeFailed) as e:
        converse(h, peer_writes, eof)
    assert str(e.value) == why
    assert not h.done


def test_nothing_after_done() -> None:
    h = Handshake(NAME, PEER_UUID, 0, (), None)
    converse(h, f"AUTH-SUCCESS {PEER_UUID}\n".encode())
    with pytest.raises(RuntimeError):
        h.receive(m.Success())
