"""Export a trained model's weights, and nothing else, to one file for release.

    python -m trainer.export CHECKPOINT OUT.pth [--config PRESET|FILE] [--layout ours|original]
    python -m trainer.export CHECKPOINT OUT.safetensors --format safetensors

A checkpoint folder is not fit to publish: its ``meta.json`` holds the run's
secret seed, from which anyone could regenerate the noise and the batches and
undo the privacy, and its DCP files hold the optimizer state. The exported file
is ``{"model": state_dict}`` with tensors only (``torch.load(weights_only=True)``
reads it), in our layout or in the original code's layout, which that code
loads with ``model.load_state_dict(checkpoint["model"], strict=False)``:
DP-Cap's models_mae.py for DP-Cap, MAE's (ViP-MAE's) models_mae.py for ViP.
``--format safetensors`` writes the same tensors as a safetensors file (the format
weights are shared in, which holds no pickle at all; the layout and model name in
its metadata). Every form loads again with ``trainer.train --init`` and the tools.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import models
from models.classifier import released_state_dict
from trainer.common.weights import add_model_arguments, load_trained_model, locate

LAYOUTS = ("ours", "original")
FORMATS = {"pth": ".pth", "safetensors": ".safetensors"}
ORIGINAL_VOCAB = 30_522  # the original DP-Cap head and text embedding: BERT uncased


def exported_state_dict(model: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers, contiguous on the CPU, in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    # a fine-tuned classifier's parameter average, if it kept one, in its parameters' places
    sd = {k: v.detach().cpu().contiguous() for k, v in released_state_dict(model).items()}
    if layout == "ours":
        return sd
    if not isinstance(model, (models.DPCap, models.ViP)):
        raise ValueError(f"--layout original: {type(model).__name__} has no original layout (the original "
                         f"DP-Cap and MAE code hold no classifier); use --layout ours (a timm model's keys "
                         f"are timm's)")
    if isinstance(model, models.DPCap) and model.config.vocab_size != ORIGINAL_VOCAB:
        raise ValueError(f"--layout original: this model's vocabulary has {model.config.vocab_size} ids (a "
                         f"synthetic job's compact one?); the original DP-Cap code expects {ORIGINAL_VOCAB}; "
                         f"use --layout ours")
    return models.to_original_layout(model, sd)


def save_weights(sd: dict[str, torch.Tensor], out: Path, force: bool, fmt: str = "pth",
                 metadata: dict[str, str] | None = None) -> None:
    """Atomic: a temporary file renamed into place, so an interrupted export leaves no half file.
    ``pth``: ``{"model": sd}`` by torch.save; ``safetensors``: ``sd`` with ``metadata``."""
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors stores each tensor once and refuses tensors that share memory
        save_file({k: v.clone() for k, v in sd.items()}, tmp, metadata=metadata)
    else:
        torch.save({"model": sd}, tmp)
    os.replace(tmp, out)


def check_format(out: Path, fmt: str | None) -> str:
    """``--format``, or the one OUT's suffix names; a mismatch is refused, since readers tell
    the formats apart by the suffix."""
    named = "safetensors" if out.suffix == FORMATS["safetensors"] else "pth"
    fmt = fmt or named
    if fmt == "safetensors" and out.suffix != FORMATS["safetensors"]:
        raise ValueError(f"--format safetensors: name the file {out.with_suffix('.safetensors')} "
                         f"(the tools recognise safetensors by the suffix)")
    if fmt == "pth" and named == "safetensors":
        raise ValueError(f"{out}: a .safetensors name for a torch.save file; use --format safetensors")
    return fmt


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Write a trained model's weights (no secret seed, no optimizer state) to one file.")
    add_model_arguments(parser, device=False)
    parser.add_argument("out", help="the file to write, e.g. dpcap_base_eps8.pth")
    parser.add_argument("--layout", choices=LAYOUTS, default="ours",
                        help="key names: ours, or the original code's (DP-Cap's or MAE's models_mae.py)")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                        help="pth (torch.save of {'model': state_dict}) or safetensors "
                             "(default: from OUT's suffix)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        fmt = check_format(out, args.format)
        if out.exists() and not args.force:  # before the (long) load
            raise ValueError(f"{out} exists; pass --force to replace it")
        cfg, weights = locate(args.checkpoint, args.config)
        model = load_trained_model(cfg, weights)
        sd = exported_state_dict(model, args.layout)
        save_weights(sd, out, args.force, fmt, metadata={"model": cfg.model.name, "layout": args.layout})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sum(v.numel() for v in sd.values())
    print(f"wrote {out}: {cfg.model.name} from {weights}, {len(sd)} tensors ({params:,} values), "
          f"{args.layout} layout, {fmt}, weights only")
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file, Python would not import trainer/ as the trainer package
        sys.exit("run the export as a module: python -m trainer.export ...")
    sys.exit(main())
