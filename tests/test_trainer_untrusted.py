"""Checkpoints from elsewhere run no code: a crafted DCP .metadata, a crafted DeepSpeed file and a
crafted .pth, each holding a payload that would create a marker file when unpickled, are
refused with a message by resume, --init, probe, caption, evaluate and export, and the marker
never appears. Each payload is first shown to be live (plain unpickling creates the marker)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.checkpoints import save_like_trainer
from tests.helpers.jobs import run_jobs
from tests.helpers.payloads import WritesMarker, assert_live, craft_torch_file
from tests.helpers.processes import REPO
from tests.helpers.standin import TINY_MODEL, TinyCaptioner, tiny_config
from trainer import caption, evaluate, export, probe
from trainer.common.build import build_model, build_tokenizer
from trainer.common.checkpoints import DCP_METADATA, read_dcp_metadata
from trainer.common.config import load_config


def _craft_dcp(step: Path, marker: Path) -> None:
    """A real DCP metadata with a payload among its fields."""
    metadata = read_dcp_metadata(step)
    metadata.storage_meta.modules = [WritesMarker(str(marker))]
    (step / DCP_METADATA).write_bytes(pickle.dumps(metadata))
    assert_live(marker, lambda: pickle.loads((step / DCP_METADATA).read_bytes()))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A tiny DP-Cap as a DCP checkpoint, as a DeepSpeed-layout checkpoint (meta.json,
    weights.pt, deepspeed/) and as a .pth file, each crafted; an image and a class folder."""
    tmp = tmp_path_factory.mktemp("crafted")
    marker = tmp / "MARKER"
    cfg = load_config("default", TINY_MODEL)
    model = build_model(cfg, build_tokenizer(cfg))
    dcp_step = save_like_trainer(tmp / "dcp", cfg, model)
    _craft_dcp(dcp_step, marker)
    ds_step = save_like_trainer(tmp / "ds", cfg, model)
    for f in ds_step.iterdir():
        if f.name != "meta.json":
            f.unlink()
    meta = json.loads((ds_step / "meta.json").read_text())
    meta["train_state"]["backend"] = "deepspeed"
    (ds_step / "meta.json").write_text(json.dumps(meta))
    (ds_step / "deepspeed").mkdir()
    craft_torch_file(ds_step / "weights.pt", marker, {"model": model.state_dict()})
    craft_torch_file(tmp / "weights.pth", marker, {"model": model.state_dict()})
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("red square", "blue circle"):
            (tmp / "classes" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    tmp / "classes" / split / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / "photo.png")
    return tmp, marker


def test_the_tools_refuse_every_crafted_checkpoint(crafted, capsys):
    tmp, marker = crafted
    sources = {"DCP .metadata": ([str(tmp / "dcp")], "refusing"),
               "DeepSpeed weights.pt": ([str(tmp / "ds")], "not unpickled"),
               ".pth": ([str(tmp / "weights.pth"), "--config", str(tmp / "config.json")], "not unpickled")}
    tools = {
        "export": lambda src: export.main([src[0], str(tmp / "out.pth"), *src[1:]]),
        "probe": lambda src: probe.main([*src, "--examples", "8", "--shots", "", "--device", "cpu"]),
        "caption": lambda src: caption.main([*src, str(tmp / "photo.png"), "--device", "cpu"]),
        "evaluate": lambda src: evaluate.main([*src, "--data", str(tmp / "classes"), "--shots", "",
                                               "--methods", "", "--device", "cpu", "--out", str(tmp / "r.json")]),
    }
    for source, (args, message) in sources.items():
        for tool, run in tools.items():
            assert run(args) == 2, (tool, source)
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("error: ") and message in err, (tool, source, err)
            assert not marker.exists(), (tool, source)
    assert not (tmp / "out.pth").exists() and not (tmp / "r.json").exists()


ATTEMPTS = """
import json, sys
sys.path[:0] = [sys.argv[1]]
from tests.helpers.standin import TinyCaptioner, tiny_data
from trainer.common.config import load_config
from trainer.job.trainer import Trainer
out = {}
for name, config, overrides in json.loads(sys.argv[2]):
    cfg = load_config(config, overrides)
    try:
        Trainer(cfg, allow_non_private=True, model_factory=lambda c, t: TinyCaptioner(),
                train_data=tiny_data(cfg.data.num_examples))
        out[name] = "loaded"
    except ValueError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_resume_and_init_refuse_every_crafted_checkpoint(tmp_path):
    """Real fsdp2 and deepspeed checkpoints of the trainer (one step), crafted, then resumed and
    given to --init, in one process (no launcher: one rank)."""
    marker = tmp_path / "MARKER"
    configs = {name: tiny_config(tmp_path / name, steps=1, **{"optim.warmup_steps": 0})
               for name in ("fsdp2", "deepspeed")}
    run_jobs(1, tmp_path, [("fsdp2", configs["fsdp2"], []),
                           ("deepspeed", configs["deepspeed"], ["backend=deepspeed", "ds.zero_optimization.stage=2"])],
             launcher="python")
    dcp_step, ds_step = (tmp_path / name / "ckpt" / "step_00000001" for name in ("fsdp2", "deepspeed"))
    _craft_dcp(dcp_step, marker)
    craft_torch_file(ds_step / "deepspeed" / "mp_rank_00_model_states.pt", marker)
    craft_torch_file(ds_step / "weights.pt", marker)
    craft_torch_file(tmp_path / "weights.pth", marker, {"model": TinyCaptioner().state_dict()})
    fresh = {"checkpoint.dir": str(tmp_path / "fresh")}
    attempts = [
        ("resume DCP", "fsdp2", ["steps=2"], "refusing"),
        ("resume DeepSpeed", "deepspeed", ["steps=2", "backend=deepspeed", "ds.zero_optimization.stage=2"],
         "refusing"),
        ("--init DCP", "fsdp2", [f"init={dcp_step}", *_dotted(fresh)], "refusing"),
        ("--init DeepSpeed", "fsdp2", [f"init={ds_step}", *_dotted(fresh)], "not unpickled"),
        ("--init .pth", "fsdp2", [f"init={tmp_path / 'weights.pth'}", *_dotted(fresh)], "not unpickled"),
    ]
    cases = [(name, str(tmp_path / f"{config}.json"), overrides) for name, config, overrides, _ in attempts]
    proc = subprocess.run([sys.executable, "-c", ATTEMPTS, str(REPO), json.dumps(cases)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, _, _, message in attempts:
        assert message in results[name], (name, results[name])
    assert not marker.exists()
    assert "Nothing in it was run" in results["resume DeepSpeed"] and "mp_rank_00_model_states.pt" in \
        results["resume DeepSpeed"]


def _dotted(overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]
