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
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from privacy.rules import qualified_name

logger = logging.getLogger(__name__)

# BatchNorm subclasses whose forward is the batch norm, then their ``drop``, then
# their ``act`` child (timm 1.0, timm/layers/norm_act.py: EfficientNet's, RegNet's,
# MobileNet's norms): replaced by a GroupNorm followed by those same children
NORM_THEN_DROP_ACT = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"}
PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def groups_for(channels: int, max_groups: int) -> int:
    """The most groups, at most ``max_groups``, that divide ``channels``."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def replace_batchnorm(model: nn.Module, max_groups: int = 32) -> list[str]:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``model`` by a GroupNorm
    with :func:`groups_for` groups, in place; returns one line per change, also logged.
    timm's BatchNormAct2d (a batch norm, then a dropout and an activation) becomes
    ``nn.Sequential(norm=GroupNorm, drop=..., act=...)`` with its own drop and act;
    any other BatchNorm subclass that overrides forward is refused (ValueError):
    what else it computes is not known here.

    Example::

        model = timm.create_model("resnet18", num_classes=10)
        for change in replace_batchnorm(model):
            print(change)   # e.g. "bn1: BatchNorm2d(64) -> GroupNorm(32, 64)"
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    found = [(module, name, child, f"{qualname}.{name}" if qualname else name)
             for qualname, module in model.named_modules() for name, child in module.named_children()
             if isinstance(child, _BatchNorm)]
    for _, _, child, where in found:  # all checked first: a refusal leaves the model as it was
        kind = qualified_name(type(child))
        if kind not in NORM_THEN_DROP_ACT and type(child).forward not in PLAIN_FORWARDS:
            raise ValueError(
                f"{where} ({kind}) subclasses BatchNorm but overrides forward, so replace_batchnorm cannot "
                "know what else it computes; replace it yourself by an nn.GroupNorm followed by what its "
                "forward adds")
    changes = []
    for module, name, child, where in found:
        channels = child.num_features
        norm = nn.GroupNorm(groups_for(channels, max_groups), channels, eps=child.eps, affine=child.affine)
        if child.affine:
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
            norm.requires_grad_(child.weight.requires_grad)
            norm.to(device=child.weight.device, dtype=child.weight.dtype)
        change = f"{where}: {type(child).__name__}({channels}) -> GroupNorm({norm.num_groups}, {channels})"
        if qualified_name(type(child)) in NORM_THEN_DROP_ACT:
            kept = [(part, getattr(child, part)) for part in ("drop", "act") if hasattr(child, part)]
            norm = nn.Sequential(OrderedDict([("norm", norm), *kept]))
            change += " + its " + ", ".join(f"{part} ({type(layer).__name__})" for part, layer in kept)
        setattr(module, name, norm)
        changes.append(change)
    for change in changes:
        logger.info("replace_batchnorm: %s", change)
    return changes
