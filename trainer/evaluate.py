"""Evaluation of a DP-Cap being trained: zero-shot accuracy and a few captions.

Both run on every rank (the FSDP blocks gather their parameters collectively),
on the same held-out synthetic images; rank 0 reports.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from trainer.datasets import transform

if TYPE_CHECKING:
    from trainer.train import Trainer

logger = logging.getLogger(__name__)

PROMPT = "a"  # synthetic captions begin "a <size> <colour> <shape> ..."


def heldout(cfg, count: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Held-out single-object synthetic images, their labels, and per-class caption phrases."""
    from data import synthetic

    task = cfg.eval.label_set
    if task not in synthetic.ZERO_SHOT_TASKS:
        raise ValueError(f"eval.label_set must be one of {sorted(synthetic.ZERO_SHOT_TASKS)}, got {task!r}")
    size = cfg.model.overrides.get("img_size", 224)
    to_pixels = transform(cfg, None)
    images, labels = [], []
    for i in range(count):
        scene = synthetic.make_scene(cfg.data.seed, i, "heldout")
        images.append(to_pixels(synthetic.render(scene, size), "")[0])
        labels.append(synthetic.zero_shot_label(scene, task))
    names = synthetic.ZERO_SHOT_TASKS[task]
    # each class is scored by its best phrasing as the captions say it: "<size> <colour> <shape>"
    if task == "shape":
        classes = [[f"{s} {c} {n}" for s in synthetic.SIZES for c in synthetic.COLOURS] for n in names]
    else:
        classes = [[f"{s} {n}" for s in synthetic.SIZES] for n in names]
    return torch.stack(images), torch.tensor(labels), classes


class _Unsharded:
    """Gather the root's parameters for calls other than forward (generate, zero_shot)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.unshard()
        return self.model

    def __exit__(self, *exc):
        self.model.reshard()


@torch.no_grad()
def zero_shot_accuracy(trainer: Trainer) -> dict[str, Any]:
    cfg = trainer.cfg
    images, labels, classes = heldout(cfg, cfg.data.heldout_examples)
    device = trainer.dist.device
    preds = []
    trainer.model.eval()
    with _Unsharded(trainer.model) as model:
        for i in range(0, len(images), cfg.eval.batch_size):
            batch = images[i: i + cfg.eval.batch_size].to(device, trainer.compute_dtype)
            preds.append(model.zero_shot(batch, classes, method="loss", tokenizer=trainer.tokenizer,
                                         prompt=PROMPT).cpu())
    trainer.model.train()
    accuracy = (torch.cat(preds) == labels).float().mean().item()
    return {"zero_shot_accuracy": accuracy, "num_classes": len(classes), "eval_examples": len(labels)}


@torch.no_grad()
def caption_examples(trainer: Trainer) -> str:
    """Markdown lines "caption" for a few fixed held-out images."""
    cfg = trainer.cfg
    images, _, _ = heldout(cfg, cfg.metrics.num_captions)
    trainer.model.eval()
    with _Unsharded(trainer.model) as model:
        ids = model.generate(images.to(trainer.dist.device, trainer.compute_dtype)).cpu()
    trainer.model.train()
    from data import synthetic

    truth = [synthetic.make_scene(cfg.data.seed, i, "heldout").caption for i in range(len(ids))]
    return "\n\n".join(f"{i}. generated: {trainer.tokenizer.decode(row.tolist())} | true: {t}"
                       for i, (row, t) in enumerate(zip(ids, truth)))


def evaluate(trainer: Trainer) -> dict[str, Any]:
    """End-of-training evaluation: captions into TensorBoard, zero-shot accuracy."""
    results: dict[str, Any] = {}
    if trainer.cfg.metrics.num_captions:
        text = caption_examples(trainer)
        trainer.metrics.text(trainer.step, "captions", text)
        results["captions"] = text
    if trainer.cfg.eval.zero_shot:
        results |= zero_shot_accuracy(trainer)
    return results
