"""What a token allows: one type for each idea, shared by every layer.

``Mode`` governs annexed content on the token's endpoints (git-annex's own
server modes); ``GitAccess`` governs the proxy's own git repository, which
CONNECT reaches from every endpoint; a ``Grant`` is what AUTH with a valid
token gives a session. The decisions that use them live with their
exchanges: the relay (protocol/relay.py) and git access
(protocol/gitaccess.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.StrEnum):
    """A token's access to annexed content; the value is its name on disk and on
    the command line."""

    READ_WRITE = "rw"
    APPEND_ONLY = "append"  # no REMOVE
    READ_ONLY = "ro"  # no PUT, no REMOVE

    @classmethod
    def parse(cls, text: str) -> Mode:
        """ValueError for anything but one of ``MODES``."""
        try:
            return cls(text)
        except ValueError:
            modes = ", ".join(MODES)
            raise ValueError(f"unknown access mode {text!r}: use one of {modes}") from None


MODES: tuple[str, ...] = tuple(mode.value for mode in Mode)


class GitAccess(enum.IntEnum):
    """A token's access to the proxy's git repository. Ordered: each level
    allows what the ones below it do."""

    NONE = 0  # neither git fetch nor git push
    READ = 1  # git fetch / pull
    WRITE = 2  # git push, but no history rewrite of a protected branch
    REWRITE = 3  # git push, force-pushes and deletions of protected branches too

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> GitAccess:
        """ValueError for anything but one of ``GIT_LABELS``."""
        for level in cls:
            if level.label == text:
                return level
        raise ValueError(f"unknown git access {text!r}: use one of {', '.join(GIT_LABELS)}")


GIT_LABELS: tuple[str, ...] = tuple(level.label for level in GitAccess)


@dataclass(frozen=True)
class Grant:
    """What AUTH with a valid token gives a session."""

    token_name: str
    mode: Mode
    git: GitAccess | None = None  # None: what the mode gives (protocol/gitaccess.py)
