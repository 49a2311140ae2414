"""Evaluation of a model being trained: zero-shot accuracy and a few captions (DP-Cap),
linear probes of the encoder (DP-Cap and ViP).

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


TASKS = ("colour", "shape", "object")  # data.synthetic's ZERO_SHOT_TASKS plus the object's colour


def heldout(cfg, count: int, task: str) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Held-out single-object synthetic images, their labels for `task`, and each class's
    phrasings as the captions say them ("<size> <colour> <shape>")."""
    from data import synthetic

    if task not in TASKS:
        raise ValueError(f"eval.tasks: {task!r} is not one of {TASKS}")
    size = cfg.model.overrides.get("img_size", 224)
    to_pixels = transform(cfg, None)
    scenes = [synthetic.make_scene(cfg.data.seed, i, "heldout") for i in range(count)]
    images = torch.stack([to_pixels(synthetic.render(scene, size), "")[0] for scene in scenes])
    sizes, colours, shapes = synthetic.SIZES, list(synthetic.COLOURS), synthetic.SHAPES
    if task == "colour":
        labels = [colours.index(scene.objects[0].colour) for scene in scenes]
        classes = [[f"{s} {c} {n}" for s in sizes for n in shapes] for c in colours]
    else:
        labels = [synthetic.zero_shot_label(scene, task) for scene in scenes]
        if task == "shape":
            classes = [[f"{s} {c} {n}" for s in sizes for c in colours] for n in shapes]
        else:
            classes = [[f"{s} {name}" for s in sizes] for name in synthetic.ZERO_SHOT_TASKS[task]]
    return images, torch.tensor(labels), classes


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
def zero_shot_accuracy(trainer: Trainer, task: str) -> dict[str, Any]:
    """Trie-constrained greedy decoding after the prompt "a" (models' zero_shot "trie"):
    unlike the mean-loss score it does not favour names of more word pieces."""
    cfg = trainer.cfg
    images, labels, classes = heldout(cfg, cfg.data.heldout_examples, task)
    preds = []
    trainer.model.eval()
    with _Unsharded(trainer.model) as model:
        for i in range(0, len(images), cfg.eval.batch_size):
            batch = images[i: i + cfg.eval.batch_size].to(trainer.dist.device, trainer.compute_dtype)
            preds.append(model.zero_shot(batch, classes, method="trie", tokenizer=trainer.tokenizer,
                                         prompt=PROMPT).cpu())
    trainer.model.train()
    return {"accuracy": (torch.cat(preds) == labels).float().mean().item(), "classes": len(classes)}


@torch.no_grad()
def caption_examples(trainer: Trainer) -> str:
    """Markdown lines "caption" for a few fixed held-out images."""
    cfg = trainer.cfg
    images, _, _ = heldout(cfg, cfg.metrics.num_captions, "shape")
    trainer.model.eval()
    with _Unsharded(trainer.model) as model:
        ids = model.generate(images.to(trainer.dist.device, trainer.compute_dtype)).cpu()
    trainer.model.train()
    from data import synthetic

    truth = [synthetic.make_scene(cfg.data.seed, i, "heldout").caption for i in range(len(ids))]
    return "\n\n".join(f"{i}. generated: {trainer.tokenizer.decode(row.tolist())} | true: {t}"
                       for i, (row, t) in enumerate(zip(ids, truth)))


@torch.no_grad()
def probe_accuracy(trainer: Trainer, task: str) -> dict[str, Any]:
    """trainer.probe's full linear probe of the encoder (mean-pooled features, both model
    families) on the held-out images of `task`: the first half trains it, the second tests it."""
    from trainer.probe import run_probe, synthetic_data

    cfg = trainer.cfg
    data = synthetic_data(cfg, task, cfg.data.heldout_examples)
    trainer.model.eval()
    with _Unsharded(trainer.model) as model:
        result = run_probe(model, data, shots=[], trials=1, pool="mean", batch_size=cfg.eval.batch_size,
                           device=trainer.dist.device, l2=1e-3, seed=0, dtype=trainer.compute_dtype)
    trainer.model.train()
    return {"accuracy": result["linear_probe"]["top1"], "classes": result["classes"],
            "train": result["train_examples"], "test": result["test_examples"]}


def evaluate(trainer: Trainer) -> dict[str, Any]:
    """End-of-training evaluation: captions into TensorBoard, zero-shot accuracy, linear probes."""
    results: dict[str, Any] = {}
    if trainer.cfg.metrics.num_captions and trainer.cfg.is_captioner:
        text = caption_examples(trainer)
        trainer.metrics.text(trainer.step, "captions", text)
        results["captions"] = text
    if trainer.cfg.eval.zero_shot:
        results["zero_shot"] = {task: zero_shot_accuracy(trainer, task) for task in trainer.cfg.eval.tasks}
        results["eval_examples"] = trainer.cfg.data.heldout_examples
    if trainer.cfg.eval.probe:
        results["probe"] = {task: probe_accuracy(trainer, task) for task in trainer.cfg.eval.tasks}
    return results
