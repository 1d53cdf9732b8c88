"""The one-way import rule (docs/architecture.md): cli -> gates, report -> runner -> attacks, defenses -> core.

Checked on the source (every import statement, top level or inside a function), so a lazy
import cannot hide an upward dependency.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"cli": 4, "gates": 3, "report": 3, "runner": 2, "attacks": 1, "defenses": 1}  # everything else in s2l_guard: core, 0


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] in ("attacks", "defenses"):
        return 1
    if parts[0] == "s2l_guard" and len(parts) > 1:
        return LAYER.get(parts[1], 0)
    return -1  # third-party and the standard library: below everything


def imported(path: Path) -> list[tuple[str, bool]]:
    """(name, is a module) of every import statement; ``from pkg import x`` may name a module or an attribute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            found += [(module, True)] if node.module else [(f"{module}.{alias.name}", False) for alias in node.names]
    return found


def imports(path: Path) -> list[str]:
    return [name for name, _ in imported(path)]


SOURCES = sorted(p for folder in ("s2l_guard", "attacks", "defenses") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_only(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    own = layer_of(module)
    upward = [name for name in imports(path) if layer_of(name) > own]
    # plugins of one kind do not reach into the other kind's modules either
    sideways = [name for name in imports(path) if own == 1 and layer_of(name) == 1 and name.split(".")[0] != module.split(".")[0]]
    assert not upward and not sideways, f"{module} imports {upward + sideways}; see docs/architecture.md for the one-way rule"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_own_import_resolves(path):
    """A lazy import inside a function runs only on its path; a moved module must not leave one dangling."""
    own = [(name, module) for name, module in imported(path) if name.split(".")[0] in ("s2l_guard", "attacks", "defenses")]
    missing = [name for name, module in own if importlib.util.find_spec(name if module else name.rpartition(".")[0]) is None]
    assert not missing, f"{path.relative_to(ROOT)} imports {missing}, which do not exist"
