"""Linear-probe and few-shot evaluation of a trained encoder on frozen features
(the library behind ``python -m trainer.probe`` and the end-of-job probes).

DP-Cap and ViP are judged, as in their papers, by a linear classifier on the
frozen encoder's features: trained on every training example (the full linear
probe) and on k examples per class (k-shot, mean and std over a few draws).
The classifier is an L2-penalised multinomial logistic regression fitted
full-batch with L-BFGS from zeros, so a result depends only on the features
and the seed.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data import synthetic
from data.decode import IMAGE_EXTENSIONS
from trainer.common.config import JobConfig
from trainer.common.heldout import TASKS, HeldOut
from trainer.common.inputs import image_file_pixels, transform

SYNTHETIC = "synthetic:"


@dataclass(kw_only=True)
class ProbeData:
    """Labelled train and test images; pixels come batch by batch so a large folder
    never sits in memory, only its features do."""

    classes: list[str]
    train_labels: torch.Tensor  # [N] long
    test_labels: torch.Tensor  # [M] long
    train_images: Callable[[int], Iterator[torch.Tensor]]  # batch size -> [B, 3, H, W] batches
    test_images: Callable[[int], Iterator[torch.Tensor]]
    test_pixels: Callable[[list[int]], torch.Tensor]  # the chosen test images, [k, 3, H, W]
    test_names: list[str]  # what each test image is called in reports (its file, or its index)


# --------------------------------------------------------------------------- data

def synthetic_data(heldout: HeldOut, task: str, count: int) -> ProbeData:
    """The first ``count`` held-out synthetic images: the first half trains the probe, the
    second tests it."""
    if task not in TASKS:
        raise ValueError(f"--data synthetic:{task}: unknown task; use one of "
                         f"{', '.join(SYNTHETIC + t for t in TASKS)}")
    if count < 4:
        raise ValueError(f"--examples {count}: need at least 4 synthetic images (half train, half test)")
    images, labels, _ = heldout.task(task, count)
    half = count // 2
    names = {"colour": list(synthetic.COLOURS), **synthetic.ZERO_SHOT_TASKS}[task]
    return ProbeData(classes=names, train_labels=labels[:half], test_labels=labels[half:],
                     train_images=lambda b: iter(images[:half].split(b)),
                     test_images=lambda b: iter(images[half:].split(b)),
                     test_pixels=lambda picks: images[half:][picks],
                     test_names=[f"held-out {i}" for i in range(half, count)])


def folder_files(root: Path, val_fraction: float = 0.5, max_per_class: int = 0,
                 setting: str | None = None) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """The class names and the (image file, label) pairs of each split of a folder of class
    folders: ImageNet's layout, ``root/train/<class>/*`` and ``root/val/<class>/*``,
    or ``root/<class>/*``, each class's images split into val (``val_fraction`` of them) and
    train by a hash of their file names (deterministic, and a file added later moves no other).
    ``max_per_class`` > 0 keeps that many images of each class in each split (for a quick look
    at a large folder). ``setting`` names the folder in messages (default ``--data ROOT``)."""
    root = Path(root)
    option = setting or f"--data {root}"
    if not root.is_dir():
        raise ValueError(f"{option}: no such folder (class folders: FOLDER/train/<class>/ and "
                         f"FOLDER/val/<class>/, or FOLDER/<class>/)")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() or val_dir.is_dir():
        classes = _class_folders(train_dir) if train_dir.is_dir() else []
        if not classes:
            raise ValueError(f"{option}: expected class folders in {train_dir} "
                             f"(layout FOLDER/train/<class>/*.jpg and FOLDER/val/<class>/*.jpg)")
        if not val_dir.is_dir():
            raise ValueError(f"{option}: no {val_dir} (layout FOLDER/train/<class>/*, FOLDER/val/<class>/*)")
        if unknown := sorted(set(_class_folders(val_dir)) - set(classes)):
            raise ValueError(f"{option}: val classes {unknown[:5]} have no train folder")
        train, test = _image_files(train_dir, classes), _image_files(val_dir, classes)
        where = f"{train_dir if not train else val_dir}/<class>/"
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        classes = _class_folders(root)
        if not classes:
            raise ValueError(f"{option}: expected class folders (FOLDER/<class>/*.jpg, or "
                             f"FOLDER/train/<class>/ and FOLDER/val/<class>/)")
        train, test = _split(_image_files(root, classes), val_fraction)
        where = f"{root}/<class>/ (each class needs 2 images: one to train the probe, one to test it)"
    if max_per_class > 0:
        train, test = _at_most(train, max_per_class), _at_most(test, max_per_class)
    if not train or not test:
        raise ValueError(f"{option}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    return classes, train, test


def folder_data(root: Path, cfg: JobConfig, val_fraction: float = 0.5, max_per_class: int = 0,
                setting: str | None = None) -> ProbeData:
    """A folder of class folders (:func:`folder_files`), decoded with data.decode (never
    unpickled) and resized like the trainer's inputs."""
    root = Path(root)
    classes, train, test = folder_files(root, val_fraction, max_per_class, setting)
    to_pixels = transform(cfg, None)

    def pixels(files: list[Path]) -> torch.Tensor:
        return torch.stack([image_file_pixels(f, to_pixels) for f in files])

    def batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(files), batch_size):
            yield pixels(files[i: i + batch_size])

    test_files = [f for f, _ in test]
    return ProbeData(classes=classes,
                     train_labels=torch.tensor([label for _, label in train]),
                     test_labels=torch.tensor([label for _, label in test]),
                     train_images=lambda b: batches([f for f, _ in train], b),
                     test_images=lambda b: batches(test_files, b),
                     test_pixels=lambda picks: pixels([test_files[i] for i in picks]),
                     test_names=[str(f.relative_to(root)) for f in test_files])


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [(f, label) for label, name in enumerate(classes) if (split / name).is_dir()
            for f in sorted((split / name).iterdir())
            if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]


def _split(files: list[tuple[Path, int]], val_fraction: float) -> tuple[list, list]:
    """Per class: images ordered by a hash of their names, the first share to val; a class
    of two images or more keeps at least one on each side."""
    train, test = [], []
    for label in sorted({label for _, label in files}):
        members = sorted((f for f, c in files if c == label),
                         key=lambda f: hashlib.sha256(f.name.encode()).hexdigest())
        cut = min(max(round(len(members) * val_fraction), 1), len(members) - 1) if len(members) > 1 else 0
        test += [(f, label) for f in sorted(members[:cut])]
        train += [(f, label) for f in sorted(members[cut:])]
    return train, test


def _at_most(files: list[tuple[Path, int]], count: int) -> list[tuple[Path, int]]:
    kept, seen = [], {}
    for f, label in files:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            kept.append((f, label))
    return kept


# --------------------------------------------------------------------------- features

@torch.no_grad()
def encode(model: nn.Module, batches: Iterator[torch.Tensor], pool: str, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frozen features [N, D]: the mean over patch tokens, or the CLS token (token 0)."""
    out = []
    for images in batches:
        tokens = model.features(images.to(device, dtype))  # [B, 1 + L, D]
        out.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).float())
    return torch.cat(out)


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both scaled by the train split's statistics (no labels used), so one L2 strength
    suits every encoder."""
    mean, std = train.mean(0), train.std(0, correction=0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


# --------------------------------------------------------------------------- classifier

def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, num_classes: int, l2: float = 1e-3,
                   max_iter: int = 500) -> float:
    """Top-1 test accuracy of a multinomial logistic regression (mean cross-entropy +
    l2/2 |W|^2, bias unpenalised) fitted full-batch by L-BFGS from zeros."""
    weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9,
                                  line_search_fn="strong_wolfe")
    targets = train_y.to(train_x.device)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, targets) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1).cpu()
    return (predicted == test_y.cpu()).sum().item() / len(test_y)


def check_shots(labels: torch.Tensor, shots: int, classes: Sequence[str], setting: str = "--shots") -> None:
    """k-shot needs k training examples in every class (``setting`` names k in the message)."""
    counts = torch.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < shots:
        raise ValueError(f"{setting} {shots}: class {classes[smallest]!r} has only {int(counts[smallest])} "
                         f"training examples; use fewer shots or more data")


def sample_shots(labels: torch.Tensor, shots: int, classes: Sequence[str],
                 generator: torch.Generator) -> torch.Tensor:
    """Indices of `shots` examples per class, drawn without replacement."""
    check_shots(labels, shots, classes)
    picks = []
    for c in range(len(classes)):
        members = (labels == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picks)


# --------------------------------------------------------------------------- the job

def run_probe(model: nn.Module, data: ProbeData, *, shots: Sequence[int], trials: int, pool: str,
              batch_size: int, device: torch.device, l2: float, seed: int,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Full linear probe and k-shot probes of ``model`` (on ``device``, computing in
    ``dtype``); each k draws its trials from its own seeded generator, so a k's result
    does not depend on which other k were asked for."""
    train_x, test_x = standardise(encode(model, data.train_images(batch_size), pool, device, dtype),
                                  encode(model, data.test_images(batch_size), pool, device, dtype))
    num_classes = len(data.classes)
    results: dict[str, Any] = {
        "classes": num_classes, "chance": 1 / num_classes,
        "train_examples": len(train_x), "test_examples": len(test_x),
        "linear_probe": {"top1": probe_accuracy(train_x, data.train_labels, test_x, data.test_labels,
                                                num_classes, l2)},
        "few_shot": {},
    }
    for k in shots:
        generator = torch.Generator().manual_seed(seed)
        accuracies = []
        for _ in range(trials):
            pick = sample_shots(data.train_labels, k, data.classes, generator)
            accuracies.append(probe_accuracy(train_x[pick.to(train_x.device)], data.train_labels[pick],
                                             test_x, data.test_labels, num_classes, l2))
        results["few_shot"][str(k)] = {"mean": statistics.fmean(accuracies),
                                       "std": statistics.pstdev(accuracies), "trials": accuracies}
    return results


def probe_lines(r: dict[str, Any], heading: str = "linear probe", where: str | None = None,
                indent: str = "") -> list[str]:
    """:func:`run_probe`'s results in a few lines: the full probe after ``heading``, with
    ``where`` (default: classes, chance and split sizes) in brackets, then one line per k
    (indented by ``indent``). ``python -m trainer.probe`` prints them; the evaluation's
    summary uses them for ``eval.data``."""
    where = where or (f"{r['classes']} classes, chance {r['chance']:.3f}, {r['train_examples']} train / "
                      f"{r['test_examples']} test")
    return [f"{heading}: top-1 {r['linear_probe']['top1']:.3f} ({where})",
            *(f"{indent}{k}-shot: {s['mean']:.3f} +- {s['std']:.3f} over {len(s['trials'])} trials"
              for k, s in r["few_shot"].items())]
