"""Evaluation of a model: zero-shot accuracy and a few captions (DP-Cap), linear probes
of the encoder (DP-Cap and ViP), on held-out synthetic images.

Each function takes a model with whole parameters (a sharded job enters its
backend's ``gathered()`` first, on every rank), its tokenizer, a device, the
``eval`` config section and the held-out images; none knows of training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.common.config import EvalConfig
from trainer.common.heldout import HeldOut
from trainer.common.probing import run_probe, synthetic_data

PROMPT = "a"  # synthetic captions begin "a <size> <colour> <shape> ..."


class _Evaluating:
    """The model in eval mode for the block's duration, back in its own mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer, device: torch.device, section: EvalConfig,
                       heldout: HeldOut, task: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Trie-constrained greedy decoding after the prompt "a" (models' zero_shot "trie"):
    unlike the mean-loss score it does not favour names of more word pieces."""
    images, labels, classes = heldout.task(task)
    preds = []
    with _Evaluating(model):
        for i in range(0, len(images), section.batch_size):
            batch = images[i: i + section.batch_size].to(device, dtype)
            preds.append(model.zero_shot(batch, classes, method="trie", tokenizer=tokenizer, prompt=PROMPT).cpu())
    return {"accuracy": (torch.cat(preds) == labels).float().mean().item(), "classes": len(classes)}


@torch.no_grad()
def caption_examples(model: nn.Module, tokenizer, device: torch.device, heldout: HeldOut, count: int,
                     dtype: torch.dtype = torch.float32) -> str:
    """Markdown lines "generated | true" for the first ``count`` held-out images."""
    scenes = heldout.scenes(count)
    with _Evaluating(model):
        ids = model.generate(heldout.pixels(scenes).to(device, dtype)).cpu()
    return "\n\n".join(f"{i}. generated: {tokenizer.decode(row.tolist())} | true: {scene.caption}"
                       for i, (row, scene) in enumerate(zip(ids, scenes)))


@torch.no_grad()
def probe_accuracy(model: nn.Module, device: torch.device, section: EvalConfig, heldout: HeldOut, task: str,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The full linear probe of the encoder (mean-pooled features, both model families) on
    the held-out images of ``task``: the first half trains it, the second tests it."""
    data = synthetic_data(heldout, task, heldout.count)
    with _Evaluating(model):
        result = run_probe(model, data, shots=[], trials=1, pool="mean", batch_size=section.batch_size,
                           device=device, l2=1e-3, seed=0, dtype=dtype)
    return {"accuracy": result["linear_probe"]["top1"], "classes": result["classes"],
            "train": result["train_examples"], "test": result["test_examples"]}


def evaluate(model: nn.Module, tokenizer, device: torch.device, section: EvalConfig, heldout: HeldOut, *,
             captions: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """End-of-training evaluation: ``captions`` captions (a captioner's), zero-shot accuracy
    and linear probes, as ``section`` asks."""
    results: dict[str, Any] = {}
    if captions and tokenizer is not None:
        results["captions"] = caption_examples(model, tokenizer, device, heldout, captions, dtype)
    if section.zero_shot:
        results["zero_shot"] = {task: zero_shot_accuracy(model, tokenizer, device, section, heldout, task, dtype)
                                for task in section.tasks}
        results["eval_examples"] = heldout.count
    if section.probe:
        results["probe"] = {task: probe_accuracy(model, device, section, heldout, task, dtype)
                            for task in section.tasks}
    return results
