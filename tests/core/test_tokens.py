"""The token store: hashing at rest, constant-time checks, reloads, file hygiene."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from torbridge import tokens
from torbridge.protocol.permissions import MODES, Mode
from torbridge.tokens import TokenError, TokenInfo, TokenStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _write_raw(state_dir: Path, doc: object) -> None:
    state_dir.mkdir(exist_ok=True)
    (state_dir / "tokens.json").write_text(json.dumps(doc))


# --- add / list / check / revoke ---------------------------------------------------


def test_add_returns_128_lowercase_hex(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    assert re.fullmatch(r"[0-9a-f]{128}", token)
    assert store.add("bob") != token


def test_add_list_check_revoke(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    t_alice = store.add("alice")
    t_bob = store.add("bob", "ro", ["hub", "backup"])

    infos = store.list()
    assert [i.name for i in infos] == ["alice", "bob"]
    alice, bob = infos
    assert (alice.mode, alice.endpoints) == ("rw", None)
    assert (bob.mode, bob.endpoints) == ("ro", ("backup", "hub"))

    assert store.check(t_alice) == alice
    assert store.check(t_bob) == bob

    store.revoke("alice")
    assert store.check(t_alice) is None
    assert store.check(t_bob) == bob
    assert [i.name for i in store.list()] == ["bob"]


def test_list_is_sorted_by_name(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    for name in ["zed", "Alpha", "mid", "alpha"]:
        store.add(name)
    assert [i.name for i in store.list()] == ["Alpha", "alpha", "mid", "zed"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_kept(tmp_path: Path, mode: str) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("t", mode)
    info = store.check(token)
    assert info is not None
    assert info.mode == mode


def test_created_is_iso8601_utc(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    before = datetime.now(UTC).replace(microsecond=0)
    store.add("alice")
    (info,) = store.list()
    created = datetime.fromisoformat(info.created)
    assert created.utcoffset() is not None
    assert created.utcoffset() == UTC.utcoffset(None)
    assert before <= created <= datetime.now(UTC)


def test_missing_file_means_no_tokens(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    assert store.list() == []
    assert store.check("a" * 128) is None
    assert not _state(tmp_path).exists(), "reading must not create the state dir"


def test_revoke_unknown(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    with pytest.raises(TokenError, match="no token named 'ghost'"):
        store.revoke("ghost")
    assert not _state(tmp_path).exists()
    store.add("alice")
    with pytest.raises(TokenError, match="no token named 'ghost'"):
        store.revoke("ghost")
    assert [i.name for i in store.list()] == ["alice"]


def test_duplicate_name_is_refused_and_keeps_the_first(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice", "ro")
    with pytest.raises(TokenError, match="already exists"):
        store.add("alice", "rw")
    info = store.check(token)
    assert info is not None
    assert info.mode == "ro"
    assert len(store.list()) == 1


@pytest.mark.parametrize("name", ["", "a" * 65, "a b", "a/b", "../x", "ü", "x\n", "a:b", "\x00"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    store = TokenStore(_state(tmp_path))
    with pytest.raises(TokenError, match="invalid token name") as exc:
        store.add(name)
    assert store.list() == []
    if name:
        assert name not in str(exc.value)


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 64, "-lead", "..."])
def test_good_names_are_accepted(tmp_path: Path, name: str) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add(name)
    info = store.check(token)
    assert info is not None
    assert info.name == name


def test_bad_mode_and_endpoints_are_refused(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    with pytest.raises(TokenError, match="unknown access mode 'admin'"):
        store.add("a", "admin")
    with pytest.raises(TokenError, match="not a string"):
        store.add("a", "rw", "hub")
    with pytest.raises(TokenError, match="at least one endpoint"):
        store.add("a", "rw", [])
    with pytest.raises(TokenError, match="invalid endpoint name"):
        store.add("a", "rw", ["hub", "bad name"])
    assert store.list() == []


def test_endpoints_are_deduplicated_and_sorted(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    store.add("a", "append", ["hub", "b", "hub"])
    assert store.list()[0].endpoints == ("b", "hub")


# --- what is at rest ------------------------------------------------------------------


def test_file_holds_only_a_hash(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice", "append", ["hub"])
    raw = (_state(tmp_path) / "tokens.json").read_bytes()
    assert token.encode() not in raw
    assert token.upper().encode() not in raw
    # Not even a long piece of it.
    assert token[:32].encode() not in raw

    doc = json.loads(raw)
    assert doc == {
        "version": 1,
        "tokens": {
            "alice": {
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "mode": "append",
                "created": store.list()[0].created,
                "endpoints": ["hub"],
            }
        },
    }


def test_nothing_in_the_state_dir_holds_the_token(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    store.add("bob")
    for f in _state(tmp_path).iterdir():
        assert token.encode() not in f.read_bytes(), f
    # Atomic writes leave no temporary files behind.
    assert sorted(f.name for f in _state(tmp_path).iterdir()) == ["tokens.json", "tokens.lock"]


def test_reprs_and_errors_never_show_the_token(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    info = store.check(token)
    assert token not in repr(info)
    assert token not in repr(store)
    # A token pasted where a name belongs is not echoed back.
    with pytest.raises(TokenError) as exc:
        store.revoke(token)
    assert token not in str(exc.value)
    with pytest.raises(TokenError) as exc:
        store.add(token)
    assert token not in str(exc.value)
    assert not hasattr(info, "token")


def test_modes_of_state_dir_and_file(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    old = os.umask(0o022)
    try:
        TokenStore(state).add("alice")
    finally:
        os.umask(old)
    assert _mode(state) == 0o700
    assert _mode(state / "tokens.json") == 0o600
    assert _mode(state / "tokens.lock") == 0o600


def test_modes_are_exact_even_under_a_strict_umask(tmp_path: Path) -> None:
    # 0277 would leave a 0500 dir and a 0400 file without the explicit chmods.
    state = _state(tmp_path)
    old = os.umask(0o277)
    try:
        store = TokenStore(state)
        store.add("alice")
        store.add("bob")
    finally:
        os.umask(old)
    assert _mode(state) == 0o700
    assert _mode(state / "tokens.json") == 0o600
    assert [i.name for i in store.list()] == ["alice", "bob"]


def test_existing_state_dir_keeps_its_mode(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.mkdir()
    os.chmod(state, 0o750)
    TokenStore(state).add("alice")
    assert _mode(state) == 0o750
    assert _mode(state / "tokens.json") == 0o600


# --- check ----------------------------------------------------------------------------


def test_check_is_case_insensitive(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(token))
    for variant in (token, token.upper(), mixed):
        info = store.check(variant)
        assert info is not None
        assert info.name == "alice"


@pytest.mark.parametrize(
    "presented",
    [
        "",
        " ",
        "-",
        "0",
        "\n",
        "g" * 128,
        "١٢٣",  # Arabic-Indic digits: isalnum() but not [A-Za-z0-9]
        "\uff46\uff46",  # fullwidth letters
    ],
)
def test_garbage_never_matches(tmp_path: Path, presented: str) -> None:
    store = TokenStore(_state(tmp_path))
    store.add("alice")
    assert store.check(presented) is None


def test_near_misses_never_match(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    sha = hashlib.sha256(token.encode()).hexdigest()
    for presented in (token[:-1], token + "0", " " + token, token + "\n", token + " ", sha):
        assert store.check(presented) is None, presented


def test_malformed_token_never_matches_even_a_crafted_entry(tmp_path: Path) -> None:
    # check() hashes a placeholder for malformed tokens; an entry holding that
    # placeholder's hash must still not let a malformed token in.
    state = _state(tmp_path)
    entry = {"mode": "rw", "created": "2025-01-01T00:00:00Z", "endpoints": None}
    _write_raw(
        state,
        {
            "version": 1,
            "tokens": {
                name: {"sha256": hashlib.sha256(word.encode()).hexdigest(), **entry}
                for name, word in [("dash", "-"), ("empty", ""), ("space", " ")]
            },
        },
    )
    store = TokenStore(state)
    assert len(store.list()) == 3
    for presented in ("-", "", " ", "!", "a-b"):
        assert store.check(presented) is None, presented


def test_check_compares_with_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TokenStore(_state(tmp_path))
    tokens_ = [store.add(f"t{i}") for i in range(5)]
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (tokens_[0], tokens_[4], "nope", "", "!!"):
        calls.clear()
        store.check(presented)
        assert len(calls) == 5, presented


def test_check_rereads_only_when_the_file_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    parses = 0
    real = tokens._parse

    def counting(data: bytes) -> dict[str, tokens._Entry]:
        nonlocal parses
        parses += 1
        return real(data)

    monkeypatch.setattr(tokens, "_parse", counting)
    for _ in range(3):
        assert store.check(token) is not None
    assert parses == 1
    TokenStore(_state(tmp_path)).add("bob")  # parses too: count from here
    parses = 0
    assert store.check(token) is not None
    assert store.check(token) is not None
    assert parses == 1


# --- several stores / processes ----------------------------------------------------


def test_revoke_is_seen_by_another_instance_at_once(tmp_path: Path) -> None:
    daemon = TokenStore(_state(tmp_path))
    cli = TokenStore(_state(tmp_path))
    token = cli.add("alice")
    assert daemon.check(token) is not None  # now cached by the daemon
    cli.revoke("alice")
    assert daemon.check(token) is None
    assert daemon.list() == []


def test_add_by_another_instance_is_seen_at_once(tmp_path: Path) -> None:
    daemon = TokenStore(_state(tmp_path))
    assert daemon.check("a" * 128) is None  # caches "no file"
    token = TokenStore(_state(tmp_path)).add("alice")
    info = daemon.check(token)
    assert info is not None
    assert info.name == "alice"


def test_revoke_then_readd_same_name_gives_a_new_token(tmp_path: Path) -> None:
    daemon = TokenStore(_state(tmp_path))
    cli = TokenStore(_state(tmp_path))
    old = cli.add("alice")
    assert daemon.check(old) is not None
    cli.revoke("alice")
    new = cli.add("alice")
    assert daemon.check(old) is None
    assert daemon.check(new) is not None


def test_same_instance_sees_its_own_writes(tmp_path: Path) -> None:
    store = TokenStore(_state(tmp_path))
    token = store.add("alice")
    assert store.check(token) is not None
    store.revoke("alice")
    assert store.check(token) is None


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    # Each store opens its own lock descriptor, so flock serialises threads
    # exactly as it serialises processes.
    state = _state(tmp_path)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        store = TokenStore(state)
        try:
            for i in range(10):
                store.add(f"w{w}-{i}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(TokenStore(state).list()) == 60


# --- a corrupt file ---------------------------------------------------------------


CORRUPT = [
    pytest.param(b"{not json", "not JSON", id="syntax"),
    pytest.param(b"\xff\xfe", "not UTF-8", id="encoding"),
    pytest.param(b"[]", "not a JSON object", id="array"),
    pytest.param(b'{"version": 2, "tokens": {}}', "unsupported version 2", id="version"),
    pytest.param(b'{"version": 1}', '"tokens" is not an object', id="no-tokens"),
    pytest.param(
        b'{"version": 1, "tokens": {"a": {"sha256": "xyz", "mode": "rw",'
        b' "created": "", "endpoints": null}}}',
        '"sha256" is not 64 lowercase hex',
        id="bad-hash",
    ),
    pytest.param(
        b'{"version": 1, "tokens": {"a": {"sha256": "' + b"0" * 64 + b'", "mode": "root",'
        b' "created": "", "endpoints": null}}}',
        "unknown \"mode\" 'root'",
        id="bad-mode",
    ),
    pytest.param(
        b'{"version": 1, "tokens": {"a": {"sha256": "' + b"0" * 64 + b'", "mode": "rw",'
        b' "created": "", "endpoints": "hub"}}}',
        '"endpoints" is neither null nor a list',
        id="bad-endpoints",
    ),
    pytest.param(
        b'{"version": 1, "tokens": {"a b": {}}}',
        "bad token name 'a b'",
        id="bad-name",
    ),
]


@pytest.mark.parametrize(("content", "reason"), CORRUPT)
def test_corrupt_file_makes_cli_operations_fail(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    state = _state(tmp_path)
    state.mkdir()
    path = state / "tokens.json"
    path.write_bytes(content)
    store = TokenStore(state)
    prefix = f"token file {path} is not valid: "
    for op in (store.list, lambda: store.add("new"), lambda: store.revoke("a")):
        with pytest.raises(TokenError) as exc:
            op()
        assert str(exc.value).startswith(prefix)
        assert reason in str(exc.value)
        assert "\n" not in str(exc.value)
    assert path.read_bytes() == content, "a failed operation must not rewrite the file"


@pytest.mark.parametrize(("content", "reason"), CORRUPT)
def test_corrupt_file_makes_check_refuse_and_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
) -> None:
    state = _state(tmp_path)
    state.mkdir()
    (state / "tokens.json").write_bytes(content)
    store = TokenStore(state)
    with caplog.at_level(logging.ERROR, logger="torbridge.tokens"):
        assert store.check("a" * 128) is None
    errors = [r for r in caplog.records if r.name == "torbridge.tokens"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert reason in errors[0].getMessage()


def test_check_logs_a_corrupt_file_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state(tmp_path)
    store = TokenStore(state)
    token = store.add("alice")
    good = (state / "tokens.json").read_bytes()
    assert store.check(token) is not None

    (state / "tokens.json").write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR, logger="torbridge.tokens"):
        for _ in range(3):
            assert store.check(token) is None
    assert len([r for r in caplog.records if r.name == "torbridge.tokens"]) == 1

    # Repaired by the operator: accepted again without a restart.
    tmp = state / "fixed"
    tmp.write_bytes(good)
    os.replace(tmp, state / "tokens.json")
    info = store.check(token)
    assert info is not None
    assert info == TokenInfo(
        name="alice", mode=Mode.READ_WRITE, created=store.list()[0].created, endpoints=None
    )
