"""setup.cfg names what each part of the repository imports: ``install_requires`` what the four
installed packages import (and nothing they do not), the ``bench`` extra what benchmarks/ adds,
the ``test`` extra what the tests add, ``dev`` both extras; and benchmarks/ is not installed."""

from __future__ import annotations

import ast
import configparser
import fnmatch
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.helpers.import_graph import IMPORTED, PACKAGE_ROOTS, REPO

CONFIG = configparser.ConfigParser()
CONFIG.read(REPO / "setup.cfg")
# imported through another package's module: torch.utils.tensorboard needs tensorboard
THROUGH = {"torch.utils.tensorboard": "tensorboard"}
LOCAL = {*PACKAGE_ROOTS, "benchmarks", "tests"} | {path.stem for path in (REPO / "tests").glob("*.py")}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(text: str) -> set[str]:
    """Distribution names of a setup.cfg list (versions and comments dropped)."""
    return {_normalised(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0])
            for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


INSTALL = _requirements(CONFIG["options"]["install_requires"])
EXTRAS = {name: _requirements(text) for name, text in CONFIG["options.extras_require"].items()}


def _distributions(imported: set[str]) -> set[str]:
    """The installed distributions that provide the third-party modules named."""
    providers = packages_distributions()
    found = {_normalised(THROUGH[name]) for name in imported if name in THROUGH}
    for top in {name.split(".")[0] for name in imported} - LOCAL - set(sys.stdlib_module_names):
        assert top in providers, f"{top}: imported, but no installed distribution provides it"
        found |= {_normalised(d) for d in providers[top]}
    return found


def _imported_by_files(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return names


PRODUCT = _distributions(set().union(*IMPORTED.values()))


def test_install_requires_is_what_the_packages_import():
    assert PRODUCT == INSTALL, {"imported, not required": sorted(PRODUCT - INSTALL),
                                "required, not imported": sorted(INSTALL - PRODUCT)}


def test_the_bench_extra_is_what_the_benchmarks_add():
    needed = _distributions(_imported_by_files(REPO / "benchmarks"))
    assert needed - INSTALL == EXTRAS["bench"], sorted(needed - INSTALL)


def test_the_test_extra_covers_what_the_tests_add():
    """pytest-timeout is the plugin that reads setup.cfg's ``timeout``; nothing imports it."""
    needed = _distributions(_imported_by_files(REPO / "tests")) - INSTALL - EXTRAS["bench"]
    assert needed | {"pytest-timeout"} == EXTRAS["test"], sorted(needed)


def test_dev_is_bench_and_test_and_benchmarks_is_not_installed():
    assert EXTRAS["dev"] == {"dpvision"} and "dpvision[bench,test]" in CONFIG["options.extras_require"]["dev"]
    include = CONFIG["options.packages.find"]["include"].split()  # find:'s patterns
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert "benchmarks" in packages
    assert {name for name in packages if any(fnmatch.fnmatch(name, pattern) for pattern in include)} \
        == set(PACKAGE_ROOTS)
