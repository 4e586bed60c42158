"""Git access, as a permission of its own: who may fetch, push, rewrite.

CONNECT always reaches the proxy's own git repository, from whichever
endpoint it arrives (git-annex's proxy does the same), so a token's access
to git cannot simply follow its mode: a token meant to store content on one
node must not be able to push into the hub. The decisions are here, with no
I/O: what a token's git access is (``effective``), and whether one ref
update of a push may go through (``push_refusal``, asked by the update hook
that ``server/pushguard.py`` installs for pushes through the bridge).
"""

from __future__ import annotations

from collections.abc import Collection

from torbridge.protocol.permissions import GitAccess, Mode

NO_GIT_ERROR = "this token has no git access; git fetch and push denied"
GIT_READ_ONLY_ERROR = "this token may fetch but not push; git push denied"


def default_for(mode: Mode, reaches_own_repository: bool = True) -> GitAccess:
    """The git access of a token that was given none explicitly.

    ``rw`` writes, ``append`` and ``ro`` read. A token limited to endpoints
    none of which is the proxy's own repository (only nodes, clusters) reads
    at most: it was made to reach those, not to change the hub's git.
    """
    level = GitAccess.WRITE if mode == Mode.READ_WRITE else GitAccess.READ
    if not reaches_own_repository:
        level = min(level, GitAccess.READ)
    return level


def effective(
    mode: Mode,
    explicit: GitAccess | None,
    endpoints: Collection[str] | None,
    own_endpoints: Collection[str],
) -> GitAccess:
    """A token's git access: ``explicit`` if the operator gave one, else the default.

    ``endpoints`` is the token's limit (None: every endpoint, which counts
    as reaching the proxy's own repository); ``own_endpoints`` are the
    endpoints that serve it (``remote = "."``).
    """
    if explicit is not None:
        return explicit
    reaches = endpoints is None or any(name in own_endpoints for name in endpoints)
    return default_for(mode, reaches)


# --- history rewrites --------------------------------------------------------------

MAIN_LIKE = ("refs/heads/main", "refs/heads/master")
ANNEX_BRANCH = "refs/heads/git-annex"
SYNCED_PREFIX = "refs/heads/synced/"


def is_protected(ref: str, head: str | None) -> bool:
    """A branch whose history a push through the bridge may not rewrite.

    ``main`` and ``master``, the branch the proxy's HEAD points to (``head``,
    a full ref name, or None when HEAD is detached), ``git-annex`` (trust,
    preferred content, location, cluster and proxy logs) and every
    ``synced/*`` branch (what other clients' ``git annex sync`` merges).
    """
    fixed = ref in MAIN_LIKE or ref == ANNEX_BRANCH or ref.startswith(SYNCED_PREFIX)
    return fixed or (head is not None and ref == head)


def is_null(oid: str) -> bool:
    return bool(oid) and set(oid) == {"0"}


def push_refusal(
    ref: str, old: str, new: str, head: str | None, fast_forward: bool | None
) -> str | None:
    """Why one ref update (as git's update hook gets it) must be refused, or None.

    ``fast_forward``: whether ``old`` is an ancestor of ``new``; None when it
    could not be told (an object that is not a commit, git failed), which
    refuses a protected branch's update: in doubt, history stays.
    Creating a branch is always allowed; so is anything to an unprotected ref.
    """
    if is_null(old) or not is_protected(ref, head):
        return None
    if is_null(new):
        return f"deleting {ref} is refused: it is a protected branch"
    if fast_forward:
        return None
    why = "is not a fast-forward" if fast_forward is False else "cannot be checked"
    return f"updating {ref} {why}: rewriting a protected branch's history is refused"


REWRITE_HINT = "(pushes through torbridge may not rewrite history; a token with --git rewrite may)"


def needs_ancestry(ref: str, old: str, new: str, head: str | None) -> bool:
    """Whether ``push_refusal`` needs to know if the update is a fast-forward."""
    return not is_null(old) and not is_null(new) and is_protected(ref, head)
