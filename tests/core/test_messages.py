"""The P2P message codec, checked against what the real git-annex sends.

Byte transcripts come from docs/p2p-protocol.md and git-annex's source
(P2P/Protocol.hs, Utility/SimpleProtocol.hs, Types/Key.hs); the property
tests check round-trips and that ``parse`` fails only with ``ParseError``.
"""

from __future__ import annotations

import re
import string
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from torbridge.protocol.fields import escape_af, is_valid_key, key_size, unescape_af
from torbridge.protocol.messages import (
    BY_COMMAND,
    MAX_LINE,
    AlreadyHave,
    AlreadyHavePlus,
    Auth,
    AuthFailure,
    AuthSuccess,
    Bypass,
    Changed,
    CheckPresent,
    Connect,
    ConnectDone,
    Data,
    DataPresent,
    Error,
    Failure,
    FailurePlus,
    Get,
    GetTimestamp,
    Invalid,
    LockContent,
    Message,
    NotifyChange,
    ParseError,
    Put,
    PutFrom,
    Remove,
    RemoveBefore,
    Success,
    SuccessPlus,
    Timestamp,
    UnlockContent,
    Valid,
    Version,
    parse,
    redacted,
    serialise,
)

PROPS = settings(
    max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
QUICK = settings(
    max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def roundtrip(m: Message) -> Message:
    wire = serialise(m)
    assert wire.endswith(b"\n")
    assert wire.count(b"\n") == 1, wire
    return parse(wire[:-1])


# Haskell's isSpace and isControl (GHC.Unicode), which git-annex's splitWord,
# words and the associated-file deserialiser use.
def hs_space(c: str) -> bool:
    o = ord(c)
    if o <= 0x377:
        return o == 32 or 9 <= o <= 13 or o == 0xA0
    return unicodedata.category(c) == "Zs"


def hs_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc"


SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
KEY = f"SHA256E-s1048576--{SHA}.bin"
UUID1 = "f9e4ee1a-3a2e-4e5b-8f42-2d2d0b1f6c11"
UUID2 = "0b5c3e7a-1111-4c4c-9d9d-abcdefabcdef"
TOKEN = "0123456789abcdef" * 8  # git-annex makes 128-hex-char tokens


# --- strategies -----------------------------------------------------------------

E_BACKENDS = ["SHA256E", "SHA512E", "SHA1E", "MD5E", "BLAKE2B256E", "SHA3_256E", "XFOOE"]
PLAIN_BACKENDS = ["SHA256", "SHA1", "MD5", "WORM", "URL", "VURL", "GITBUNDLE", "GITMANIFEST", "X"]

numbers = st.one_of(
    st.integers(0, 2**16), st.integers(0, 2**64), st.integers(0, 10**40), st.just(0)
)

# Bytes that may appear anywhere in a key name: no C0 control, no DEL.
_name_byte = st.integers(0x20, 0xFF).filter(lambda b: b != 0x7F)
_name_bytes = st.one_of(
    st.lists(_name_byte, min_size=1, max_size=40).map(bytes),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).map(
        lambda t: t.encode()
    ),
    st.sampled_from([b"x", b"a b", b"--", b"-s1--x", b"..", b"a.b.c", b"%", b"/etc/passwd"]),
)


def _ext_len(name: bytes) -> int:
    dot = name.find(b".")
    return 0 if dot < 0 else len(name) - dot


@st.composite
def keys(draw: st.DrawFn) -> str:
    backend = draw(
        st.one_of(
            st.sampled_from(E_BACKENDS + PLAIN_BACKENDS),
            st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=12),
        )
    )
    fields = "".join(f"-{letter}{draw(numbers)}" for letter in "smSC" if draw(st.booleans()))
    name = draw(_name_bytes)
    if backend.endswith("E") and backend != "GITBUNDLE" and _ext_len(name) > 64:
        name = name.replace(b".", b"_")
    return backend + fields + "--" + dec(name)


uuids = st.one_of(
    st.uuids().map(str),
    st.text(alphabet="-" + string.ascii_letters + string.digits, min_size=1, max_size=40),
    st.lists(st.sampled_from(list(range(0x21, 0x7F)) + list(range(0x80, 0x100))), min_size=1)
    .map(lambda bs: dec(bytes(bs)))
    .filter(lambda u: not any(c.isspace() or hs_control(c) for c in u)),
)
uuid_lists = st.lists(uuids, max_size=5).map(tuple)
tokens = st.from_regex(r"[A-Za-z0-9]+", fullmatch=True)


def _af_ok(af: str) -> bool:
    return bool(af) and not af.startswith("/") and not any(hs_space(c) or hs_control(c) for c in af)


# Associated files that survive escaping unchanged (no whitespace, no control
# characters, relative, non-empty), or None (no associated file).
afs = st.one_of(
    st.none(),
    st.text(alphabet="%ab/._-é日", min_size=1, max_size=20).filter(_af_ok),
    st.text(min_size=1, max_size=20).filter(_af_ok),
    st.lists(st.integers(0x21, 0xFF), min_size=1, max_size=30)
    .map(lambda bs: dec(bytes(bs)))
    .filter(_af_ok),
)

# The rest of a line: anything but a newline, and no trailing \r (a reader
# strips one, git-annex's getProtocolLine does the same).
texts = (
    st.binary(max_size=60)
    .map(lambda b: dec(b.replace(b"\n", b"")))
    .filter(lambda t: not t.endswith("\r"))
)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Auth: st.builds(Auth, uuids, tokens),
    AuthSuccess: st.builds(AuthSuccess, uuids),
    AuthFailure: st.just(AuthFailure()),
    Version: st.builds(Version, numbers),
    Connect: st.builds(Connect, st.sampled_from(["git-upload-pack", "git-receive-pack"])),
    ConnectDone: st.builds(ConnectDone, st.integers(-255, 255) | numbers),
    NotifyChange: st.just(NotifyChange()),
    Changed: st.builds(Changed, texts),
    CheckPresent: st.builds(CheckPresent, keys()),
    LockContent: st.builds(LockContent, keys()),
    UnlockContent: st.just(UnlockContent()),
    Remove: st.builds(Remove, keys()),
    RemoveBefore: st.builds(RemoveBefore, numbers, keys()),
    GetTimestamp: st.just(GetTimestamp()),
    Timestamp: st.builds(Timestamp, numbers),
    Get: st.builds(Get, numbers, afs, keys()),
    Put: st.builds(Put, afs, keys()),
    PutFrom: st.builds(PutFrom, numbers),
    AlreadyHave: st.just(AlreadyHave()),
    AlreadyHavePlus: st.builds(AlreadyHavePlus, uuid_lists),
    Success: st.just(Success()),
    SuccessPlus: st.builds(SuccessPlus, uuid_lists),
    Failure: st.just(Failure()),
    FailurePlus: st.builds(FailurePlus, uuid_lists),
    Bypass: st.builds(Bypass, uuid_lists),
    Data: st.builds(Data, numbers),
    DataPresent: st.just(DataPresent()),
    Valid: st.just(Valid()),
    Invalid: st.just(Invalid()),
    Error: st.builds(Error, texts),
}
messages = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(BY_COMMAND.values())


# --- a built message is one valid line, or it is not built ------------------------


def test_an_error_text_is_folded_into_one_line() -> None:
    # Error texts come from other programs' output: sent, never two lines.
    assert serialise(Error("a\nAUTH-SUCCESS x")) == b"ERROR a AUTH-SUCCESS x\n"
    assert serialise(Error("disk full\r\n")) == b"ERROR disk full\n"


@pytest.mark.parametrize(
    "build",
    [
        lambda: CheckPresent("SHA256E-s1--x\nAUTH-SUCCESS y"),
        lambda: Get(0, None, "not a key"),
        lambda: Get(-1, None, "SHA256E-s1--x"),
        lambda: Data(-1),
        lambda: Version(-1),
        lambda: RemoveBefore(-5, "SHA256E-s1--x"),
        lambda: Auth("u u", "abc"),
        lambda: Auth("u", ""),
        lambda: AuthSuccess("u\nAUTH-SUCCESS v"),
        lambda: SuccessPlus(("a", "b c")),
        lambda: Connect("git-shell"),
        lambda: Changed("a\nb"),
    ],
)
def test_a_message_that_would_not_be_one_valid_line_is_not_built(build: object) -> None:
    with pytest.raises(ParseError):
        build()  # type: ignore[operator]


@given(st.sampled_from(sorted(BY_COMMAND)), st.lists(st.text(), max_size=3))
def test_whatever_is_built_serialises_to_one_line(command: str, values: list[str]) -> None:
    """Build every message type from arbitrary text: built means one line."""
    cls = BY_COMMAND[command]
    try:
        message = cls._from_wire(" ".join(values))
    except ParseError:
        return
    wire = serialise(message)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    assert parse(wire[:-1]).fields()[0] == command


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@QUICK
@given(data=st.data())
def test_roundtrip_each_type(cls: type[Message], data: st.DataObject) -> None:
    m = data.draw(STRATEGIES[cls])
    assert type(m) is cls
    assert roundtrip(m) == m


@PROPS
@given(messages)
@example(Put(None, KEY))
@example(Get(0, None, KEY))
@example(Get(0, "a%b", KEY))
@example(Put("dir/%%file", f"WORM-s5-m1700000000--has spaces  and -- dashes {SHA}"))
@example(AlreadyHavePlus(()))
@example(Error(""))
@example(Changed(""))
@example(ConnectDone(-9))
def test_roundtrip(m: Message) -> None:
    assert roundtrip(m) == m
    # A \r\n ending is the same message.
    assert parse(serialise(m)[:-1] + b"\r") == m


# --- byte transcripts -----------------------------------------------------------

# (line as git-annex writes it, without \n; message). These lines are also
# what serialise must produce, byte for byte.
TRANSCRIPT: list[tuple[bytes, Message]] = [
    (b"AUTH " + UUID1.encode() + b" " + TOKEN.encode(), Auth(UUID1, TOKEN)),
    (b"AUTH-SUCCESS " + UUID2.encode(), AuthSuccess(UUID2)),
    (b"AUTH-FAILURE", AuthFailure()),
    (b"VERSION 1", Version(1)),
    (b"VERSION 4", Version(4)),
    (b"CONNECT git-upload-pack", Connect("git-upload-pack")),
    (b"CONNECT git-receive-pack", Connect("git-receive-pack")),
    (b"CONNECTDONE 0", ConnectDone(0)),
    (b"CONNECTDONE 128", ConnectDone(128)),
    (b"CONNECTDONE -9", ConnectDone(-9)),  # git killed by a signal: show (-9)
    (b"NOTIFYCHANGE", NotifyChange()),
    (
        b"CHANGED " + SHA[:40].encode() + b" " + SHA[24:].encode(),
        Changed(SHA[:40] + " " + SHA[24:]),
    ),
    (b"CHECKPRESENT " + KEY.encode(), CheckPresent(KEY)),
    (b"LOCKCONTENT " + KEY.encode(), LockContent(KEY)),
    (b"UNLOCKCONTENT", UnlockContent()),
    (b"REMOVE " + KEY.encode(), Remove(KEY)),
    (b"REMOVE-BEFORE 123 " + KEY.encode(), RemoveBefore(123, KEY)),
    (b"GETTIMESTAMP", GetTimestamp()),
    (b"TIMESTAMP 1234567", Timestamp(1234567)),
    (b"GET 0  " + KEY.encode(), Get(0, None, KEY)),  # fsck --from: empty af
    (b"GET 0 dir/file.bin " + KEY.encode(), Get(0, "dir/file.bin", KEY)),
    (b"GET 65536 50%%.bin " + KEY.encode(), Get(65536, "50%.bin", KEY)),
    (b"PUT  " + KEY.encode(), Put(None, KEY)),
    (b"PUT file.bin " + KEY.encode(), Put("file.bin", KEY)),
    (b"PUT-FROM 0", PutFrom(0)),
    (b"PUT-FROM 1048576", PutFrom(1048576)),
    (b"ALREADY-HAVE", AlreadyHave()),
    (b"ALREADY-HAVE-PLUS u1 u2", AlreadyHavePlus(("u1", "u2"))),
    (b"ALREADY-HAVE-PLUS", AlreadyHavePlus(())),
    (b"SUCCESS", Success()),
    (b"SUCCESS-PLUS " + UUID1.encode(), SuccessPlus((UUID1,))),
    (b"FAILURE", Failure()),
    (b"FAILURE-PLUS u1 u2 u3", FailurePlus(("u1", "u2", "u3"))),
    (b"BYPASS " + UUID1.encode() + b" " + UUID2.encode(), Bypass((UUID1, UUID2))),
    (b"DATA 0", Data(0)),
    (b"DATA 65536", Data(65536)),
    (b"DATA 10000000000", Data(10_000_000_000)),
    (b"DATA-PRESENT", DataPresent()),
    (b"VALID", Valid()),
    (b"INVALID", Invalid()),
    (b"ERROR some text with spaces", Error("some text with spaces")),
    (b"ERROR unknown command", Error("unknown command")),
    (b"ERROR expected UNLOCKCONTENT", Error("expected UNLOCKCONTENT")),
    (
        b"ERROR this repository is read-only; write access denied",
        Error("this repository is read-only; write access denied"),
    ),
    (b"ERROR ", Error("")),
    # A key is the last field, so it may contain spaces (and dashes).
    (
        b"CHECKPRESENT WORM-s5-m1700000000--my file  name.txt",
        CheckPresent("WORM-s5-m1700000000--my file  name.txt"),
    ),
    (b"PUT my%file.txt WORM--a b c", Put("my_file.txt", "WORM--a b c")),
    (b"GET 7  URL--http://example.com/a b", Get(7, None, "URL--http://example.com/a b")),
    (b"REMOVE-BEFORE 0 WORM-s1--x y", RemoveBefore(0, "WORM-s1--x y")),
]


@pytest.mark.parametrize(("line", "message"), TRANSCRIPT, ids=lambda v: repr(v)[:40])
def test_transcript_parse(line: bytes, message: Message) -> None:
    assert parse(line) == message
    assert parse(line + b"\r") == message  # \r\n endings


@pytest.mark.parametrize(("line", "message"), TRANSCRIPT, ids=lambda v: repr(v)[:40])
def test_transcript_serialise(line: bytes, message: Message) -> None:
    expected = line + b"\n"
    if line == b"PUT my%file.txt WORM--a b c":
        expected = b"PUT my_file.txt WORM--a b c\n"  # a lone % came in as _
    assert serialise(message) == expected


@pytest.mark.parametrize(
    ("m", "wire"),
    [
        (Put(None, KEY), b"PUT  " + KEY.encode() + b"\n"),
        (Put("", KEY), b"PUT  " + KEY.encode() + b"\n"),
        (Get(0, None, KEY), b"GET 0  " + KEY.encode() + b"\n"),
        (Get(0, "a b\tc", KEY), b"GET 0 a%b%c " + KEY.encode() + b"\n"),
        (Put("100% done", KEY), b"PUT 100%%%done " + KEY.encode() + b"\n"),
        (Auth(UUID1, "abc"), b"AUTH " + UUID1.encode() + b" abc\n"),
        (AlreadyHavePlus(("u1", "u2")), b"ALREADY-HAVE-PLUS u1 u2\n"),
        (SuccessPlus(()), b"SUCCESS-PLUS\n"),
        (Error("some text with spaces"), b"ERROR some text with spaces\n"),
    ],
)
def test_serialise_exact(m: Message, wire: bytes) -> None:
    assert serialise(m) == wire


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r",
        b" SUCCESS",
        b"success",
        b"SUCCESS  ",
        b"SUCCESS x",
        b"UNLOCKCONTENT " + KEY.encode(),  # UNLOCKCONTENT takes no key
        b"GETTIMESTAMP 5",
        b"HELLO",
        b"AUTH",
        b"AUTH " + UUID1.encode(),
        b"AUTH " + UUID1.encode() + b" ",  # empty token
        b"AUTH  " + TOKEN.encode(),  # empty uuid
        b"AUTH " + UUID1.encode() + b" abc def",
        b"AUTH " + UUID1.encode() + b" tok-en",
        b"AUTH " + UUID1.encode() + b" t\xc3\xb6ken",
        b"AUTH " + UUID1.encode() + " \uff21\uff22\uff23".encode(),  # fullwidth ABC
        b"AUTH-SUCCESS",
        b"AUTH-FAILURE now",
        b"CONNECT",
        b"CONNECT git-annex-shell",
        b"CONNECT git-upload-pack ",
        b"CONNECTDONE",
        b"CONNECTDONE x",
        b"CONNECTDONE --1",
        b"CHECKPRESENT",
        b"CHECKPRESENT notakey",
        b"LOCKCONTENT ",
        b"REMOVE SHA256E",
        b"REMOVE-BEFORE " + KEY.encode(),
        b"REMOVE-BEFORE -1 " + KEY.encode(),
        b"REMOVE-BEFORE 12",
        b"GET " + KEY.encode(),
        b"GET 0 " + KEY.encode(),  # af taken as the key field: the key is empty
        b"GET x  " + KEY.encode(),
        b"GET 0 /etc/passwd " + KEY.encode(),  # absolute associated file
        b"PUT " + KEY.encode(),
        b"PUT /abs " + KEY.encode(),
        b"PUT  notakey",
        b"PUT-FROM",
        b"DATA",
        b"DATA ",
        b"DATA -1",
        b"DATA 1 ",
        b"DATA  1",
        b"ALREADY-HAVE x",
        b"VALID\r\r\r",  # one \r is the ending, one a separator, one a parameter
    ],
)
def test_unparseable(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse(line)


@pytest.mark.parametrize("cmd", [b"VERSION", b"TIMESTAMP", b"PUT-FROM", b"DATA"])
@pytest.mark.parametrize(
    "num",
    [
        b"",
        b"-1",
        b"+1",
        b"1.0",
        b"1e3",
        b"0x10",
        b"1_000",
        b" 1",
        b"1 ",
        b"(1)",
        "\u0663".encode(),
        "\uff11".encode(),
        b"\xb9",
        b"1" * 5000,
    ],
)
def test_numbers_are_plain_decimal(cmd: bytes, num: bytes) -> None:
    with pytest.raises(ParseError):
        parse(cmd + b" " + num)


def test_numbers() -> None:
    assert parse(b"VERSION 007") == Version(7)  # git-annex reads these too
    assert parse(b"DATA " + b"9" * 100) == Data(int("9" * 100))
    assert parse(b"REMOVE-BEFORE 00 " + KEY.encode()) == RemoveBefore(0, KEY)


# --- associated files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("af", "wire"),
    [
        (None, ""),
        ("", ""),
        ("a", "a"),
        ("%", "%%"),
        ("a%b", "a%%b"),
        ("%%", "%%%%"),
        ("a b", "a%b"),
        ("a\tb\nc\rd\x0be\x0cf", "a%b%c%d%e%f"),
        ("a\xa0b", "a%b"),  # NBSP: Haskell's isSpace
        ("a\u3000b\u2003c", "a%b%c"),  # Unicode space separators
        ("dir/sub dir/f.txt", "dir/sub%dir/f.txt"),
        ("\u2028", "\u2028"),  # not isSpace in Haskell: git-annex sends it as is
    ],
)
def test_escape_af(af: str | None, wire: str) -> None:
    assert escape_af(af) == wire


@pytest.mark.parametrize(
    ("wire", "af"),
    [
        ("", None),
        ("a", "a"),
        ("%%", "%"),
        ("a%%b", "a%b"),
        ("%", "_"),  # a lone % is _, not a space
        ("a%b", "a_b"),
        ("%%%", "%_"),
        ("%%%%", "%%"),
        ("a\x00b\x01c\x1fd\x7fe", "a_b_c_d_e"),
        ("a\x85b\x9fc", "a_b_c"),  # C1 controls are isControl too
        ("a\u2028b", "a\u2028b"),
        ("dir/f", "dir/f"),
        ("%/etc", "_/etc"),
        ("./x", "./x"),
        ("\udcff\udcfe", "\udcff\udcfe"),  # undecodable bytes are kept
    ],
)
def test_unescape_af(wire: str, af: str | None) -> None:
    assert unescape_af(wire) == af


@pytest.mark.parametrize("wire", ["/", "/etc/passwd", "//x", "/%%"])
def test_unescape_af_absolute(wire: str) -> None:
    with pytest.raises(ParseError):
        unescape_af(wire)


@pytest.mark.parametrize(
    ("line", "af"),
    [
        (b"PUT a%b " + KEY.encode(), "a_b"),
        (b"PUT 100%%%done " + KEY.encode(), "100%_done"),
        (b"PUT a\x01b " + KEY.encode(), "a_b"),
        (b"PUT a\x1fb " + KEY.encode(), "a_b"),  # \x1f is not a separator for git-annex
        (b"PUT a\xc2\x85b " + KEY.encode(), "a_b"),  # nor is NEL (U+0085)
        (b"PUT a\xe2\x80\xa8b " + KEY.encode(), "a\u2028b"),  # nor LINE SEPARATOR
        (b"PUT \xff\xfe " + KEY.encode(), "\udcff\udcfe"),
        (b"GET 0 %%dir/%%f " + KEY.encode(), "%dir/%f"),
    ],
)
def test_af_on_the_wire(line: bytes, af: str) -> None:
    m = parse(line)
    assert isinstance(m, Put | Get)
    assert m.af == af
    assert m.key == KEY


@pytest.mark.parametrize(
    ("line", "af", "key"),
    [
        # Haskell's isSpace splits at these, so the key gets what follows.
        (b"PUT a\xc2\xa0b WORM--x", "a", "b WORM--x"),
        (b"PUT a\xe3\x80\x80b WORM--x", "a", "b WORM--x"),
        (b"PUT a\tb WORM--x", "a", "b WORM--x"),
    ],
)
def test_split_at_haskell_whitespace(line: bytes, af: str, key: str) -> None:
    m = parse(line)
    assert m == Put(af, key)


def test_uuid_lists_split_at_runs_of_whitespace() -> None:
    assert parse(b"SUCCESS-PLUS  u1 \t u2  ") == SuccessPlus(("u1", "u2"))
    assert parse(b"BYPASS u1\xe3\x80\x80u2") == Bypass(("u1", "u2"))
    with pytest.raises(ParseError):
        parse(b"BYPASS u1\x01 u2")


@PROPS
@given(st.text(max_size=30))
def test_af_escape_never_leaves_whitespace(af: str) -> None:
    wire = escape_af(af)
    assert not any(hs_space(c) for c in wire)
    if af and not af.startswith("/"):
        back = unescape_af(wire)
        assert back is not None
        assert not any(hs_space(c) or hs_control(c) for c in back)
        if not any(hs_space(c) for c in af):
            # Without whitespace only control characters are lost, to _.
            assert back == "".join("_" if hs_control(c) else c for c in af)


def test_af_escaping_is_ambiguous_as_in_git_annex() -> None:
    # A space before a % escapes to a lone % followed by %%: "a %" -> "a%%%",
    # which git-annex's deesc reads as "%" then a lone "%" ("_").
    assert escape_af("a %") == "a%%%"
    assert unescape_af("a%%%") == "a%_"
    assert parse(serialise(Put("a %", KEY))[:-1]) == Put("a%_", KEY)
    assert escape_af("  ") == "%%"
    assert unescape_af("%%") == "%"


@QUICK
@given(afs)
def test_af_roundtrip(af: str | None) -> None:
    assert unescape_af(escape_af(af)) == af


@QUICK
@given(st.text(alphabet="%ab", max_size=20))
def test_unescape_af_percent(wire: str) -> None:
    expected = wire.replace("%%", "\0").replace("%", "_").replace("\0", "%")
    assert unescape_af(wire) == (expected or None)


# --- keys -----------------------------------------------------------------------

VALID_KEYS = [
    KEY,
    f"SHA256-s0--{SHA}",
    f"SHA256E-s100-S50-C2--{SHA}.tar.gz",
    "SHA512E-s1-m2-S3-C4--abc.x",
    "MD5E-s3-m10--d41d8cd98f00b204e9800998ecf8427e.txt",
    "BLAKE2B256E--abc",
    "WORM-s5-m1700000000--my file.txt",
    "WORM--a--b",
    "WORM--" + "x" * 1000,
    "URL--http://example.com/some/file?x=1&y=2",
    "URL-s1234--https://example.com/a b",
    "VURL--https://example.com/",
    "XFOOE-s1--abc.ext",
    "SOMETHINGNEW--x",
    "SHA256E--x." + "e" * 63,  # extension of exactly 64 bytes, dot included
    "SHA256E--x." + "é" * 31 + "e",  # 64 bytes in UTF-8
    "SHA256--x." + "e" * 200,  # no extension limit without E
    "WORM--x." + "e" * 200,
    "GITBUNDLE--x." + "e" * 200,  # GITBUNDLE ends in E but has no extension
    "SHA256E-s1--\udcff\udcfe.bin",  # non-UTF-8 bytes in the name
    "SHA256E-s1--a\x85b",  # C1 characters are only refused in associated files
]

INVALID_KEYS = [
    "",
    "--x",  # empty backend
    "-s1--x",
    "SHA256E",  # no --
    "SHA256E-s1",
    "SHA256E-x",
    "SHA256E-s1-x",
    "SHA256E-s1--",  # empty name
    "WORM--",
    "SHA256E-sX--x",
    "SHA256E-s-1--x",
    "SHA256E-s--x",
    "SHA256E-m1-s2--x",  # fields out of order
    "SHA256E-s1-s2--x",
    "SHA256E-q1--x",
    "SHA256E-s\u0663--x",  # Arabic-Indic digit: not a number to git-annex
    "SHA256E-s\uff11--x",
    "SHA256E-s" + "1" * 5000 + "--x",
    "WORM--a\x00b",
    "WORM--a\x01b",
    "WORM--a\tb",
    "WORM--a\nb",
    "WORM--a\rb",
    "WORM--a\x1bb",
    "WORM--a\x7fb",
    "SHA256E--x." + "e" * 64,  # extension over 64 bytes
    "SHA256E--x." + "é" * 32,
    "XFOOE--x." + "e" * 64,
    "MD5E--x." + "e" * 64,
]


@pytest.mark.parametrize("key", VALID_KEYS, ids=lambda k: repr(k)[:40])
def test_valid_key(key: str) -> None:
    assert is_valid_key(key)
    line = b"CHECKPRESENT " + key.encode("utf-8", "surrogateescape")
    assert parse(line) == CheckPresent(key)
    assert serialise(CheckPresent(key)) == line + b"\n"


@pytest.mark.parametrize("key", INVALID_KEYS, ids=lambda k: repr(k)[:40])
def test_invalid_key(key: str) -> None:
    assert not is_valid_key(key)
    wire = key.encode("utf-8", "surrogateescape")
    for line in (
        b"CHECKPRESENT " + wire,
        b"LOCKCONTENT " + wire,
        b"REMOVE " + wire,
        b"REMOVE-BEFORE 1 " + wire,
        b"PUT  " + wire,
        b"GET 0 f " + wire,
    ):
        with pytest.raises(ParseError):
            parse(line)


def test_key_size() -> None:
    assert key_size(KEY) == 1048576
    assert key_size("WORM-m5--x") is None
    assert key_size("SHA256E-s0-S10-C1--x") == 0
    assert key_size("notakey") is None


@QUICK
@given(keys())
def test_generated_keys_are_valid(key: str) -> None:
    assert is_valid_key(key)


# --- tokens and redaction -------------------------------------------------------


@QUICK
@given(uuids, tokens)
def test_auth_tokens(uuid: str, token: str) -> None:
    line = f"AUTH {uuid} {token}".encode("utf-8", "surrogateescape")
    assert parse(line) == Auth(uuid, token)


@QUICK
@given(
    uuids,
    st.text(max_size=10).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9]+\r?", t)),
)
@example(UUID1, "")
@example(UUID1, "a-b")
@example(UUID1, "\uff21")
def test_auth_bad_tokens(uuid: str, token: str) -> None:
    # Empty, or anything but ASCII letters and digits (a space makes it two
    # fields; a trailing \r would be the line ending, so none is generated).
    line = f"AUTH {uuid} {token}".encode("utf-8", "surrogateescape")
    with pytest.raises(ParseError):
        parse(line)


def test_auth_token_case_is_kept() -> None:
    assert parse(b"AUTH u AbCdEf09") == Auth("u", "AbCdEf09")


@QUICK
@given(uuids, tokens)
def test_auth_is_redacted(uuid: str, token: str) -> None:
    m = Auth(uuid, token)
    assert redacted(m) == f"AUTH {uuid} <token>"
    assert repr(m) == f"Auth(uuid={uuid!r})"
    assert str(m) == repr(m)


def test_auth_secret_never_shown() -> None:
    secret = "Sup3rS3cretT0kenValue"
    m = parse(b"AUTH " + UUID1.encode() + b" " + secret.encode())
    assert isinstance(m, Auth)
    assert m.token == secret
    for text in (redacted(m), repr(m), str(m), f"{m}", f"{m!r}", repr([m]), repr({"m": m})):
        assert secret not in text
        assert secret.lower() not in text.lower()
    assert UUID1 in redacted(m)


def test_redacted_other_messages() -> None:
    assert redacted(Put(None, KEY)) == f"PUT  {KEY}"
    assert redacted(Success()) == "SUCCESS"
    long = redacted(Error("x" * 1000))
    assert long.startswith("ERROR xxx")
    assert len(long) <= 210


# --- parse fails only with ParseError ---------------------------------------------

COMMANDS = [
    b"AUTH",
    b"AUTH-SUCCESS",
    b"AUTH-FAILURE",
    b"VERSION",
    b"CONNECT",
    b"CONNECTDONE",
    b"NOTIFYCHANGE",
    b"CHANGED",
    b"CHECKPRESENT",
    b"LOCKCONTENT",
    b"UNLOCKCONTENT",
    b"REMOVE",
    b"REMOVE-BEFORE",
    b"GETTIMESTAMP",
    b"TIMESTAMP",
    b"GET",
    b"PUT",
    b"PUT-FROM",
    b"ALREADY-HAVE",
    b"ALREADY-HAVE-PLUS",
    b"SUCCESS",
    b"SUCCESS-PLUS",
    b"FAILURE",
    b"FAILURE-PLUS",
    b"BYPASS",
    b"DATA",
    b"DATA-PRESENT",
    b"VALID",
    b"INVALID",
    b"ERROR",
]


def check_parse_total(line: bytes) -> None:
    """parse either returns a message or raises ParseError, and what it returns
    serialises to a line that parses to the same message."""
    try:
        m = parse(line)
    except ParseError:
        return
    assert isinstance(m, Message)
    assert len(line) <= MAX_LINE
    if b"\n" in line:
        return  # never a line: the decoder splits at \n before parse sees it
    text = getattr(m, "text", None) or getattr(m, "refs", None)
    if isinstance(text, str) and text.endswith("\r"):
        return  # "ERROR x\r\r": one \r is the line ending, the other is text
    assert roundtrip(m) == m


@PROPS
@given(st.binary(max_size=300))
def test_parse_any_bytes(line: bytes) -> None:
    check_parse_total(line)


@PROPS
@given(
    st.sampled_from(COMMANDS),
    st.one_of(
        st.binary(max_size=100),
        st.text(alphabet=" \t%/-.0123456789sSmCEWORM\r\x00\xa0\u3000é", max_size=60).map(
            lambda t: t.encode()
        ),
    ),
)
def test_parse_command_with_any_rest(command: bytes, rest: bytes) -> None:
    check_parse_total(command + b" " + rest)
    check_parse_total(command + rest)


_mutation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 4)),
    st.tuples(st.just("replace"), st.integers(0, 10**6), st.integers(0, 255)),
)


@PROPS
@given(messages, st.lists(_mutation, min_size=1, max_size=4))
def test_parse_mutated_lines(m: Message, mutations: list[tuple[str, int, object]]) -> None:
    line = bytearray(serialise(m)[:-1])
    for op, pos, arg in mutations:
        i = pos % (len(line) + 1)
        if op == "insert":
            assert isinstance(arg, bytes)
            line[i:i] = arg
        elif op == "delete":
            assert isinstance(arg, int)
            del line[i : i + arg]
        elif line:
            assert isinstance(arg, int)
            line[min(i, len(line) - 1)] = arg
    check_parse_total(bytes(line))


def test_max_line() -> None:
    ok = b"ERROR " + b"x" * (MAX_LINE - 6)
    assert len(ok) == MAX_LINE
    assert parse(ok) == Error("x" * (MAX_LINE - 6))
    for line in (
        ok + b"x",
        ok + b"\r",
        b"\xff" * (MAX_LINE + 1),
        b"CHECKPRESENT WORM--" + b"x" * MAX_LINE,
        b"SUCCESS" + b" " * MAX_LINE,
    ):
        with pytest.raises(ParseError):
            parse(line)


@QUICK
@given(st.sampled_from(COMMANDS), st.integers(MAX_LINE + 1, MAX_LINE + 100), st.binary(max_size=8))
def test_over_max_line(command: bytes, size: int, filler: bytes) -> None:
    line = (command + b" " + (filler or b"x") * size)[: max(size, len(command) + 1)]
    assert len(line) > MAX_LINE
    with pytest.raises(ParseError):
        parse(line)


# --- byte exactness -------------------------------------------------------------

_junk = st.binary(min_size=1, max_size=40)


def _no_nl(b: bytes) -> bytes:
    return b.replace(b"\n", b"?")


@st.composite
def wire_keys(draw: st.DrawFn) -> bytes:
    backend = draw(st.sampled_from([b"WORM", b"SHA256", b"URL", b"SHA256E", b"X\xff"]))
    fields = b"".join(
        b"-" + letter + str(draw(numbers)).encode()
        for letter in (b"s", b"m", b"S", b"C")
        if draw(st.booleans())
    )
    name = bytes(b for b in draw(_junk) if b >= 0x20 and b != 0x7F) or b"\xff"
    if backend.endswith(b"E") and _ext_len(name) > 64:
        name = name.replace(b".", b"_")
    return backend + fields + b"--" + name


@st.composite
def wire_afs(draw: st.DrawFn) -> bytes:
    raw = draw(st.binary(min_size=1, max_size=30))
    out = bytes(b for b in raw if b > 0x20 and b not in (0x7F, ord("%")))
    out = out.replace(b"\xc2", b"") or b"\xfe"  # no C1 controls, no NBSP (C2 xx)
    if draw(st.booleans()):
        out = out[:1] + b"%%" + out[1:]
    if out.startswith(b"/"):
        out = b"_" + out
    af = dec(out)
    if any(hs_space(c) or hs_control(c) for c in af):
        return b"f"
    return out


@PROPS
@given(
    st.one_of(
        wire_keys().map(lambda k: b"CHECKPRESENT " + k),
        wire_keys().map(lambda k: b"LOCKCONTENT " + k),
        st.tuples(numbers, wire_keys()).map(lambda t: b"REMOVE-BEFORE %d %s" % t),
        st.tuples(wire_afs(), wire_keys()).map(lambda t: b"PUT %s %s" % t),
        wire_keys().map(lambda k: b"PUT  " + k),
        st.tuples(numbers, wire_afs(), wire_keys()).map(lambda t: b"GET %d %s %s" % t),
        st.binary(max_size=80).map(lambda b: b"ERROR " + _no_nl(b)),
        st.binary(max_size=80).map(lambda b: b"CHANGED " + _no_nl(b)),
    )
)
@example(b"PUT \xff\xfe%%x SHA256E-s3--\xc3\x28.txt")
@example(b"ERROR \x00\xff\xc3 \xe2\x82 ok")
@example(b"CHECKPRESENT WORM--\xed\xa0\x80 \xf0\x9f\x92\xa9 \xc0\xaf")
def test_non_utf8_bytes_roundtrip_exactly(line: bytes) -> None:
    if line.endswith(b"\r"):
        line += b"x"
    assert serialise(parse(line)) == line + b"\n"
