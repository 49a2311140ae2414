"""AdamW (fused on GPU) and the linear-warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import JobConfig, learning_rate


def build_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms and 1-d tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate(cfg), betas=tuple(cfg.optim.betas),
                             fused=device.type == "cuda")


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update at 0-based `step`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

