"""Layers that the privacy engine needs beyond torch.nn.

A bare trainable tensor added to activations (a learned position embedding, a
CLS or mask token) is not an ``nn.Module``, so no rule could see its
per-example gradient. Wrapping it in :class:`AddedParameter` gives it one: the
engine's rule for this module knows that the per-example gradient is the
output gradient summed over the broadcast dimensions.

This is a plain ``nn.Module``; models use it without knowing about privacy.
"""

import torch
from torch import nn


class AddedParameter(nn.Module):
    """``forward(x) = x + weight``, ``weight`` broadcast over the batch.

    ``weight`` has shape ``[1, *rest]`` where ``rest`` broadcasts against
    ``x.shape[1:]``. Tokens are made by adding to zeros::

        cls = self.cls_token(x.new_zeros(B, 1, D))   # [B, 1, D]
    """

    def __init__(self, *shape: int, init_std: float = 0.0, requires_grad: bool = True):
        super().__init__()
        if not shape or shape[0] != 1:
            raise ValueError(f"AddedParameter shape must start with 1 (the batch dim), got {shape}")
        weight = torch.zeros(*shape)
        if init_std:
            nn.init.normal_(weight, std=init_std)
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"
