"""The command-line tools run as a user runs them: ``python -m MODULE`` in a fresh process, in
the test's folder; and the tiny default job, trained to a real checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers.processes import REPO

TINY_JOB = ["steps=3", "optim.warmup_steps=1", "data.num_examples=300", "data.heldout_examples=12", "ds.train_batch_size=32",
            "ds.train_micro_batch_size_per_gpu=16", "model.overrides.depth=1",
            "model.overrides.decoder_depth=1", "model.overrides.embed_dim=32",
            "model.overrides.num_heads=2", "model.overrides.decoder_embed_dim=32",
            "model.overrides.decoder_num_heads=2", "metrics.log_every=1", "metrics.num_captions=2",
            "checkpoint.every_steps=0"]


def run_cli(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd``, which must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def train_tiny_default(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The default job, made tiny (TINY_JOB), in ``cwd``: its runs/ folder is there."""
    return run_cli(cwd, "trainer.train", "--config", "default", *TINY_JOB, *args)


def checkpoint_params(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model parameters of a DCP checkpoint's step folder, by way of a torch.save file in ``tmp``."""
    out = tmp / f"{step_dir.parent.parent.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=True)["app"]["model"]
