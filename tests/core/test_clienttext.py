"""Errors a client hears name what failed, never how the bridge reaches it.

Byte transcripts: a peer (or a cluster node) fails with a cause that names
an onion address, a token and a path on the proxy host; the client's bytes
hold none of them, and say what failed in the client's terms.
"""

from __future__ import annotations

import pytest
import trio

from tests.core.test_cluster import KEY, A, B, Knowledge, cluster, login
from tests.core.test_session import bridge
from tests.harness.fakes import PEER_NAME, FakeRepo, PeerConnection
from torbridge.protocol import clienttext
from torbridge.protocol import messages as m

ONION = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz23.onion"
TOKEN = "s3cr3t-t0ken-f0r-the-n0de"
PROXY_PATH = "/srv/annex/hub/.git/annex/p2p"
CAUSES = [
    f"SOCKS error for {ONION}:5555: onion service descriptor not found",
    f"cannot run /usr/lib/git-annex/git-annex-shell in {PROXY_PATH}: Permission denied",
    f"tor-annex::{ONION}:5555 refused our token {TOKEN}",
    "[Errno 111] Connect call failed ('127.0.0.1', 4242)",
]
SECRETS = (ONION, TOKEN, PROXY_PATH, "127.0.0.1", "/srv/")


def assert_no_internals(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, text


# --- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("cause", CAUSES)
def test_a_cause_becomes_connection_lost(cause: str) -> None:
    assert clienttext.peer_reason(cause) == "connection lost"


@pytest.mark.parametrize(
    "reason",
    [
        "connection closed",
        "no message before the deadline",
        "not reading",
        "protocol error: unexpected Success to Get",
        "closed inside a DATA body",
    ],
)
def test_the_bridges_own_words_pass(reason: str) -> None:
    assert clienttext.peer_reason(reason) == reason


def test_a_protocol_error_with_the_peers_words_is_cut() -> None:
    assert clienttext.peer_reason(f"protocol error: unparsable line ({ONION})") == (
        "protocol error"
    )


@pytest.mark.parametrize(
    "text",
    [
        "content not present",
        "this repository is read-only; write access denied",
        "unknown command",
        "expected VALID or INVALID",
        "transfer failed",
    ],
)
def test_git_annex_error_words_are_relayed(text: str) -> None:
    assert clienttext.relayed_error("n1", m.Error(text)) == m.Error(text)


@pytest.mark.parametrize(
    "text",
    [
        f"{PROXY_PATH}/objects/xx: openBinaryFile: permission denied",
        f"cannot reach {ONION}",
        "tcp+127.0.0.1:5555 refused",
        "user@host failed",
        "C:\\annex failed",
        "x" * 300,
        "bad\x1bcontrol",
    ],
)
def test_error_words_naming_internals_are_replaced(text: str) -> None:
    told = clienttext.relayed_error("n1", m.Error(text))
    assert told == m.Error("n1: failed (the gateway's log has the details)")


# --- one peer: byte transcripts ------------------------------------------------------------


@pytest.mark.parametrize("cause", CAUSES)
async def test_unreachable_peer_transcript(cause: str, autojump_clock: trio.abc.Clock) -> None:
    async with bridge() as b:
        b.transport.unreachable = cause
        await b.client.login()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        reply = await b.client.line()
        assert reply == f"ERROR {PEER_NAME}: unreachable\n".encode()
        assert_no_internals(reply)


async def test_peers_error_naming_a_path_transcript(autojump_clock: trio.abc.Clock) -> None:
    async def fail(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Error(f"{PROXY_PATH}/tmp/{KEY}: openBinaryFile: does not exist"))

    async def not_there(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Error("content not present"))

    async with bridge(FakeRepo(hooks={m.Get: fail, m.CheckPresent: not_there})) as b:
        await b.client.login()
        await b.client.send(f"GET 0 f {KEY}\n".encode())
        reply = await b.client.line()
        assert reply == f"ERROR {PEER_NAME}: failed (the gateway's log has the details)\n".encode()
        await b.client.send(f"CHECKPRESENT {KEY}\n".encode())
        assert await b.client.line() == b"ERROR content not present\n"


async def test_peer_lost_mid_request_transcript(autojump_clock: trio.abc.Clock) -> None:
    async def vanish(conn: PeerConnection, message: m.Message) -> None:
        await conn.hang_up()

    async with bridge(FakeRepo(hooks={m.Remove: vanish})) as b:
        await b.client.login()
        await b.client.send(f"REMOVE {KEY}\n".encode())
        assert await b.client.line() == f"ERROR {PEER_NAME}: connection closed\n".encode()


# --- a cluster: byte transcripts -------------------------------------------------------------


@pytest.mark.parametrize("cause", CAUSES)
async def test_cluster_put_with_every_node_unreachable(
    cause: str, autojump_clock: trio.abc.Clock
) -> None:
    async with cluster() as cl:
        for transport in cl.transports.values():
            transport.unreachable = cause
        await login(cl, 4)
        await cl.client.send(f"PUT f {KEY}\n".encode())
        reply = await cl.client.line()
        assert reply == (
            b"ERROR cl: no node stored it (n1: unreachable; n2: unreachable; n3: unreachable)\n"
        )
        assert_no_internals(reply)


async def test_cluster_get_from_unreachable_holders(autojump_clock: trio.abc.Clock) -> None:

    knowledge = Knowledge(logged={KEY: {A, B}})
    async with cluster(knowledge=knowledge, costs={"n1": 100.0}) as cl:
        cl.transports["n1"].unreachable = CAUSES[0]
        cl.transports["n2"].unreachable = CAUSES[1]
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        reply = await cl.client.line()
        assert reply == (
            b"ERROR cl: no node that has it answered (n1: unreachable; n2: unreachable)\n"
        )
        assert_no_internals(reply)


async def test_cluster_node_error_naming_a_path(autojump_clock: trio.abc.Clock) -> None:

    async def fail(conn: PeerConnection, message: m.Message) -> None:
        await conn.send(m.Error(f"{PROXY_PATH}: openBinaryFile: permission denied"))

    repos = {"n1": FakeRepo(uuid=A, hooks={m.Get: fail})}
    async with cluster(repos, Knowledge(logged={KEY: {A}})) as cl:
        await login(cl, 4)
        await cl.client.send(f"GET 0 f {KEY}\n".encode())
        reply = await cl.client.line()
        assert reply == b"ERROR n1: failed (the gateway's log has the details)\n"


async def test_cluster_node_lost_mid_put(autojump_clock: trio.abc.Clock) -> None:
    async def vanish(conn: PeerConnection, message: m.Message) -> None:
        await conn.hang_up()

    repos = {"n1": FakeRepo(hooks={m.Put: vanish})}
    async with cluster(repos) as cl:
        await login(cl, 4)
        await cl.client.send(f"PUT f {KEY}\n".encode())
        assert await cl.client.line() == b"ERROR cl: no node stored it (n1: connection closed)\n"
