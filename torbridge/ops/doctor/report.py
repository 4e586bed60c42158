"""The doctor's report: one Check per line, and the exit status it gives."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Check:
    """One line of the report.

    ``ok`` is False for failures and for skipped checks; ``severity`` says
    whether a failure stops the service ("error") or only matters in some
    setups ("warning"). ``fix`` says what to do when not ok.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    severity: Severity = "error"
    skipped: bool = False

    @property
    def failed(self) -> bool:
        """A real failure (not a skip) that stops torbridge from serving."""
        return not self.ok and not self.skipped and self.severity == "error"


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def _fail(name: str, detail: str, fix: str, severity: Severity = "error") -> Check:
    return Check(name, False, detail, fix, severity)


def _skip(name: str, reason: str) -> Check:
    return Check(name, False, reason, None, "error", skipped=True)


def format_report(checks: Iterable[Check]) -> str:
    """One line per check: ``ok   name: detail``, ``FAIL name: detail — fix: ...``.

    Warnings are ``WARN``, skipped checks ``skip``; every prefix is four
    characters wide so the names line up.
    """
    lines = []
    for c in checks:
        if c.ok:
            tag = "ok  "
        elif c.skipped:
            tag = "skip"
        elif c.severity == "warning":
            tag = "WARN"
        else:
            tag = "FAIL"
        line = f"{tag} {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f" — fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def exit_status(checks: Iterable[Check]) -> int:
    """1 if any error-level check failed, else 0 (warnings do not count)."""
    return 1 if any(c.failed for c in checks) else 0
