"""Imports only go down: propensity_cli -> training, server -> propensity (the core).

Every import counts, also the lazy ones inside functions and under TYPE_CHECKING, and
importlib.import_module("...") with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Package -> top-level packages of this repository it must never import.
FORBIDDEN = {
    "propensity": {"training", "server", "propensity_cli", "bench"},
    "training": {"server", "propensity_cli", "bench"},
    "server": {"training", "propensity_cli", "bench"},
}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in source, module being its dotted name."""
    package = module.rsplit(".", 1)[0] if "." in module else module
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module or ""))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _modules(package: str) -> list[Path]:
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down(package: str) -> None:
    files = _modules(package)
    assert files, f"no modules found under {package}/"
    violations = []
    for path in files:
        relative = path.relative_to(PROJECT_ROOT)
        module = ".".join(relative.with_suffix("").parts)
        for line, name in imported_modules(path.read_text(), module):
            if name.split(".")[0] in FORBIDDEN[package]:
                violations.append(f"{relative}:{line} imports {name}")
    assert not violations, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(violations)


def test_the_scan_sees_lazy_relative_and_dynamic_imports() -> None:
    source = (
        "import typing\n"
        "if typing.TYPE_CHECKING:\n    from server.app import serve\n"
        "def f():\n    import training.train\n    from . import cli\n    from ..x import y\n"
        "    importlib.import_module('propensity_cli.main')\n"
    )
    names = [name for _, name in imported_modules(source, "propensity.sub.mod")]
    assert names == ["typing", "server.app", "training.train", "propensity.sub", "propensity.x", "propensity_cli.main"]
