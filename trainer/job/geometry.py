"""Batch geometry of a job on a given world size, from its DeepSpeed config.

``train_batch_size`` is the expected logical batch B (Poisson sampling decides
each step's realised batch), ``train_micro_batch_size_per_gpu`` the largest
physical micro-batch per rank, and the accumulation the expected number of
micro-batches per rank per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.common.config import JobConfig


@dataclass(kw_only=True)
class Geometry:
    """Batch geometry of one job on a given world size."""

    world_size: int
    batch_size: int  # expected logical batch B (Poisson: realised sizes vary)
    micro_batch: int  # largest physical micro-batch per rank
    accumulation: int  # expected micro-batches per rank per step
    bf16: bool  # ds bf16.enabled: bf16 compute parameters, fp32 master copy and reduction (slow on CPU)


def geometry(cfg: JobConfig, world_size: int) -> Geometry:
    ds = cfg.ds
    if "train_batch_size" not in ds or "train_micro_batch_size_per_gpu" not in ds:
        raise ValueError(f"ds_config {cfg.ds_config}: needs train_batch_size and "
                         f"train_micro_batch_size_per_gpu")
    batch, micro = int(ds["train_batch_size"]), int(ds["train_micro_batch_size_per_gpu"])
    if batch < 1 or micro < 1:
        raise ValueError(f"ds_config {cfg.ds_config}: train_batch_size ({batch}) and "
                         f"train_micro_batch_size_per_gpu ({micro}) must be >= 1")
    accumulation = math.ceil(batch / (micro * world_size))
    if "gradient_accumulation_steps" in ds:
        given = int(ds["gradient_accumulation_steps"])
        if given * micro * world_size != batch:
            raise ValueError(
                f"ds_config {cfg.ds_config}: train_batch_size {batch} != micro {micro} x "
                f"gradient_accumulation_steps {given} x world size {world_size}; drop "
                f"gradient_accumulation_steps (it is derived) or fix it for this world size")
        accumulation = given
    return Geometry(world_size=world_size, batch_size=batch, micro_batch=micro,
                    accumulation=accumulation, bf16=bool(ds.get("bf16", {}).get("enabled", False)))
