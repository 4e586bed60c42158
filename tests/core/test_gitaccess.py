"""Git access per token, and which ref updates a push may make (no I/O).

The decisions of protocol/gitaccess.py, the relay's answer to CONNECT for
each access level, what admission grants, and the token store's field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from torbridge.config import Limits
from torbridge.protocol import messages as m
from torbridge.protocol.gitaccess import (
    GIT_READ_ONLY_ERROR,
    NO_GIT_ERROR,
    default_for,
    effective,
    is_protected,
    needs_ancestry,
    push_refusal,
)
from torbridge.protocol.permissions import GIT_LABELS as LABELS
from torbridge.protocol.permissions import GitAccess, Grant, Mode
from torbridge.protocol.relay import (
    READ_ONLY_ERROR,
    Relay,
)
from torbridge.protocol.relayactions import (
    CheckAuth,
    EndSession,
    RefuseService,
    RunService,
    Side,
)
from torbridge.server.admission import Admission
from torbridge.tokens import TokenError, TokenStore

NONE, READ, WRITE, REWRITE = GitAccess
OLD = "1" * 40
NEW = "2" * 40
ZERO = "0" * 40
ZERO256 = "0" * 64


# --- the level of a token ------------------------------------------------------


def test_labels_and_order() -> None:
    assert LABELS == ("none", "read", "write", "rewrite")
    assert NONE < READ < WRITE < REWRITE
    assert all(GitAccess.parse(level.label) is level for level in GitAccess)
    with pytest.raises(ValueError, match="unknown git access 'push'"):
        GitAccess.parse("push")


@pytest.mark.parametrize(
    ("mode", "reaches_own", "level"),
    [
        (Mode.READ_WRITE, True, WRITE),
        (Mode.APPEND_ONLY, True, READ),
        (Mode.READ_ONLY, True, READ),
        (Mode.READ_WRITE, False, READ),  # a node-scoped rw token: read at most
        (Mode.APPEND_ONLY, False, READ),
        (Mode.READ_ONLY, False, READ),
    ],
)
def test_default_follows_mode_and_endpoints(
    mode: Mode, reaches_own: bool, level: GitAccess
) -> None:
    assert default_for(mode, reaches_own) is level


@pytest.mark.parametrize(
    ("endpoints", "explicit", "level"),
    [
        (None, None, WRITE),  # every endpoint, so the proxy's own one too
        (("hub",), None, WRITE),
        (("hub", "node1"), None, WRITE),
        (("node1",), None, READ),  # the issue's `token add nodeonly --endpoint node1`
        (("node1", "node2"), None, READ),
        (("node1",), WRITE, WRITE),  # granted explicitly
        (("node1",), REWRITE, REWRITE),
        (("hub",), NONE, NONE),  # explicit wins downwards as well
        (None, READ, READ),
    ],
)
def test_effective_access_of_an_rw_token(
    endpoints: tuple[str, ...] | None, explicit: GitAccess | None, level: GitAccess
) -> None:
    assert effective(Mode.READ_WRITE, explicit, endpoints, {"hub", "mirror"}) is level


def test_no_own_endpoint_configured() -> None:
    # Limited tokens cannot reach the proxy's repository by any endpoint...
    assert effective(Mode.READ_WRITE, None, ("node1",), ()) is READ
    # ... an unlimited one counts as the operator's full-access token.
    assert effective(Mode.READ_WRITE, None, None, ()) is WRITE


# --- which ref updates a push may make ---------------------------------------------


@pytest.mark.parametrize(
    ("ref", "head", "protected"),
    [
        ("refs/heads/main", None, True),
        ("refs/heads/master", None, True),
        ("refs/heads/git-annex", None, True),
        ("refs/heads/synced/main", None, True),
        ("refs/heads/synced/git-annex", None, True),
        ("refs/heads/synced/feature/x", None, True),
        ("refs/heads/trunk", "refs/heads/trunk", True),  # where HEAD points
        ("refs/heads/trunk", None, False),  # HEAD detached
        ("refs/heads/feature", "refs/heads/main", False),
        ("refs/heads/mainline", "refs/heads/main", False),
        ("refs/heads/synced", None, False),
        ("refs/tags/v1", None, False),
        ("refs/heads/git-annex-old", None, False),
    ],
)
def test_protected_branches(ref: str, head: str | None, protected: bool) -> None:
    assert is_protected(ref, head) is protected


@pytest.mark.parametrize("zero", [ZERO, ZERO256])
def test_creating_a_protected_branch_is_allowed(zero: str) -> None:
    assert not needs_ancestry("refs/heads/synced/main", zero, NEW, None)
    assert push_refusal("refs/heads/synced/main", zero, NEW, None, None) is None


@pytest.mark.parametrize("zero", [ZERO, ZERO256])
def test_deleting_a_protected_branch_is_refused(zero: str) -> None:
    assert not needs_ancestry("refs/heads/git-annex", OLD, zero, None)
    refusal = push_refusal("refs/heads/git-annex", OLD, zero, None, None)
    assert refusal == "deleting refs/heads/git-annex is refused: it is a protected branch"


def test_updates_of_a_protected_branch() -> None:
    ref = "refs/heads/main"
    assert needs_ancestry(ref, OLD, NEW, None)
    assert push_refusal(ref, OLD, NEW, None, True) is None  # a fast-forward
    refusal = push_refusal(ref, OLD, NEW, None, False)
    assert refusal is not None and "is not a fast-forward" in refusal
    doubt = push_refusal(ref, OLD, NEW, None, None)  # git could not tell: history stays
    assert doubt is not None and "cannot be checked" in doubt


def test_unprotected_refs_are_left_alone() -> None:
    for old, new in ((OLD, NEW), (OLD, ZERO), (ZERO, NEW)):
        assert not needs_ancestry("refs/heads/feature", old, new, "refs/heads/main")
        assert push_refusal("refs/heads/feature", old, new, "refs/heads/main", False) is None


def test_the_head_branch_is_protected() -> None:
    assert push_refusal("refs/heads/trunk", OLD, NEW, "refs/heads/trunk", False) is not None
    assert push_refusal("refs/heads/trunk", OLD, NEW, "refs/heads/main", False) is None


# --- the relay's answer to CONNECT --------------------------------------------------


def connect(mode: Mode, git: GitAccess | None, service: str) -> list[object]:
    relay = Relay("SERVER-UUID", "peer")
    assert relay.receive(Side.CLIENT, m.Auth("CLIENT-UUID", "tok")) == [
        CheckAuth("CLIENT-UUID", "tok")
    ]
    relay.auth_accepted(mode, git)
    actions = relay.receive(Side.CLIENT, m.Connect(service))
    assert actions[-1] == EndSession(f"CONNECT {service} done")
    assert relay.done
    return list(actions[:-1])


UP, RECEIVE = "git-upload-pack", "git-receive-pack"


@pytest.mark.parametrize(
    ("mode", "git", "fetch", "push"),
    [
        # Defaults (git=None): what the mode gives, as before this permission.
        (Mode.READ_WRITE, None, RunService(UP), RunService(RECEIVE)),
        (Mode.APPEND_ONLY, None, RunService(UP), RefuseService(RECEIVE, READ_ONLY_ERROR)),
        (Mode.READ_ONLY, None, RunService(UP), RefuseService(RECEIVE, READ_ONLY_ERROR)),
        # Explicit levels.
        (
            Mode.READ_WRITE,
            NONE,
            RefuseService(UP, NO_GIT_ERROR),
            RefuseService(RECEIVE, NO_GIT_ERROR),
        ),
        (
            Mode.READ_ONLY,
            NONE,
            RefuseService(UP, NO_GIT_ERROR),
            RefuseService(RECEIVE, NO_GIT_ERROR),
        ),
        (Mode.READ_WRITE, READ, RunService(UP), RefuseService(RECEIVE, GIT_READ_ONLY_ERROR)),
        (Mode.APPEND_ONLY, READ, RunService(UP), RefuseService(RECEIVE, READ_ONLY_ERROR)),
        (Mode.READ_WRITE, WRITE, RunService(UP), RunService(RECEIVE, may_rewrite=False)),
        (Mode.APPEND_ONLY, WRITE, RunService(UP), RunService(RECEIVE, may_rewrite=False)),
        (Mode.READ_WRITE, REWRITE, RunService(UP), RunService(RECEIVE, may_rewrite=True)),
    ],
)
def test_connect_by_access(mode: Mode, git: GitAccess | None, fetch: object, push: object) -> None:
    assert connect(mode, git, UP) == [fetch]
    assert connect(mode, git, RECEIVE) == [push]


# --- admission and the token store --------------------------------------------------


def test_admission_grants_the_effective_access(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    tokens = {
        "everywhere": store.add("everywhere", "rw"),
        "hubonly": store.add("hubonly", "rw", ["hub"]),
        "nodeonly": store.add("nodeonly", "rw", ["node1"]),
        "nodewriter": store.add("nodewriter", "rw", ["node1"], WRITE),
        "reader": store.add("reader", "ro"),
        "contentonly": store.add("contentonly", "rw", None, NONE),
    }
    admission = Admission(store, Limits(), own_endpoints=["hub"])
    want = {
        "everywhere": WRITE,
        "hubonly": WRITE,
        "nodeonly": READ,
        "nodewriter": WRITE,
        "reader": READ,
        "contentonly": NONE,
    }
    for name, token in tokens.items():
        endpoint = "node1" if name.startswith("node") else "hub"
        grant = admission.authorize(endpoint, token)
        assert isinstance(grant, Grant) and grant.git is want[name], name
        admission.release(grant)


def test_store_keeps_explicit_git_only(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state")
    store.add("plain", "rw")
    store.add("strict", "rw", ["node1"], NONE)
    raw = json.loads((tmp_path / "state" / "tokens.json").read_text())["tokens"]
    assert "git" not in raw["plain"]  # the default is not written down
    assert raw["strict"]["git"] == "none"
    plain, strict = store.list()
    assert plain.git is None and strict.git is NONE


def test_a_store_from_before_git_access_is_read(tmp_path: Path) -> None:
    """Entries without "git" (every store written before it) get the default."""
    state = tmp_path / "state"
    state.mkdir()
    token = "ab" * 64
    entry = {
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "mode": "rw",
        "created": "2025-01-31T12:00:00Z",
        "endpoints": ["node1"],
    }
    (state / "tokens.json").write_text(json.dumps({"version": 1, "tokens": {"old": entry}}))
    info = TokenStore(state).check(token)
    assert info is not None and info.git is None
    assert info.git_access(["hub"]) is READ  # node-scoped: read at most
    assert info.git_access(["node1"]) is WRITE


@pytest.mark.parametrize("bad", ["push", "", 2, ["write"]])
def test_a_bad_git_value_makes_the_file_invalid(tmp_path: Path, bad: object) -> None:
    state = tmp_path / "state"
    state.mkdir()
    entry = {"sha256": "0" * 64, "mode": "rw", "created": "x", "endpoints": None, "git": bad}
    (state / "tokens.json").write_text(json.dumps({"version": 1, "tokens": {"t": entry}}))
    with pytest.raises(TokenError, match='unknown "git"'):
        TokenStore(state).list()


def test_add_refuses_a_git_that_is_not_a_level(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="unknown git access"):
        TokenStore(tmp_path / "state").add("t", "rw", None, "write")  # type: ignore[arg-type]
