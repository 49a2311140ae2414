"""trainer/ has no import circle, and its arrows point one way: the entry point -> the job ->
common, the tools -> common (and other tools: gpu_check runs bench's suite); common imports
neither, the job never imports a tool or the entry point, a tool never imports the job or the
entry point."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.processes import REPO

TRAINER = REPO / "trainer"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(TRAINER.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}  # docstrings only


def _imports(path: Path) -> set[str]:
    """The trainer modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {name for name in names if name in MODULES and name not in PACKAGES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _kind(name: str) -> str:
    if name.startswith("trainer.common"):
        return "common"
    if name.startswith("trainer.job"):
        return "job"
    return "entry point" if name == "trainer.train" else "tool"


# what each kind of module may import, transitively
ALLOWED = {"common": {"common"}, "job": {"job", "common"}, "tool": {"tool", "common"},
           "entry point": {"job", "common"}}


def test_the_module_list_is_what_the_layout_says():
    assert {"trainer.train", "trainer.probe", "trainer.caption", "trainer.export", "trainer.job.trainer",
            "trainer.job.backend", "trainer.job.fsdp2_backend", "trainer.job.deepspeed_backend",
            "trainer.common.evaluation", "trainer.common.checkpoints"} <= set(MODULES)
    assert GRAPH["trainer.train"] >= {"trainer.job.trainer"}  # the graph is not empty by mistake


def test_no_import_circle_in_trainer():
    circles = [name for name in MODULES if name in _reach(name)]
    assert not circles, circles


def test_arrows_point_one_way():
    wrong = {name: sorted(m for m in _reach(name) if m not in MODULES or _kind(m) not in ALLOWED[_kind(name)])
             for name in MODULES if name not in PACKAGES}
    assert not {k: v for k, v in wrong.items() if v}, wrong


PROBE = """
import json, multiprocessing, sys
import torch  # what every module imports anyway, loaded once before the forks

def load(name, queue):
    try:
        __import__(name)
        queue.put((name, sorted(m for m in sys.modules if m.startswith("trainer")), None))
    except BaseException as e:
        queue.put((name, [], repr(e)))

names = json.loads(sys.argv[1])
ctx = multiprocessing.get_context("fork")
out = {}
for name in names:
    queue = ctx.Queue()
    child = ctx.Process(target=load, args=(name, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join()
    out[got[0]] = got[1:]
print(json.dumps(out))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in its own process (a circle held together by import order
    breaks when the other side is imported first); a tool loads neither the job nor the
    entry point."""
    names = [name for name in MODULES if name not in PACKAGES]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(names)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert set(loaded) == set(names)
    for name, (modules, error) in loaded.items():
        assert error is None, (name, error)
        assert set(modules) - PACKAGES <= _reach(name) | {name}, name  # nothing the static graph misses
    assert "trainer.train" not in loaded["trainer.probe"][0]
    assert not [m for m in loaded["trainer.probe"][0] if m.startswith("trainer.job")]
