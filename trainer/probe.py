"""Linear-probe and few-shot evaluation of a trained encoder on frozen features.

    python -m trainer.probe CHECKPOINT [--config PRESET|FILE] [--data synthetic:TASK | FOLDER]
        [--shots 1,5,10] [--trials 5] [--pool mean|cls] [--out results.json]

DP-Cap and ViP are judged, as in their papers, by a linear classifier on the
frozen encoder's features: trained on every training example (the full linear
probe) and on k examples per class (k-shot, mean and std over a few draws).
The classifier is an L2-penalised multinomial logistic regression fitted
full-batch with L-BFGS from zeros, so a result depends only on the features
and the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data import synthetic
from data.decode import IMAGE_EXTENSIONS
from trainer.config import JobConfig
from trainer.datasets import image_file_pixels, transform
from trainer.evaluate import TASKS, heldout
from trainer.weights import add_model_arguments, load_trained_model, locate, pick_device

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- data

def synthetic_data(cfg: JobConfig, task: str, count: int) -> ProbeData:
    """data.synthetic's held-out images: the first half trains the probe, the second tests it."""
    if task not in TASKS:
        raise ValueError(f"--data synthetic:{task}: unknown task; use one of "
                         f"{', '.join(SYNTHETIC + t for t in TASKS)}")
    if count < 4:
        raise ValueError(f"--examples {count}: need at least 4 synthetic images (half train, half test)")
    images, labels, _ = heldout(cfg, count, task)
    half = count // 2
    names = {"colour": list(synthetic.COLOURS), **synthetic.ZERO_SHOT_TASKS}[task]
    return ProbeData(classes=names, train_labels=labels[:half], test_labels=labels[half:],
                     train_images=lambda b: iter(images[:half].split(b)),
                     test_images=lambda b: iter(images[half:].split(b)))


def folder_data(root: Path, cfg: JobConfig) -> ProbeData:
    """An ImageNet-style folder, ``root/train/<class>/*`` and ``root/val/<class>/*``, decoded
    with data.decode (never unpickled) and resized like the trainer's inputs."""
    train_dir, val_dir = root / "train", root / "val"
    classes = _class_folders(train_dir) if train_dir.is_dir() else []
    if not classes:
        raise ValueError(f"--data {root}: expected class folders in {train_dir} "
                         f"(layout FOLDER/train/<class>/*.jpg and FOLDER/val/<class>/*.jpg)")
    if not val_dir.is_dir():
        raise ValueError(f"--data {root}: no {val_dir} (layout FOLDER/train/<class>/*, FOLDER/val/<class>/*)")
    if unknown := sorted(set(_class_folders(val_dir)) - set(classes)):
        raise ValueError(f"--data {root}: val classes {unknown[:5]} have no train folder")
    train, test = _image_files(train_dir, classes), _image_files(val_dir, classes)
    if not train or not test:
        raise ValueError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                         f"{train_dir if not train else val_dir}/<class>/")
    to_pixels = transform(cfg, None)

    def batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(files), batch_size):
            yield torch.stack([image_file_pixels(f, to_pixels) for f in files[i: i + batch_size]])

    return ProbeData(classes=classes,
                     train_labels=torch.tensor([label for _, label in train]),
                     test_labels=torch.tensor([label for _, label in test]),
                     train_images=lambda b: batches([f for f, _ in train], b),
                     test_images=lambda b: batches([f for f, _ in test], b))


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [(f, label) for label, name in enumerate(classes) if (split / name).is_dir()
            for f in sorted((split / name).iterdir())
            if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]


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


def check_shots(labels: torch.Tensor, shots: int, classes: Sequence[str]) -> None:
    """k-shot needs k training examples in every class."""
    counts = torch.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < shots:
        raise ValueError(f"--shots {shots}: class {classes[smallest]!r} has only {int(counts[smallest])} "
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


def summary_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"linear probe: top-1 {r['linear_probe']['top1']:.3f} ({r['classes']} classes, "
             f"chance {r['chance']:.3f}, {r['train_examples']} train / {r['test_examples']} test)"]
    for k, s in r["few_shot"].items():
        lines.append(f"{k}-shot: {s['mean']:.3f} +- {s['std']:.3f} over {len(s['trials'])} trials")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.probe",
        description="Full linear probe and k-shot linear classification on a frozen DP-Cap / ViP encoder.")
    add_model_arguments(parser)
    parser.add_argument("--data", default="synthetic:colour", help="synthetic:colour|shape|object (held-out "
                        "synthetic images, halves for train/test) or FOLDER with train/<class>/ and val/<class>/")
    parser.add_argument("--examples", type=int, default=None,
                        help="synthetic images in all (default: the config's data.heldout_examples)")
    parser.add_argument("--shots", default="1,5,10", help="comma-separated k of the k-shot probes ('' for none)")
    parser.add_argument("--trials", type=int, default=5, help="draws of k examples per class per k")
    parser.add_argument("--pool", choices=("mean", "cls"), default="mean",
                        help="mean over patch tokens, or the CLS token")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the classifier weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-shot draws")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots {text!r}: every k must be >= 1")
    return shots


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        shots = _shots(args.shots)
        if args.trials < 1 or args.batch_size < 1:
            raise ValueError("--trials and --batch-size must be >= 1")
        device = pick_device(args.device)
        if not args.data.startswith(SYNTHETIC) and not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data}: neither synthetic:TASK nor an existing folder")
        cfg, weights = locate(args.checkpoint, args.config)
        if args.data.startswith(SYNTHETIC):
            count = args.examples if args.examples is not None else cfg.data.heldout_examples
            data = synthetic_data(cfg, args.data[len(SYNTHETIC):], count)
        else:
            data = folder_data(Path(args.data), cfg)
        for k in shots:  # before loading the model and extracting features (the long part)
            check_shots(data.train_labels, k, data.classes)
        model = load_trained_model(cfg, weights).to(device)
        results = run_probe(model, data, shots=shots, trials=args.trials, pool=args.pool,
                            batch_size=args.batch_size, device=device, l2=args.l2, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {"checkpoint": args.checkpoint, "model": cfg.model.name, "data": args.data,
               "pool": args.pool, "l2": args.l2, "seed": args.seed, **results}
    print("\n".join(summary_lines(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file, trainer/ would shadow the top-level packages (data.py)
        sys.exit("run the probe as a module: python -m trainer.probe ...")
    sys.exit(main())
