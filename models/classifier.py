"""Image classifiers for fine-tuning: a pre-trained encoder's pooled features and a new
linear head, and the parameter average (EMA) a fine-tuning run keeps beside them.

    model = Classifier(create_model("dpcap_nano"), num_classes=10)
    logits = model(images)                     # [B, num_classes]

:class:`Classifier` keeps only what ``features`` reads of a DP-Cap or ViP (the caption
decoder, MAE's pixel decoder and the text tables are dropped), so its state dict is the
encoder's keys under ``encoder.`` plus ``head.``. A timm model is its own classifier
(``timm_classifier``): its head is replaced by one for the classes, and its state dict
stays the one timm loads.

The average lives in buffers ``average.<parameter>`` (``add_average``), so checkpoints and
resumes carry it like any other tensor; ``released_state_dict`` is what a release holds:
the averaged values in the parameters' places once an average was taken, no buffer of it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.dpcap import DPCap
from models.vip import ViP

# what ``features`` does not read, per encoder class: dropped by Classifier
UNUSED = {
    DPCap: ("text_embed", "decoder_blocks", "head_norm", "head", "text_pos_embed", "mask_token",
            "mask_token_text", "text_decoder_pos_embed", "encoder_text_type_embedding",
            "decoder_text_type_embedding"),
    ViP: ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"),
}
AVERAGE = "average"  # buffer prefix of the parameter average
AVERAGE_STEPS = "average_steps"  # how many updates the average has seen (0: none, release the parameters)


class Classifier(nn.Module):
    """``head(mean over patch tokens of encoder.features(images))``: the pooling the probes use."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        if type(encoder) not in UNUSED:
            raise ValueError(f"{type(encoder).__name__} has no features() to put a head on; "
                             f"use a DP-Cap or ViP encoder, or a timm model (model.name=timm:NAME)")
        for name in UNUSED[type(encoder)]:
            delattr(encoder, name)
        self.encoder = encoder
        dim = encoder.config.decoder_embed_dim if isinstance(encoder, DPCap) else encoder.config.embed_dim
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)  # a new head starts at chance, whatever the features' scale
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(images)[:, 1:].mean(1))


def timm_classifier(name: str, classes: int, **overrides) -> nn.Module:
    """timm's ``name`` (no weights: they come from a local file) with a head for ``classes``."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, **overrides)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"model.name=timm:{name}: {e}") from None
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "reset_classifier"):
        raise ValueError(f"model.name=timm:{name} has no linear head to replace (get_classifier() is "
                         f"{type(head).__name__}); pick a timm classification model")
    model.reset_classifier(classes)
    return model


def head_names(model: nn.Module) -> set[str]:
    """The state-dict keys of the head a fine-tuning job creates (never loaded from --init)."""
    head = model.head if isinstance(model, Classifier) else model.get_classifier()
    prefix = next(n for n, m in model.named_modules() if m is head)
    return {f"{prefix}.{k}" for k in head.state_dict()}


def trainable_names(model: nn.Module, layers: str) -> set[str]:
    """Parameters ``finetune.layers`` trains: ``head``, ``all``, or ``last:K`` (the last K
    blocks, everything after them, and the head)."""
    names = [n for n, _ in model.named_parameters()]
    heads = {n for n in head_names(model) if n in names}
    if layers == "head":
        return heads
    if layers == "all":
        return set(names)
    k = int(layers.split(":", 1)[1])
    blocks = [n for n, m in model.named_modules() if n.endswith("blocks") and isinstance(m, (nn.ModuleList,
                                                                                              nn.Sequential))]
    if not blocks:
        raise ValueError(f"finetune.layers={layers}: {type(model).__name__} has no blocks to count")
    prefix = blocks[0]
    count = len(model.get_submodule(prefix))
    if not 1 <= k <= count:
        raise ValueError(f"finetune.layers={layers}: K must be in [1, {count}] (the model's blocks)")
    order = list(model.named_parameters())
    first = next(i for i, (n, _) in enumerate(order) if n.startswith(f"{prefix}.{count - k}."))
    return {n for n, _ in order[first:]} | heads  # parameters are registered in the order they are used


def add_average(model: nn.Module) -> None:
    """Buffers holding an average of every trainable parameter, started at its values."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            model.register_buffer(_average_name(name), p.detach().clone())
    model.register_buffer(AVERAGE_STEPS, torch.zeros((), dtype=torch.long))


def averages(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Parameter name -> (parameter, its average buffer), for the parameters that have one."""
    buffers = dict(model.named_buffers())
    return {n: (p, buffers[_average_name(n)]) for n, p in model.named_parameters() if _average_name(n) in buffers}


def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to release: averages in their parameters' places once one was taken."""
    return released(model.state_dict())


def released(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without the average's buffers, the averages in their parameters' places if any
    update was averaged (``average_steps`` > 0)."""
    taken = int(sd.get(AVERAGE_STEPS, torch.zeros(()))) > 0
    out = {k: v for k, v in sd.items() if not k.startswith(AVERAGE + "_")}
    if taken:
        out = {k: sd.get(_average_name(k), v) for k, v in out.items()}
    return out


def _average_name(param: str) -> str:
    return f"{AVERAGE}_{param.replace('.', '_')}"
