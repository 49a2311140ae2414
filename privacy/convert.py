"""Making a model trainable with per-example privacy, by changes that are said out loud.

BatchNorm normalises each example by statistics of the whole batch, so one
example's output (and gradient) depends on the others: per-example clipping
does not bound an example's influence, and the engine refuses it. GroupNorm
normalises each example alone over groups of channels, works at any batch size
and is the usual replacement in private training (as Opacus's
``ModuleValidator.fix`` does). The conversion changes the model's function, so
a pretrained ResNet is fine-tuned from a new starting point: the affine weight
and bias are carried over, the running statistics are dropped.
"""

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)


def groups_for(channels: int, max_groups: int) -> int:
    """The most groups, at most ``max_groups``, that divide ``channels``."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def replace_batchnorm(model: nn.Module, max_groups: int = 32) -> list[str]:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``model`` by a GroupNorm
    with :func:`groups_for` groups, in place; returns one line per change, also logged.

    Example::

        model = timm.create_model("resnet18", num_classes=10)
        for change in replace_batchnorm(model):
            print(change)   # e.g. "bn1: BatchNorm2d(64) -> GroupNorm(32, 64)"
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    changes = []
    for qualname, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, _BatchNorm):
                continue
            channels = child.num_features
            norm = nn.GroupNorm(groups_for(channels, max_groups), channels, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    norm.bias.copy_(child.bias)
                norm.requires_grad_(child.weight.requires_grad)
                norm.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(module, child_name, norm)
            where = f"{qualname}.{child_name}" if qualname else child_name
            changes.append(f"{where}: {type(child).__name__}({channels}) -> GroupNorm({norm.num_groups}, {channels})")
    for change in changes:
        logger.info("replace_batchnorm: %s", change)
    return changes
