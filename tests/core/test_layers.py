"""The layers of torbridge/ hold: each package imports only those below it.

The order is the one README's "Layout" and docs/architecture.md list. Lazy
imports inside functions count too: a cycle hidden in a function body is
still a cycle for whoever reads the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torbridge

ROOT = Path(torbridge.__file__).parent
# Lowest first. `config` is a leaf every layer above the core may read.
ORDER = ("protocol", "tokens", "annex", "transport", "tor", "server", "testnet", "ops")
LEAVES = {"config": set[str]()}
# The commands on top may import anything.
COMMANDS = {"cli", "demo", "p2p_program", "__main__", "__init__"}


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def torbridge_imports(path: Path) -> set[str]:
    """The torbridge packages a module imports (any depth, any place)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "torbridge" and len(parts) > 1:
                found.add(parts[1])
    return found


def allowed(package: str) -> set[str]:
    if package in LEAVES:
        return LEAVES[package] | {package}
    below = set(ORDER[: ORDER.index(package)])
    return below | {package} | ({"config"} if package != "protocol" else set())


MODULES = sorted(p for p in ROOT.rglob("*.py") if package_of(p) not in COMMANDS)


def test_every_package_is_placed() -> None:
    packages = {package_of(p) for p in ROOT.rglob("*.py")}
    assert packages <= set(ORDER) | set(LEAVES) | COMMANDS, packages


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_the_layers_below(path: Path) -> None:
    package = package_of(path)
    wrong = torbridge_imports(path) - allowed(package)
    assert not wrong, f"{path.relative_to(ROOT)} ({package}) imports {sorted(wrong)}"


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from torbridge.server import session\n")
    assert torbridge_imports(bad) == {"server"}
    assert "server" not in allowed("protocol") and "server" not in allowed("tor")
