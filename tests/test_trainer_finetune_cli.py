"""The fine-tuning contract end to end, in subprocesses: ``python -m trainer.train --config
finetune_own data.classes=FOLDER --init WEIGHTS ...`` prints ``fine-tuned top-1:`` and writes
the evaluation JSON; a private step with noise 0 and an unreachable clip norm is the
non-private step; a resumed run ends where the uninterrupted one does; export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers.classes import TINY, write_folder
from tests.helpers.processes import REPO

JOB = [*TINY, "ds.train_batch_size=8", "ds.train_micro_batch_size_per_gpu=8", "optim.warmup_steps=1",
       "metrics.log_every=1", "metrics.progress=false", "eval.val_fraction=0.25"]


def _run(cwd: Path, module: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _encoder_weights(tmp: Path) -> Path:
    """A tiny DP-Cap's weights in our layout, as trainer.export writes them."""
    import models

    torch.manual_seed(1)
    model = models.create_model("dpcap_nano", **{o.split("=")[0].split(".")[-1]: int(o.split("=")[1]) for o in TINY})
    path = tmp / "encoder.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _finetune(cwd: Path, folder: Path, init: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(cwd, "trainer.train", "--config", "finetune_own", f"data.classes={folder}", "--init", str(init),
                *JOB, *args)


def _params(step_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=True)["app"]["model"]


def test_the_contract_head_and_all_private_and_not_then_export(tmp_path):
    folder = write_folder(tmp_path / "images", per_class=8)
    init = _encoder_weights(tmp_path)
    for layers in ("head", "all"):
        for private in (True, False):
            name = f"{layers}_{'dp' if private else 'plain'}"
            extra = ["privacy.target_epsilon=8"] if private else ["privacy.enabled=false", "--allow-non-private"]
            proc = _finetune(tmp_path, folder, init, f"finetune.layers={layers}", "steps=3", f"name={name}", *extra)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("fine-tuned top-1:"))
            assert "(3 classes, chance 0.333; 6 validation images" in line, line
            assert ("epsilon = " in proc.stdout) == private and ("NONE (non-private run)" in proc.stdout) != private
            results = json.loads((tmp_path / f"runs/{name}/tb/eval_step_00000003.json").read_text())
            assert 0 <= results["top1"] <= 1 and "top5" not in results  # top-5 only with more than 5 classes
            assert results["finetune"]["layers"] == layers and results["finetune"]["train_examples"] == 18
    # head only: the encoder is the --init weights, bit for bit; all: it moved
    ours = torch.load(init, weights_only=True)["model"]
    head = _params(tmp_path / "runs/head_dp/checkpoints/step_00000003", tmp_path / "head.pt")
    every = _params(tmp_path / "runs/all_dp/checkpoints/step_00000003", tmp_path / "all.pt")
    key = "blocks.1.attn.qkv.weight"
    assert torch.equal(head[f"encoder.{key}"], ours[key]) and not torch.equal(every[f"encoder.{key}"], ours[key])
    assert not torch.equal(head["head.weight"], torch.zeros_like(head["head.weight"]))

    # export: the classifier in our layout, which a new fine-tuning job takes as --init
    _run(tmp_path, "trainer.export", "runs/all_dp/checkpoints", "classifier.pth")
    exported = torch.load(tmp_path / "classifier.pth", weights_only=True)["model"]
    assert exported.keys() == {k for k in every if not k.startswith("average")}
    torch.testing.assert_close(exported["head.weight"], every["head.weight"])
    proc = _finetune(tmp_path, folder, tmp_path / "classifier.pth", "steps=1", "name=again",
                     "privacy.target_epsilon=8")
    assert "fine-tuned top-1:" in proc.stdout
    original = _run(tmp_path, "trainer.export", "runs/all_dp/checkpoints", "o.pth", "--layout", "original", ok=False)
    assert original.returncode == 2 and "has no original layout" in original.stderr
    # the encoder tools say what judges a classifier instead of failing inside it
    image = str(next(Path(folder).rglob("*.png")))
    for tool, extra in (("trainer.probe", ["--data", str(folder)]), ("trainer.caption", [image]),
                        ("trainer.evaluate", ["--data", str(folder)])):
        refused = _run(tmp_path, tool, "runs/all_dp/checkpoints", *extra, ok=False)
        assert refused.returncode == 2 and "holds a fine-tuned classifier" in refused.stderr, (tool, refused.stderr)


def test_bad_input_gets_a_clear_message_and_exit_2(tmp_path):
    folder = write_folder(tmp_path / "images", classes=("cat",))
    proc = _run(tmp_path, "trainer.train", "--config", "finetune_own", f"data.classes={folder}", *JOB, ok=False)
    assert proc.returncode == 2 and "a classifier needs at least two class folders" in proc.stderr


STEP_WORKER = textwrap.dedent("""
    import sys, torch
    from trainer.common.config import load_config
    from trainer.job.trainer import Trainer

    overrides, out = sys.argv[1].split(), sys.argv[2]
    params = {}
    for kind, extra in (("private", ["privacy.noise_multiplier=0", "privacy.max_grad_norm=1e9",
                                     "privacy.secret_seed=3"]),
                        ("plain", ["privacy.enabled=false"])):
        trainer = Trainer(load_config("finetune_own", overrides + extra + [f"name={kind}"]), allow_non_private=True)
        sampler = type("Fixed", (), {"step_batches": lambda self, step: [[0, 3, 5, 8], [11, 14, 17]]})()
        batches = list(trainer.task.reader(sampler).micro_batches(0))
        for step in range(2):  # the second step: the first moved the head off zero, the encoder gets a gradient
            trainer.state.step = step
            trainer.train_step(iter(batches), len(batches))
        with trainer.backend.gathered() as model:
            params[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.lock.release()
    torch.save(params, out)
""")


def test_a_private_step_with_noise_0_and_an_unreachable_clip_norm_is_the_non_private_step(tmp_path):
    """Same model, same micro-batches (7 examples, 2 views each, every layer trained): private steps
    (per-example gradients of the grouped views, clipped at 1e9, noise 0, divided by B) and ordinary
    ones (the mean loss) move the parameters alike."""
    folder = write_folder(tmp_path / "images", per_class=8)
    init = _encoder_weights(tmp_path)
    (tmp_path / "worker.py").write_text(STEP_WORKER)
    args = " ".join([f"data.classes={folder}", f"init={init}", *JOB, "finetune.layers=all",
                     "finetune.views=2", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.weight_decay=0"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), args, str(tmp_path / "out.pt")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    before = torch.load(init, weights_only=True)["model"]
    for name, private in out["private"].items():
        torch.testing.assert_close(private, out["plain"][name], rtol=1e-5, atol=1e-6)
        if name.startswith("encoder."):  # every layer took the steps
            assert not torch.equal(private, before[name[len("encoder."):]]), name


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    """Private, 2 views, an average of the parameters: 4 steps straight, or 2 then 2 more after a
    resume (the reader's position, the secret seeds and the average all come back)."""
    folder = write_folder(tmp_path / "images", per_class=8)
    init = _encoder_weights(tmp_path)
    common = ["finetune.layers=last:1", "finetune.views=2", "finetune.ema=0.5", "privacy.noise_multiplier=1.0",
              "privacy.secret_seed=11", "checkpoint.every_steps=2", "finetune.eval_every=1"]
    _finetune(tmp_path, folder, init, *common, "steps=4", "name=straight")
    _finetune(tmp_path, folder, init, *common, "steps=2", "name=resumed")
    proc = _finetune(tmp_path, folder, init, *common, "steps=4", "name=resumed")
    assert "resumed from" in proc.stderr
    straight = _params(tmp_path / "runs/straight/checkpoints/step_00000004", tmp_path / "a.pt")
    resumed = _params(tmp_path / "runs/resumed/checkpoints/step_00000004", tmp_path / "b.pt")
    assert straight.keys() == resumed.keys() and "average_head_weight" in straight
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    assert not torch.equal(straight["average_head_weight"], straight["head.weight"])
    assert int(straight["average_steps"]) == 4
    # the export releases the average, in the parameters' places
    _run(tmp_path, "trainer.export", "runs/straight/checkpoints", "averaged.pth")
    exported = torch.load(tmp_path / "averaged.pth", weights_only=True)["model"]
    assert torch.equal(exported["head.weight"], straight["average_head_weight"])
    assert torch.equal(exported["encoder.blocks.0.attn.qkv.weight"], straight["encoder.blocks.0.attn.qkv.weight"])
    # evaluated every step: eval_step_3 and _4 after the resume, with the average
    assert (tmp_path / "runs/resumed/tb/eval_step_00000003.json").is_file()
    assert json.loads((tmp_path / "runs/resumed/tb/eval_step_00000004.json").read_text())["finetune"]["averaged"]
