"""The import graph of the four installed packages, read off every import statement with ast
(at the top of a module or inside a function): what tests/test_imports.py checks the arrows of,
and tests/test_requirements.py the third-party names of."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_ROOTS = ("privacy", "models", "data", "trainer")


def _modules() -> dict[str, Path]:
    found = {}
    for root in PACKAGE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name the file imports, project or not (``from a import b``: ``a.b`` when that
    is a module of ours, else ``a``); relative imports resolved against the file's package."""
    package = name if name in PACKAGES else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return names


IMPORTED = {name: _imported_names(name, path) for name, path in MODULES.items()}
# the modules of ours each module names in an import statement
GRAPH = {name: {m for m in names if m in MODULES} for name, names in IMPORTED.items()}
