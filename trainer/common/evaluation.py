"""Evaluation of a model: zero-shot accuracy and captions (DP-Cap), linear and k-shot probes
of the encoder (DP-Cap and ViP), on held-out synthetic images and on a folder of your classes.

Each function takes a model with whole parameters (a sharded job enters its
backend's ``gathered()`` first, on every rank), its tokenizer, a device, the
``eval`` config section and the images; none knows of training. The job's
end-of-training evaluation and ``python -m trainer.evaluate`` produce the same
results (:func:`evaluate`), written as the same JSON file (:func:`write_results`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.common.config import EvalConfig
from trainer.common.heldout import HeldOut
from trainer.common.probing import ProbeData, check_shots, probe_lines, run_probe, synthetic_data

PROMPT = "a"  # synthetic captions begin "a <size> <colour> <shape> ..."
METHODS = ("trie", "loss")


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
def describe(model: nn.Module, tokenizer, images: torch.Tensor, labels: Sequence[str] | None,
             method: str, prompt: str, max_length: int | None = None) -> list[str]:
    """Captions of ``images`` [B, 3, H, W] (greedy, KV cache), or their zero-shot labels."""
    if labels is None:
        return [tokenizer.decode(row.tolist()) for row in model.generate(images, max_length)]
    picks = model.zero_shot(images, labels, method=method, tokenizer=tokenizer, prompt=prompt)
    return [labels[i] for i in picks.tolist()]


# --------------------------------------------------------------------------- synthetic tasks

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
                     dtype: torch.dtype = torch.float32) -> list[dict[str, str]]:
    """Greedy captions of the first ``count`` held-out synthetic images, with their true captions."""
    scenes = heldout.scenes(count)
    with _Evaluating(model):
        texts = describe(model, tokenizer, heldout.pixels(scenes).to(device, dtype), None, "", "")
    return [{"image": f"held-out {i}", "caption": text, "true": scene.caption}
            for i, (text, scene) in enumerate(zip(texts, scenes))]


@torch.no_grad()
def heldout_probe(model: nn.Module, device: torch.device, section: EvalConfig, heldout: HeldOut, task: str,
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The full linear probe of the encoder (mean-pooled features, both model families) on
    the held-out images of ``task``: the first half trains it, the second tests it
    (:func:`trainer.common.probing.run_probe`, no k-shot)."""
    data = synthetic_data(heldout, task, heldout.count)
    with _Evaluating(model):
        result = run_probe(model, data, shots=[], trials=1, pool="mean", batch_size=section.batch_size,
                           device=device, l2=1e-3, seed=0, dtype=dtype)
    return {"accuracy": result["linear_probe"]["top1"], "classes": result["classes"],
            "train": result["train_examples"], "test": result["test_examples"]}


# --------------------------------------------------------------------------- a folder of classes

def label_text(folder_name: str) -> str:
    """A class folder's name as the words a caption would use: golden_retriever -> golden retriever."""
    return " ".join(folder_name.replace("_", " ").split())


def prompt_hint(prompt: str, classes: Sequence[str], captions: Sequence[str]) -> str | None:
    """A warning when ``prompt`` never comes right before a class name in the training
    ``captions`` (a sample is enough), with the text that does: zero-shot scores each class name
    after the prompt, and a captioner trained on captions of another style scores near chance
    with it. None when the prompt is met, or no caption names a class."""
    wanted = _words(prompt)
    names = sorted({_words(label_text(c)) for c in classes}, key=len, reverse=True)
    before: Counter = Counter()
    for caption in map(_words, captions):
        for name in names:
            start = f" {caption} ".find(f" {name} ")
            if start < 0:
                continue
            preceding = caption[:start].strip()
            if preceding == wanted or preceding.endswith(f" {wanted}"):
                return None
            before[" ".join(preceding.split()[-6:])] += 1
            break
    if not before:
        return None
    found, count = before.most_common(1)[0]
    return (f"eval.prompt={prompt!r} never comes before a class name in {len(captions)} training captions "
            f"sampled ({sum(before.values())} name a class), so zero-shot may score near chance; the captions "
            f"put {found!r} before a class name ({count} of them): try eval.prompt=\"{found}\"")


def _words(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").replace(".", " ").split())


def folder_plan(section: EvalConfig, data: ProbeData, tokenizer, text_length: int,
                captioner: bool, shots_setting: str = "eval.shots") -> tuple[EvalConfig, list[str]]:
    """What of ``section`` can run on ``data``, and why the rest cannot: zero-shot needs every
    label to tokenise within the caption length (a synthetic-data job's compact vocabulary has
    only the scenes' words), a k-shot probe needs k training images in every class. Checked
    before any evaluation (the job: before training)."""
    notes: list[str] = []
    if unknown := sorted(set(section.methods) - set(METHODS)):
        raise ValueError(f"eval.methods: {unknown} are not zero-shot methods; use {', '.join(METHODS)}")
    zero_shot = section.zero_shot and captioner
    if zero_shot:
        from models.tokenizer import BOS_ID

        for name in data.classes:
            try:
                length = len([BOS_ID, *tokenizer.wordpieces(section.prompt), *tokenizer.wordpieces(label_text(name))]) + 1
            except ValueError as e:
                notes.append(f"zero-shot on eval.data skipped: {e} (the model knows only its training "
                             f"captions' words)")
                zero_shot = False
                break
            if length > text_length:
                notes.append(f"zero-shot on eval.data skipped: prompt + label {label_text(name)!r} take {length} "
                             f"tokens, more than data.text_length={text_length}")
                zero_shot = False
                break
    shots = []
    for k in section.shots:
        try:
            check_shots(data.train_labels, k, data.classes, shots_setting)
            shots.append(k)
        except ValueError as e:
            notes.append(f"{k}-shot probe skipped: {e}")
    return dataclasses.replace(section, zero_shot=zero_shot, shots=shots), notes


@torch.no_grad()
def folder_zero_shot(model: nn.Module, tokenizer, device: torch.device, section: EvalConfig, data: ProbeData,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Zero-shot accuracy on the test images, the folder names as labels, by each method."""
    labels = [label_text(name) for name in data.classes]
    preds: dict[str, list[torch.Tensor]] = {method: [] for method in section.methods}
    with _Evaluating(model):
        for images in data.test_images(section.batch_size):
            images = images.to(device, dtype)
            for method in section.methods:
                preds[method].append(model.zero_shot(images, labels, method=method, tokenizer=tokenizer,
                                                     prompt=section.prompt).cpu())
    out: dict[str, Any] = {"prompt": section.prompt, "labels": labels}
    for method, chunks in preds.items():
        out[method] = {"accuracy": (torch.cat(chunks) == data.test_labels).float().mean().item()}
    return out


def caption_picks(data: ProbeData, count: int) -> list[int]:
    """``count`` test images, one per class in turn (the first of each class, then the second...)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(data.test_labels.tolist()):
        by_class.setdefault(label, []).append(i)
    picks, depth = [], 0
    while len(picks) < count and any(depth < len(v) for v in by_class.values()):
        picks += [v[depth] for _, v in sorted(by_class.items()) if depth < len(v)]
        depth += 1
    return picks[:count]


@torch.no_grad()
def folder_captions(model: nn.Module, tokenizer, device: torch.device, data: ProbeData, count: int,
                    dtype: torch.dtype = torch.float32) -> list[dict[str, str]]:
    """Greedy captions of a few test images, with their class."""
    picks = caption_picks(data, count)
    if not picks:
        return []
    with _Evaluating(model):
        texts = describe(model, tokenizer, data.test_pixels(picks).to(device, dtype), None, "", "")
    return [{"image": data.test_names[i], "caption": text, "true": label_text(data.classes[int(data.test_labels[i])])}
            for i, text in zip(picks, texts)]


@torch.no_grad()
def folder_probes(model: nn.Module, device: torch.device, section: EvalConfig, data: ProbeData,
                  dtype: torch.dtype = torch.float32, pool: str = "mean", l2: float = 1e-3,
                  seed: int = 0) -> dict[str, Any]:
    """The full linear probe and the k-shot probes of ``section.shots`` (trainer.common.probing)."""
    with _Evaluating(model):
        return run_probe(model, data, shots=section.shots, trials=section.trials, pool=pool,
                         batch_size=section.batch_size, device=device, l2=l2, seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- all of it

def evaluate(model: nn.Module, tokenizer, device: torch.device, section: EvalConfig, *,
             heldout: HeldOut | None = None, folder: ProbeData | None = None, captions: int = 0,
             dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``captions`` captions (a captioner's), zero-shot accuracy and probes, as ``section``
    asks: on the held-out synthetic images (``heldout``: a job trained on synthetic data) and
    on ``folder`` (``eval.data``; ``section`` already checked against it by folder_plan)."""
    results: dict[str, Any] = {}
    if captions and tokenizer is not None:
        results["captions"] = (folder_captions(model, tokenizer, device, folder, captions, dtype)
                               if folder is not None else
                               caption_examples(model, tokenizer, device, heldout, captions, dtype)
                               if heldout is not None else [])
    if heldout is not None:
        if section.zero_shot:
            results["zero_shot"] = {task: zero_shot_accuracy(model, tokenizer, device, section, heldout, task,
                                                             dtype) for task in section.tasks}
            results["eval_examples"] = heldout.count
        if section.probe:
            results["probe"] = {task: heldout_probe(model, device, section, heldout, task, dtype)
                                for task in section.tasks}
    if folder is not None and (section.zero_shot or section.probe):
        own: dict[str, Any] = {"data": section.data, "classes": len(folder.classes),
                               "chance": 1 / len(folder.classes), "train_examples": len(folder.train_labels),
                               "test_examples": len(folder.test_labels)}
        if section.zero_shot and tokenizer is not None:
            own["zero_shot"] = folder_zero_shot(model, tokenizer, device, section, folder, dtype)
        if section.probe:
            probes = folder_probes(model, device, section, folder, dtype)
            own.update(linear_probe=probes["linear_probe"], few_shot=probes["few_shot"])
        results["eval_data"] = own
    return results


def captions_markdown(captions: list[dict[str, str]]) -> str:
    """TensorBoard text: one line per image, "generated | true"."""
    return "\n\n".join(f"{i}. {c['image']}: generated: {c['caption']} | true: {c['true']}"
                       for i, c in enumerate(captions))


def summary_lines(results: dict[str, Any]) -> list[str]:
    """:func:`evaluate`'s results in a few lines (the job's summary, python -m trainer.evaluate):
    zero-shot and probes on the held-out synthetic images, a classification job's top-1, then
    eval.data."""
    lines = [f"zero-shot {task}: accuracy {r['accuracy']:.3f} ({r['classes']} classes, chance "
             f"{1 / r['classes']:.3f}; {results['eval_examples']} held-out images)"
             for task, r in results.get("zero_shot", {}).items()]
    lines += [f"linear probe {task}: top-1 {r['accuracy']:.3f} ({r['classes']} classes, chance "
              f"{1 / r['classes']:.3f}; {r['train']} train / {r['test']} test held-out images)"
              for task, r in results.get("probe", {}).items()]
    if "top1" in results and "finetune" in results:  # a classification job's validation images
        f = results["finetune"]
        top5 = f", top-5 {results['top5']:.4f}" if "top5" in results else ""
        lines.append(f"fine-tuned top-1: {results['top1']:.4f}{top5} ({len(f['classes'])} classes, chance "
                     f"{f['chance']:.3f}; {f['val_examples']} validation images of {f['data']}; finetune.layers="
                     f"{f['layers']}{', parameter average' if f['averaged'] else ''})")
    own = results.get("eval_data")
    if not own:
        return lines
    where = (f"{own['classes']} classes, chance {own['chance']:.3f}; {own['train_examples']} train / "
             f"{own['test_examples']} test images of {own['data']}")
    if "zero_shot" in own:
        scores = ", ".join(f"{own['zero_shot'][m]['accuracy']:.3f} ({m})" for m in METHODS if m in own["zero_shot"])
        lines.append(f"zero-shot on your classes: accuracy {scores} ({where})")
    if "linear_probe" in own:
        lines += probe_lines(own, "linear probe on your classes", where, indent="  ")
    return lines


def write_results(path: Path, results: dict[str, Any], **about: Any) -> Path:
    """One evaluation as JSON (``about``: step, checkpoint, model...), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**about, **results}, indent=1) + "\n")
    os.replace(tmp, path)
    return path
