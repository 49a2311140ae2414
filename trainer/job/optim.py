"""AdamW (fused on GPU), its parameter groups, and the linear-warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.common.config import JobConfig, learning_rate


def param_groups(model: nn.Module, cfg: JobConfig) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on matrices, none on biases,
    norms and other 1-d tensors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model)`` with the peak lr (the schedule sets each step's)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=learning_rate(cfg), betas=tuple(cfg.optim.betas),
                             fused=device.type == "cuda")


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update at 0-based `step`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
