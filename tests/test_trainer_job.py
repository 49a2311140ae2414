"""The real CLI on the real models/ and data/: a miniature default job, --init."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.cli import TINY_JOB, checkpoint_params, run_cli, train_tiny_default
from tests.helpers.processes import REPO
from tests.helpers.standin import TINY_MODEL

def test_default_job_in_miniature_then_init_from_an_upstream_checkpoint(tmp_path):
    proc = train_tiny_default(tmp_path, "name=mini")
    text = proc.stdout
    assert "trained 3/3 steps" in text and "epsilon = " in text and "zero-shot colour: accuracy" in text
    assert "linear probe shape: top-1 " in text and "(6 classes, chance 0.167; 6 train / 6 test" in text
    assert "runs/mini/tb" in text and "runs/mini/checkpoints" in text
    assert (tmp_path / "runs/mini/shards/index.json").is_file()
    step = tmp_path / "runs/mini/checkpoints/step_00000003"
    assert (step / "meta.json").is_file()
    events = EventAccumulator(str(tmp_path / "runs/mini/tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "captions/text_summary" in events.Tags()["tensors"]
    assert {"eval/zero_shot_colour", "eval/probe_colour"} <= set(events.Tags()["scalars"])

    # --init with the same weights in the original DP-Cap layout, trained with lr 0
    import models

    ours = checkpoint_params(step, tmp_path)
    upstream = models.to_upstream_state_dict(ours)
    torch.save({"model": upstream}, tmp_path / "upstream.pth")
    train_tiny_default(tmp_path, "name=init", "optim.lr=0.0", "steps=1", "--init", str(tmp_path / "upstream.pth"))
    again = checkpoint_params(tmp_path / "runs/init/checkpoints/step_00000001", tmp_path)
    for key, value in ours.items():
        assert torch.equal(again[key], value), key
    # and from our own checkpoint folder (DCP, weights only: a fresh run at step 0)
    train_tiny_default(tmp_path, "name=init2", "optim.lr=0.0", "steps=1", "--init", str(tmp_path / "runs/mini/checkpoints"))
    again = checkpoint_params(tmp_path / "runs/init2/checkpoints/step_00000001", tmp_path)
    for key, value in ours.items():
        assert torch.equal(again[key], value), key


def test_vip_stage_one_then_private_stage_two_from_it_then_a_probe(tmp_path):
    """ViP's recipe through the CLI: non-private MAE on synthetic images, then the private
    stage initialised from it (its preset's --init), then a linear probe of its encoder."""
    tiny = [*TINY_MODEL, "data.num_examples=200", "ds.train_batch_size=32", "ds.train_micro_batch_size_per_gpu=16",
            "data.num_workers=0", "optim.warmup_steps=1", "checkpoint.every_steps=0"]
    one = run_cli(tmp_path, "trainer.train", "--config", "vip_stage1", *tiny, "steps=3", "--allow-non-private")
    assert "trained 3/3 steps" in one.stdout and "NONE (non-private run)" in one.stdout
    assert "linear probe colour: top-1 " in one.stdout and "linear probe object: top-1 " in one.stdout
    # lr 0: stage two starts from, and keeps, stage one's weights
    two = run_cli(tmp_path, "trainer.train", "--config", "vip_stage2", *tiny, "steps=1", "optim.lr=0.0",
               "data.shards=runs/vip_stage1/shards")
    assert "trained 1/1 steps" in two.stdout and "epsilon = " in two.stdout
    first = checkpoint_params(tmp_path / "runs/vip_stage1/checkpoints/step_00000003", tmp_path)
    second = checkpoint_params(tmp_path / "runs/vip_stage2/checkpoints/step_00000001", tmp_path)
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(second[key], value), key
    probe = run_cli(tmp_path, "trainer.probe", "runs/vip_stage2/checkpoints", "--data", "synthetic:colour",
                 "--examples", "80", "--shots", "1", "--trials", "2", "--device", "cpu")
    assert probe.stdout.startswith("linear probe: top-1 ") and "(8 classes, chance 0.125" in probe.stdout


def test_init_refuses_a_file_that_needs_unpickling(tmp_path):
    """An original training checkpoint also pickles its argparse.Namespace: never unpickled."""
    import argparse

    import pytest

    import models
    from trainer.common.checkpoints import load_model_weights

    model = models.create_model("dpcap_nano", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    path = tmp_path / "base-eps7.pth"
    torch.save({"model": models.to_upstream_state_dict(model.state_dict()),
                "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="not unpickled"):
        load_model_weights(model, str(path), models.convert_upstream_state_dict)


def test_the_deepspeed_launcher_runs_the_real_job_under_zero3_then_export_reads_it(tmp_path):
    """The README's cluster command with backend=deepspeed: deepspeed --module trainer.train
    on 2 ranks, real models and data, ZeRO-3 (every parameter partitioned); the end-of-job
    evaluation (captions, zero-shot, probes) of the partitioned model; a DeepSpeed
    checkpoint that trainer.export reads, and that backend fsdp2 refuses to resume."""
    import json

    from tests.helpers.processes import free_port

    from trainer import export

    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(launcher), "--no_ssh", "--node_rank", "0", "--num_gpus", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "--module", "trainer.train", "--config", "default", *TINY_JOB,
                           "steps=2", "name=ds", "backend=deepspeed", "ds.zero_optimization.stage=3",
                           "ds.zero_optimization.stage3_param_persistence_threshold=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trained 2/2 steps" in proc.stdout and "epsilon = " in proc.stdout
    assert "zero-shot colour: accuracy" in proc.stdout and "linear probe shape: top-1 " in proc.stdout
    step = tmp_path / "runs/ds/checkpoints/step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["train_state"]["backend"] == "deepspeed" and meta["train_state"]["world_size"] == 2 and (step / "deepspeed").is_dir()
    weights = torch.load(step / "weights.pt", weights_only=True)["model"]
    assert weights and all(v.dtype == torch.float32 and v.numel() > 0 for v in weights.values())

    assert export.main([str(tmp_path / "runs/ds/checkpoints"), str(tmp_path / "w.pth")]) == 0
    exported = torch.load(tmp_path / "w.pth", weights_only=True)["model"]
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)

    refused = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "default", *TINY_JOB, "steps=3",
                              "name=ds"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "written by backend=deepspeed" in refused.stderr


def test_running_the_trainer_as_a_file_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "trainer" / "train.py"), "--config", "default"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "python -m trainer.train" in proc.stderr
