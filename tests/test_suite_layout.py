"""The suite's layout: test modules share code only through tests/helpers, never by
importing one another (a test module imported elsewhere has its tests collected twice over
and cannot be renamed or run alone), and tests/helpers holds no tests (pytest would not
collect them: a test there would silently never run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPERS = TESTS / "helpers"
# an import of a test module, also in code kept in strings to run in a subprocess
TEST_MODULE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:tests\.)?(test_\w+)", re.MULTILINE)


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_module_imports_another_test_module():
    imports = []
    for path in _python_files(TESTS):
        source = path.read_text()
        for match in TEST_MODULE_IMPORT.finditer(source):
            line = source.count("\n", 0, match.start(1)) + 1
            imports.append(f"{path.relative_to(TESTS)}:{line} imports {match.group(1)}")
    assert imports == [], "share code through tests/helpers instead:\n" + "\n".join(imports)


def _tests_defined(tree: ast.Module) -> list[str]:
    """What pytest would collect as tests from this module, were it a test module."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            found.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found.append(node.name)
    return found


def test_helpers_define_no_tests():
    helpers = _python_files(HELPERS)
    assert len(helpers) > 5  # the folder is where this test looks
    tests = [f"{path.relative_to(TESTS)}: {name}" for path in helpers
             for name in _tests_defined(ast.parse(path.read_text()))]
    assert tests == [], "tests in tests/helpers never run; move them to a test module:\n" + "\n".join(tests)


def test_every_slow_module_named_exists():
    """conftest.py marks slow modules by name: a renamed one would silently join the fast loop."""
    from tests.conftest import SLOW_MODULES

    missing = sorted(name for name in SLOW_MODULES if not (TESTS / f"{name}.py").is_file())
    assert missing == [], f"tests/conftest.py SLOW_MODULES names no file: {missing}"
