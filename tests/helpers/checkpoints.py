"""Checkpoints as the trainer writes them, made in the test's own process (no launch)."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn


def save_like_trainer(folder: Path, cfg, model: nn.Module, optimizer=None, step: int = 3, engine=None,
                      sampling_seed: int = 0) -> Path:
    """A checkpoint as backend=fsdp2 writes it (DCP tensors, then meta.json with the config
    and the train state), from one process; returns its step folder."""
    import torch.distributed.checkpoint as dcp

    from trainer.common.checkpoints import ModelOptimizerState
    from trainer.job.checkpointer import Checkpointer

    class Tensors:  # the one method of a backend that Checkpointer.save calls
        def save(self, tmp: Path) -> None:
            dcp.save({"app": ModelOptimizerState(model, optimizer)}, checkpoint_id=str(tmp))

    with warnings.catch_warnings():  # DCP's note that it saves in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        from trainer.common.checkpoints import META_FORMAT

        train_state = {"step": step, "sampling_seed": sampling_seed, "lineage": None, "backend": "fsdp2",
                       "world_size": 1}
        return Checkpointer(folder, 1, 0).save(step, Tensors(), {"format": META_FORMAT, "config": cfg.to_dict(),
                                                                 "train_state": train_state, "engine": engine})
