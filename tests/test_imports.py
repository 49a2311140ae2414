"""The arrows between the four installed packages point one way, and no module imports one that
imports it back.

Read off every import statement (at the top of a module or inside a function) with ast:

- privacy/, models/ and data/ never import trainer/;
- data/ imports neither models/ nor privacy/ (the trainer injects the tokenizer and the sampler);
- models/ imports of privacy/ are ``privacy.layers`` alone (plain nn.Modules, no privacy logic);
- no import circle among the modules of all four packages;
- none imports ``benchmarks`` (the measuring tools, not installed) or the tests;
- within trainer/: the entry point -> the job -> common <- the tools; common imports neither,
  the job never imports a tool or the entry point, a tool never imports the job, the entry
  point or another tool;
- each module imports alone in a fresh interpreter (a circle held together by import order
  breaks when the other side is imported first), loading nothing the static graph misses.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.import_graph import GRAPH, IMPORTED, MODULES, PACKAGE_ROOTS, PACKAGES, REPO


def _reach(start: str, graph: dict[str, set[str]] = GRAPH) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


# what importing a module loads: what it names, and the packages above each (their __init__ runs
# first); not an arrow of its own (a package's __init__ may gather its submodules)
LOADS = {name: targets | {p for m in targets | {name} for p in _parents(m)} for name, targets in GRAPH.items()}


def _package(name: str) -> str:
    return name.split(".")[0]


def _offending(frm: tuple[str, ...], may_not: tuple[str, ...]) -> dict[str, list[str]]:
    """Modules of packages ``frm`` -> the modules of packages ``may_not`` they import, directly or not."""
    found = {name: sorted(m for m in _reach(name) if _package(m) in may_not)
             for name in MODULES if _package(name) in frm}
    return {name: wrong for name, wrong in found.items() if wrong}


def test_the_module_list_is_what_the_layout_says():
    assert {"privacy.engine", "privacy.layers", "privacy.audit.cli", "models.dpcap", "data.shard_sets",
            "data.offset_tables", "data.index_shards", "trainer.train", "trainer.probe", "trainer.caption",
            "trainer.export", "trainer.job.trainer", "trainer.job.backend", "trainer.job.fsdp2_backend",
            "trainer.job.deepspeed_backend", "trainer.common.evaluation", "trainer.common.checkpoints"} <= set(MODULES)
    # the graph is not empty by mistake
    assert GRAPH["trainer.train"] >= {"trainer.job.trainer"} and "privacy.layers" in _reach("models.vip")
    assert "data.offset_tables" in GRAPH["data.shard_sets"] and "torch" in IMPORTED["privacy.engine"]


def test_privacy_models_and_data_never_import_trainer():
    assert not _offending(("privacy", "models", "data"), ("trainer",))


def test_data_imports_neither_models_nor_privacy():
    assert not _offending(("data",), ("models", "privacy"))


def test_models_import_of_privacy_is_its_layers_alone():
    wrong = {name: sorted(m for m in _reach(name) if _package(m) == "privacy" and m != "privacy.layers")
             for name in MODULES if _package(name) == "models"}
    assert not {name: v for name, v in wrong.items() if v}, wrong


def test_no_import_circle():
    circles = {name: sorted(m for m in GRAPH[name] if name in _reach(m)) for name in MODULES if name in _reach(name)}
    assert not circles, circles  # each module -> the modules it imports that lead back to it


def test_no_package_imports_the_benchmarks_or_the_tests():
    wrong = {name: sorted(m for m in names if _package(m) in ("benchmarks", "tests", "conftest")
                          or _package(m).startswith("test_"))
             for name, names in IMPORTED.items()}
    assert not {name: v for name, v in wrong.items() if v}, wrong


def _kind(name: str) -> str:
    if name.startswith("trainer.common"):
        return "common"
    if name.startswith("trainer.job"):
        return "job"
    return "entry point" if name == "trainer.train" else "tool"


# what each kind of trainer module may import, transitively
ALLOWED = {"common": {"common"}, "job": {"job", "common"}, "tool": {"common"}, "entry point": {"job", "common"}}


def test_trainer_arrows_point_one_way():
    trainer = [name for name in MODULES if _package(name) == "trainer" and name not in PACKAGES]
    wrong = {name: sorted(m for m in _reach(name) if _package(m) == "trainer" and m not in PACKAGES
                          and _kind(m) not in ALLOWED[_kind(name)])
             for name in trainer}
    assert not {k: v for k, v in wrong.items() if v}, wrong


PROBE = """
import json, multiprocessing, sys
import torch  # what most modules import anyway, loaded once before the forks

def load(name, roots, queue):
    try:
        __import__(name)
        queue.put((name, sorted(m for m in sys.modules if m.split(".")[0] in roots), None))
    except BaseException as e:
        queue.put((name, [], repr(e)))

names, roots = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ctx = multiprocessing.get_context("fork")
out = {}
for name in names:
    queue = ctx.Queue()
    child = ctx.Process(target=load, args=(name, roots, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join()
    out[got[0]] = got[1:]
print(json.dumps(out))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in its own process; what it loads of ours is what its imports name (and
    the packages above them); a trainer tool loads neither the job nor the entry point."""
    names = list(MODULES)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(names), json.dumps([*PACKAGE_ROOTS, "benchmarks"])],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert set(loaded) == set(names)
    for name, (modules, error) in loaded.items():
        assert error is None, (name, error)
        static = {name} | _reach(name, LOADS)
        assert set(modules) <= static, (name, sorted(set(modules) - static))  # nothing the static graph misses
    assert "trainer.train" not in loaded["trainer.probe"][0]
    assert not [m for m in loaded["trainer.probe"][0] if m.startswith("trainer.job")]
