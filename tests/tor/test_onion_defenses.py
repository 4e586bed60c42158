"""tor's own defenses in the bridge's ephemeral onion service, against a real tor.

``publish`` (torbridge/tor/onion.py) sends ADD_ONION with MaxStreams and the
MaxStreamsCloseCircuit flag, and tor's proof-of-work keywords. Here the
service tor of the private network (tests/tor/conftest.py) takes them, and
the descriptor tor then publishes, decrypted with the onion address as any
client would, carries ``pow-params``: the defense is on, not just accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torbridge.testnet import TorProcess
from torbridge.tor.onion import PowDefenses, publish, tor_supports_pow

pytestmark = [
    pytest.mark.tor,
    pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning"),  # stem 1.8
]

PUBLISH_TIMEOUT = 120.0


@pytest.fixture
def controller(service_tor: TorProcess) -> Iterator[Any]:
    """A control connection to the service tor that records what is sent on it.

    Services it adds live as long as it does (closed after the test).
    """
    c = service_tor.controller()
    sent: list[str] = []
    msg = c.msg

    def recording_msg(message: str) -> Any:
        sent.append(message)
        return msg(message)

    c.msg = recording_msg
    c.sent = sent
    try:
        yield c
    finally:
        c.close()


def inner_descriptor(controller: Any, onion: str) -> str:
    """The service's descriptor as tor published it, both layers decrypted."""
    from stem.descriptor.hidden_service import (  # type: ignore[import-untyped]
        HiddenServiceDescriptorV3,
    )

    raw = controller.get_info(f"hs/service/desc/id/{onion.removesuffix('.onion')}")
    return str(HiddenServiceDescriptorV3.from_str(raw).decrypt(onion))


def test_this_tor_takes_pow_in_add_onion(controller: Any) -> None:
    assert tor_supports_pow(controller), controller.get_version()


def test_published_service_carries_pow_and_stream_cap(controller: Any, tmp_path: Path) -> None:
    onion = publish(
        controller,
        tmp_path,
        {5000: tmp_path / "hub.sock"},
        32,
        PUBLISH_TIMEOUT,
        pow_defenses=PowDefenses(True, queue_rate=100, queue_burst=1000),
    )
    [add] = [m for m in controller.sent if m.startswith("ADD_ONION")]
    assert " Flags=MaxStreamsCloseCircuit MaxStreams=32 " in add, add
    assert " PoWDefensesEnabled=1 PoWQueueRate=100 PoWQueueBurst=1000 " in add, add
    assert onion.removesuffix(".onion") in controller.get_info("onions/current").split()
    pow_lines = [
        ln
        for ln in inner_descriptor(controller, onion).splitlines()
        if ln.startswith("pow-params ")
    ]
    assert len(pow_lines) == 1 and pow_lines[0].startswith("pow-params v1 "), pow_lines


def test_pow_off_publishes_without_it(controller: Any, tmp_path: Path) -> None:
    onion = publish(
        controller,
        tmp_path,
        {5000: tmp_path / "hub.sock"},
        None,
        PUBLISH_TIMEOUT,
        pow_defenses=PowDefenses(enabled=False),
    )
    [add] = [m for m in controller.sent if m.startswith("ADD_ONION")]
    assert "PoW" not in add and "MaxStreams" not in add, add
    assert "pow-params" not in inner_descriptor(controller, onion)


def test_tor_checks_the_keywords_it_is_given(controller: Any, tmp_path: Path) -> None:
    """So an accepted ADD_ONION means tor understood them: a wrong one is refused."""
    target = f"Port=5000,unix:{tmp_path / 'hub.sock'}"
    for bad, why in (
        ("PoWDefensesEnabled=2", "Invalid PoWDefensesEnabled"),
        ("PoWQueueRate=-1", "Invalid PoWQueueRate"),
        ("PoWNoSuchThing=1", "Unrecognized keyword"),
    ):
        reply = controller.msg(f"ADD_ONION NEW:ED25519-V3 Flags=DiscardPK {bad} {target}")
        assert not reply.is_ok() and why in str(reply), (bad, str(reply))
