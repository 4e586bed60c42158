"""The private Tor network: its safety checks (unit tests, no tor needed) and
the network itself (marked ``tor``: a real private network on 127.0.0.1)."""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.tor import echo_roundtrip, require_tor
from torbridge.testnet import (
    Authority,
    InetSocket,
    Network,
    Node,
    TestNet,
    TorProcess,
    TorTestNetError,
    Watchdog,
    authority_torrc,
    check_torrc_safe,
    client_torrc,
    in_host_netns,
    keygen_torrc,
    parse_proc_net,
    proc_sockets,
    relay_torrc,
    service_torrc,
    unsafe_sockets,
)

pytestmark = pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # stem 1.8

# --------------------------------------------------------------------------
# torrc safety (no tor needed)


@pytest.fixture
def network(tmp_path: Path) -> Network:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    authorities = tuple(
        Authority(f"auth{i}", 5000 + i, 6000 + i, f"{i:040X}", f"{i + 10:040X}") for i in range(3)
    )
    return Network(authorities, empty, os.getpid())


def _node(network: Network, name: str) -> Node:
    return Node(name, network.empty_file.parent / name, 7000)


@pytest.fixture
def torrcs(network: Network) -> dict[str, str]:
    """A torrc of every role, as the testnet writes them."""
    bandwidths = network.empty_file.parent / "bandwidths"
    return {
        "authority": authority_torrc(
            network,
            _node(network, "auth0"),
            or_port=5000,
            dir_port=6000,
            vote_offset=3,
            bandwidth_file=bandwidths,
        ),
        "relay": relay_torrc(network, _node(network, "relay0"), or_port=5003),
        "client": client_torrc(network, _node(network, "client"), socks_port=7001),
        "service": service_torrc(network, _node(network, "service")),
        "keygen": keygen_torrc(network.empty_file.parent, "relay0", 5003, network.empty_file),
        "annex node": client_torrc(
            network,
            _node(network, "annex"),
            socks_port=7002,
            extra=["HiddenServiceDir /tmp/hs", "HiddenServicePort 80 unix:/tmp/hs/annex.sock"],
        ),
    }


def test_generated_torrcs_are_safe(torrcs: dict[str, str], network: Network) -> None:
    for role, text in torrcs.items():
        check_torrc_safe(text)  # raises if not
        assert "TestingTorNetwork 1\n" in text, role
        assert re.search(r"^DirAuthority .* 127\.0\.0\.1:\d+ ", text, re.M), role
    for role in ("authority", "relay", "client", "service"):
        assert f"__OwningControllerProcess {os.getpid()}\n" in torrcs[role]
        assert "ControlPort 127.0.0.1:7000\n" in torrcs[role]
    for role in ("authority", "relay"):
        assert f"ServerDNSResolvConfFile {network.empty_file}\n" in torrcs[role]
    assert "SocksPort 127.0.0.1:7001 ExtendedErrors\n" in torrcs["client"]
    assert "VanguardsLiteEnabled 0\n" in torrcs["service"]


def _without(pattern: str) -> Callable[[str], str]:
    return lambda text: re.sub(pattern, "", text, flags=re.M)


def _plus(*lines: str) -> Callable[[str], str]:
    return lambda text: text + "".join(line + "\n" for line in lines)


MORIA1 = "DirAuthority moria1 orport=9201 v3ident=F533C81CEF0BC0267857C99B2F471ADF249FA232 "
MORIA1 += "128.31.0.39:9231 1A25 C613 3E22 F73F 2E10 6FE2 BFA5 3FFA 3D52 7C24"

UNSAFE_CLIENT_VARIANTS: dict[str, Callable[[str], str]] = {
    "no TestingTorNetwork": _without(r"^TestingTorNetwork 1\n"),
    "TestingTorNetwork 0": _plus("TestingTorNetwork 0"),
    "no UseDefaultFallbackDirs 0": _without(r"^UseDefaultFallbackDirs 0\n"),
    "UseDefaultFallbackDirs 1": _plus("UseDefaultFallbackDirs 1"),
    "no DirAuthority": _without(r"^DirAuthority .*\n"),
    "a public DirAuthority": _plus(MORIA1),
    "a public DirServer (tor's alias)": _plus(MORIA1.replace("DirAuthority", "DirServer", 1)),
    "an IPv6 DirAuthority": _plus(
        "DirAuthority x orport=1 ipv6=[2001:db8::1]:9001 v3ident="
        + "A" * 40
        + " 127.0.0.1:9 "
        + "B" * 40
    ),
    "SocksPort 0.0.0.0": _plus("SocksPort 0.0.0.0:9150"),
    "SocksPort as a bare port": _plus("SocksPort 9150"),
    "SocksPort on [::]": _plus("SocksPort [::]:9150"),
    "ControlPort on a public address": _plus("ControlPort 192.0.2.1:9051"),
    "DNSPort 0.0.0.0": _plus("DNSPort 0.0.0.0:53"),
    "a hidden listener": _plus("__SocksPort 0.0.0.0:9150"),
    "HiddenServicePort to a public target": _plus("HiddenServicePort 80 192.0.2.7:80"),
    "FallbackDir": _plus("FallbackDir 192.0.2.1:80 orport=9001 id=" + "C" * 40),
    "a Bridge": _plus("UseBridges 1", "Bridge 192.0.2.1:443"),
    "UseBridges 1": _plus("UseBridges 1"),
    "a proxy": _plus("Socks5Proxy 192.0.2.1:1080"),
    "a transport plugin": _plus("ClientTransportPlugin obfs4 exec /usr/bin/obfs4proxy"),
    "a public Address": _plus("Address 192.0.2.5"),
    "OutboundBindAddress": _plus("OutboundBindAddress 0.0.0.0"),
    "an abbreviated SocksPort": _plus("SocksPor 0.0.0.0:9150"),
    "an abbreviated TestingTorNetwork": _plus("TestingTorNet 0"),
    "an abbreviated DirAuthority": _plus("DirAuth x 192.0.2.1:80 " + "D" * 40),
    "%include": _plus("%include /etc/tor/torrc"),
    "a +prefixed option": _plus("+SocksPort 0.0.0.0:9150"),
    "a continuation line": _plus("ContactInfo a \\", "SocksPort 0.0.0.0:9150"),
    "RunAsDaemon 1": _plus("RunAsDaemon 1"),
    "an ORPort off loopback (a relay)": _plus("ORPort 9001"),
}


@pytest.mark.parametrize("variant", sorted(UNSAFE_CLIENT_VARIANTS))
def test_unsafe_client_torrc_refused(torrcs: dict[str, str], variant: str) -> None:
    text = UNSAFE_CLIENT_VARIANTS[variant](torrcs["client"])
    assert text != torrcs["client"]
    with pytest.raises(TorTestNetError, match="unsafe torrc"):
        check_torrc_safe(text)


UNSAFE_RELAY_VARIANTS: dict[str, Callable[[str], str]] = {
    "no ServerDNSResolvConfFile": _without(r"^ServerDNSResolvConfFile .*\n"),
    "the system resolver": lambda text: re.sub(
        r"^ServerDNSResolvConfFile .*$",
        "ServerDNSResolvConfFile /etc/resolv.conf",
        text,
        flags=re.M,
    ),
    "no ExitRelay 0": _without(r"^ExitRelay 0\n"),
    "ExitRelay 1": _plus("ExitRelay 1"),
    "ORPort on all addresses": _plus("ORPort 0.0.0.0:9001"),
    "DirPort as a bare port": _plus("DirPort 9030"),
}


@pytest.mark.parametrize("variant", sorted(UNSAFE_RELAY_VARIANTS))
def test_unsafe_relay_torrc_refused(torrcs: dict[str, str], variant: str) -> None:
    text = UNSAFE_RELAY_VARIANTS[variant](torrcs["relay"])
    assert text != torrcs["relay"]
    with pytest.raises(TorTestNetError, match="unsafe torrc"):
        check_torrc_safe(text)


def test_safe_variations_accepted(torrcs: dict[str, str]) -> None:
    check_torrc_safe(
        torrcs["client"]
        + "# a comment\n\n"
        + "SocksPort unix:/tmp/tb/socks.sock\n"
        + "ControlSocket /tmp/tb/control\n"
        + "SocksPort 127.0.0.1:auto IsolateDestAddr\n"
        + "HiddenServiceDir /tmp/tb/hs\n"
        + "HiddenServicePort 80\n"
        + "HiddenServicePort 81 8081\n"
        + "HiddenServicePort 82 127.0.0.1:8082\n"
        + "hiddenserviceport 83 unix:/tmp/tb/hs.sock\n"
        + "ClientPreferIPv6ORPort 0\n"
        + "Log info file /tmp/tb/info.log\n"
        + "ORPort 0\n"
    )


# --------------------------------------------------------------------------
# the watchdog (socket tables from /proc; no traffic off loopback)

# Lines of /proc/net/{tcp,tcp6,udp}, as the kernel writes them (header first).
TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0
   1: 0100007F:A0B2 0100007F:2329 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0
   2: 0500000A:A0B2 0A0200C0:01BB 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0
   3: 00000000:2329 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1004 1 0
"""
TCP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:2329 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2001 1 0
   1: 0000000000000000FFFF00000100007F:2329 0000000000000000FFFF00000100007F:0FA0 01 00000000:00000000 00:00000000 00000000 0 0 2002 1 0
   2: 00000000000000000000000000000000:2329 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2003 1 0
   3: B80D0120000000000000000001000000:0FA0 B80D0120000000000000000002000000:01BB 01 00000000:00000000 00:00000000 00000000 0 0 2004 1 0
"""  # noqa: E501


def _native(words: str) -> str:
    """The kernel prints each 32-bit word in host order: the tables above are
    little-endian; on a big-endian host, flip every word."""
    if sys.byteorder == "little":
        return words
    return re.sub(
        r"\b([0-9A-F]{8}|[0-9A-F]{32}):",
        lambda m: (
            "".join(
                bytes.fromhex(m.group(1)[i : i + 8])[::-1].hex().upper()
                for i in range(0, len(m.group(1)), 8)
            )
            + ":"
        ),
        words,
    )


def test_parse_proc_net_ipv4() -> None:
    table = parse_proc_net(_native(TCP_TABLE))
    assert table == {
        1001: (("127.0.0.1", 9001), None),  # a listener: no peer
        1002: (("127.0.0.1", 41138), ("127.0.0.1", 9001)),
        1003: (("10.0.0.5", 41138), ("192.0.2.10", 443)),
        1004: (("0.0.0.0", 9001), None),
    }


def test_parse_proc_net_ipv6() -> None:
    table = parse_proc_net(_native(TCP6_TABLE))
    assert table == {
        2001: (("::1", 9001), None),
        2002: (("::ffff:127.0.0.1", 9001), ("::ffff:127.0.0.1", 4000)),
        2003: (("::", 9001), None),
        2004: (("2001:db8::1", 4000), ("2001:db8::2", 443)),
    }


@pytest.mark.parametrize(
    "line",
    [
        "   0: 0100007F:2329 00000000:0000 0A",  # cut short
        "   0: 0100:2329 00000000:0000 0A 0 0 0 0 0 1001",  # a 16-bit address
        "   0: 0100007F:2329 00000000:0000 0A 0 0 0 0 0 x",  # no inode
    ],
)
def test_parse_proc_net_refuses_garbage(line: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_net(f"header\n{line}\n")


@pytest.mark.parametrize(
    ("sock", "safe"),
    [
        (InetSocket(1, "tcp", ("127.0.0.1", 9001), None), True),
        (InetSocket(1, "tcp", ("127.0.0.1", 41234), ("127.0.0.1", 9001)), True),
        (InetSocket(1, "udp", ("127.0.0.1", 44366), ("127.0.0.53", 53)), True),
        (InetSocket(1, "tcp6", ("::1", 9001), None), True),
        (InetSocket(1, "tcp6", ("::ffff:127.0.0.1", 9001), ("::ffff:127.0.0.1", 4000)), True),
        (InetSocket(1, "tcp", ("10.0.0.5", 41234), ("127.0.0.1", 9001)), False),
        (InetSocket(1, "tcp", ("127.0.0.1", 41234), ("192.0.2.10", 443)), False),
        (InetSocket(1, "tcp", ("0.0.0.0", 9001), None), False),
        (InetSocket(1, "tcp6", ("::", 9001), None), False),
        (InetSocket(1, "udp", ("10.0.0.5", 5353), ("8.8.8.8", 53)), False),
        (InetSocket(1, "tcp6", ("2001:db8::1", 4000), ("2001:db8::2", 443)), False),
        (InetSocket(1, "raw", ("0.0.0.0", 1), None), False),
        (InetSocket(1, "packet", ("*", 0), None), False),  # below IP: never ours
    ],
)
def test_socket_on_loopback(sock: InetSocket, safe: bool) -> None:
    assert sock.on_loopback is safe


def test_proc_sockets_sees_our_own_sockets() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    # A UDP socket "connected" off loopback: connect() only records the peer,
    # no packet is sent.
    udp: socket.socket | None  # None: no route off loopback to connect it to
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            udp.connect(("192.0.2.10", 9))  # TEST-NET-1
        except OSError:
            udp.close()
            udp = None  # no route at all: nothing to see
        found = {str(sock) for sock in proc_sockets([os.getpid()])}
        port = listener.getsockname()[1]
        assert f"tcp 127.0.0.1:{port} -> * (pid {os.getpid()})" in found
        assert (
            f"tcp 127.0.0.1:{client.getsockname()[1]} -> 127.0.0.1:{port} (pid {os.getpid()})"
            in found
        )
        bad = unsafe_sockets([os.getpid()])
        if udp is None:
            assert bad == []
        else:
            host, local_port = udp.getsockname()
            assert bad == [f"udp {host}:{local_port} -> 192.0.2.10:9 (pid {os.getpid()})"]
    finally:
        for sock in (listener, client, server, udp):
            if sock is not None:
                sock.close()
    assert not any(f"127.0.0.1:{port}" in str(sock) for sock in proc_sockets([os.getpid()]))


def test_proc_sockets_of_an_exited_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: /proc/PID is gone
    assert proc_sockets([p.pid]) == []


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for a tor process (we only need a PID to kill)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def _wait_until(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _sample(*sockets: InetSocket) -> Callable[[Collection[int]], list[InetSocket]]:
    return lambda pids: [s for s in sockets if s.pid in pids]


def test_watchdog_kills_on_non_loopback_socket(sleeper: subprocess.Popen[bytes]) -> None:
    pid = sleeper.pid
    samples = [
        _sample(InetSocket(pid, "tcp", ("127.0.0.1", 41234), ("127.0.0.1", 9001))),
        _sample(InetSocket(pid, "tcp", ("127.0.0.1", 41234), ("127.0.0.1", 9001))),
        _sample(InetSocket(pid, "tcp", ("10.0.0.5", 41234), ("192.0.2.10", 443))),
    ]
    violations: list[str] = []
    dog = Watchdog(
        lambda: [sleeper],
        violations.append,
        interval=0.02,
        sample=lambda pids: samples.pop(0)(pids),
    )
    dog.start()
    try:
        assert _wait_until(lambda: sleeper.poll() is not None)
    finally:
        dog.stop()
    assert sleeper.returncode == -signal.SIGKILL
    assert dog.checks == 3
    assert len(violations) == 1 and "192.0.2.10:443" in violations[0]


def test_watchdog_leaves_loopback_alone(sleeper: subprocess.Popen[bytes]) -> None:
    asked: list[Collection[int]] = []

    def sample(pids: Collection[int]) -> list[InetSocket]:
        asked.append(pids)
        return [
            InetSocket(sleeper.pid, "tcp", ("127.0.0.1", 9001), None),
            InetSocket(999_999_999, "tcp", ("0.0.0.0", 22), None),  # not ours: ignored
        ]

    dog = Watchdog(lambda: [sleeper], pytest.fail, interval=0.01, sample=sample)
    dog.start()
    try:
        assert _wait_until(lambda: dog.checks >= 5)
    finally:
        dog.stop()
    assert sleeper.poll() is None
    assert all(set(pids) == {sleeper.pid} for pids in asked)


def test_watchdog_watches_real_processes(sleeper: subprocess.Popen[bytes]) -> None:
    """The default sample (/proc) on a live process: no sockets, no violation."""
    dog = Watchdog(lambda: [sleeper], pytest.fail, interval=0.01)
    assert dog.check_once() is True and dog.checks == 1
    assert sleeper.poll() is None


@pytest.mark.parametrize("error", [PermissionError(13, "denied"), ValueError("garbled table")])
def test_watchdog_fails_closed_when_it_cannot_look(
    sleeper: subprocess.Popen[bytes], error: Exception
) -> None:
    def broken(pids: Collection[int]) -> list[InetSocket]:
        raise error

    violations: list[str] = []
    dog = Watchdog(lambda: [sleeper], violations.append, interval=0.01, sample=broken)
    assert dog.check_once() is False
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert violations and "cannot list sockets" in violations[0]


def test_watchdog_survives_a_transient_failure(sleeper: subprocess.Popen[bytes]) -> None:
    failures = [OSError("EAGAIN"), OSError("EAGAIN")]  # two in a row: not yet a verdict

    def flaky(pids: Collection[int]) -> list[InetSocket]:
        if failures:
            raise failures.pop(0)
        return []

    dog = Watchdog(lambda: [sleeper], pytest.fail, interval=0.01, sample=flaky)
    assert dog.check_once() is True
    assert sleeper.poll() is None


# --------------------------------------------------------------------------
# importing the package does nothing; start() installs the exit hook, stop() removes it

_IMPORT_PROBE = """
import atexit, threading
registered = []
real_register = atexit.register
def spy(func, *args, **kwargs):
    registered.append(func)
    return real_register(func, *args, **kwargs)
atexit.register = spy
before = {t.ident for t in threading.enumerate()}
import torbridge.testnet, torbridge.testnet.cli
import torbridge.testnet.audit, torbridge.testnet.keys, torbridge.testnet.network
import torbridge.testnet.process, torbridge.testnet.torrc, torbridge.testnet.torrc_safety
ours = [f for f in registered if getattr(f, "__module__", "").startswith("torbridge")]
threads = [t.name for t in threading.enumerate() if t.ident not in before]
print(repr((ours, threads)))
"""


def test_importing_the_package_registers_nothing_and_starts_no_thread() -> None:
    # A fresh interpreter (this one has imported the package already), from
    # the checkout under test. Only handlers of torbridge's own count: stem and
    # logging register theirs when they are imported, whoever imports them.
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert out.strip() == repr(([], []))


@pytest.fixture
def exit_hooks(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Callable[[], None]]]:
    """What atexit.register/unregister are called with (still passed on to them)."""
    calls: dict[str, list[Callable[[], None]]] = {"register": [], "unregister": []}
    for name in calls:
        real = getattr(atexit, name)

        def spy(func: Callable[[], None], _real: Any = real, _name: str = name) -> Any:
            calls[_name].append(func)
            return _real(func)

        monkeypatch.setattr(atexit, name, spy)
    return calls


def test_failed_start_removes_its_exit_hook(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exit_hooks: dict[str, list[Callable[[], None]]],
) -> None:
    net = TestNet(tmp_path / "net")
    assert exit_hooks == {"register": [], "unregister": []}  # constructing registers nothing
    monkeypatch.setenv("PATH", str(tmp_path))  # no tor here: start() fails at once
    with pytest.raises(TorTestNetError, match="tor not found"):
        net.start()
    assert len(exit_hooks["register"]) == 1
    assert exit_hooks["unregister"] == exit_hooks["register"]
    assert net.watchdog is None  # no thread was started either


# --------------------------------------------------------------------------
# the network (real tors on 127.0.0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.tor
def test_network_is_up_and_on_loopback(testnet: TestNet) -> None:
    assert len(testnet.authorities) == 3 and len(testnet.relays) == 2
    for authority in testnet.authorities:
        ns = authority.controller().get_info("ns/all")
        assert len(re.findall(r"^r ", ns, re.M)) == 5
    assert testnet.watchdog is not None and testnet.watchdog.checks > 0
    pids = [t.pid for t in testnet.tors]
    sockets = proc_sockets(pids)
    for tor in testnet.tors:  # the watchdog sees every tor's sockets (a listener at least)...
        assert any(s.pid == tor.pid and s.table.startswith("tcp") for s in sockets), tor.name
    assert [str(s) for s in sockets if not s.on_loopback] == []  # ...all on loopback
    assert unsafe_sockets(pids) == []
    testnet.check()


@pytest.mark.tor
def test_tor_runs_on_our_torrc_only(testnet: TestNet, client_tor: TorProcess) -> None:
    assert testnet.workdir is not None and client_tor in testnet.tors
    for tor in testnet.tors:
        argv = Path(f"/proc/{tor.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert [a.decode() for a in argv[1:]] == [
            "--defaults-torrc",
            str(testnet.workdir / "empty"),
            "-f",
            str(tor.torrc),
        ]
        assert (testnet.workdir / "empty").stat().st_size == 0
        environ = Path(f"/proc/{tor.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_ARENA_MAX=1" in environ
        assert b"MALLOC_MMAP_THRESHOLD_=131072" in environ
        check_torrc_safe(tor.torrc.read_text())


@pytest.mark.tor
def test_onion_service_reachable_through_client(
    testnet: TestNet,
    client_tor: TorProcess,
    service_tor: TorProcess,
    tcp_echo: str,
    unix_echo: Path,
) -> None:
    with service_tor.controller() as controller:
        service = controller.create_ephemeral_hidden_service(
            {80: tcp_echo, 81: f"unix:{unix_echo}"},
            key_type="NEW",
            key_content="ED25519-V3",
            await_publication=True,
        )
        onion = f"{service.service_id}.onion"
        testnet.wait_for_descriptor(service_tor, onion)
        assert echo_roundtrip(client_tor, onion, 80, b"hello over tcp\n") == b"hello over tcp\n"
        payload = os.urandom(200_000)
        assert echo_roundtrip(client_tor, onion, 81, payload) == payload
    testnet.check()


@pytest.mark.tor
def test_client_with_torrc_onion_service(
    testnet: TestNet, client_tor: TorProcess, unix_echo: Path
) -> None:
    """The shape of a git-annex node: HiddenServiceDir/Port lines in its torrc."""
    assert testnet.workdir is not None
    hs_dir = testnet.workdir / "annexnode-hs"
    node = testnet.start_client(
        "annexnode",
        extra=[f"HiddenServiceDir {hs_dir}", f"HiddenServicePort 5000 unix:{unix_echo}"],
    )
    onion = (hs_dir / "hostname").read_text().strip()
    testnet.wait_for_descriptor(node, onion)
    assert echo_roundtrip(client_tor, onion, 5000, b"annex\n") == b"annex\n"


@pytest.mark.tor
def test_unsafe_extra_lines_are_refused(testnet: TestNet) -> None:
    before = list(testnet.tors)
    with pytest.raises(TorTestNetError, match="unsafe torrc"):
        testnet.start_client("bad", extra=["SocksPort 0.0.0.0:19999"])
    if in_host_netns():
        with pytest.raises(TorTestNetError, match="9050"):
            testnet.start_client("bad2", socks_port=9050)
    assert testnet.tors == before


@pytest.mark.tor
def test_stop_leaves_no_process_and_no_directory(
    exit_hooks: dict[str, list[Callable[[], None]]],
) -> None:
    require_tor()
    net = TestNet()
    net.start()
    assert len(exit_hooks["register"]) == 1 and not exit_hooks["unregister"]
    client = net.start_client("client")
    assert client.socks is not None
    pids = [t.pid for t in net.tors]
    workdir = net.workdir
    assert len(pids) == 6 and all(_alive(p) for p in pids)
    assert workdir is not None and workdir.is_dir()
    started = time.monotonic()
    net.stop()
    assert time.monotonic() - started < 5
    assert not any(_alive(p) for p in pids)
    assert not workdir.exists()
    assert exit_hooks["unregister"] == exit_hooks["register"]
    net.stop()  # idempotent
    with pytest.raises(TorTestNetError):
        net.start()


@pytest.mark.tor
def test_failed_start_leaves_nothing() -> None:
    require_tor()
    net = TestNet()
    with pytest.raises(TorTestNetError, match="timed out"):
        net.start(timeout=0.3)
    assert not any(_alive(t.pid) for t in net.tors)
    assert net.workdir is not None and not net.workdir.exists()


_LEFT_RUNNING = """
from torbridge.testnet import TestNet
net = TestNet()
net.start()
print(net.workdir, *(t.pid for t in net.tors), flush=True)
# exits with the network up: the hook start() installed stops it
"""


@pytest.mark.tor
def test_a_network_left_running_is_stopped_at_exit() -> None:
    require_tor()
    out = subprocess.run(
        [sys.executable, "-c", _LEFT_RUNNING],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    workdir, pids = Path(out[0]), [int(p) for p in out[1:]]
    assert len(pids) == 5
    assert not workdir.exists()  # stop() ran: it removes the directory it made
    assert _wait_until(lambda: not any(_alive(p) for p in pids), timeout=30)
