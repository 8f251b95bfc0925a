"""Dependency direction: app -> backends -> models. models/ and backends/ never import textual;
app/ never imports torch or mlx (it asks the engine); models/ imports no framework at all."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    "models": {"textual", "torch", "mlx", "xqchat.backends", "xqchat.app"},
    "backends": {"textual", "xqchat.app"},
    "app": {"torch", "mlx"},
}


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(RULES))
def test_layering(package):
    for path in (ROOT / package).rglob("*.py"):
        for module in imported_modules(path):
            banned = [b for b in RULES[package] if module == b or module.startswith(b + ".")]
            assert not banned, f"{path.relative_to(ROOT)} imports {module}"
    assert any((ROOT / package).rglob("*.py"))
