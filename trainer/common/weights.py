"""A trained model outside training (probe, caption, export): which config builds it,
and its weights.

A checkpoint folder says both (its ``meta.json`` holds the run's config), whichever
backend wrote it; a weights file (``.pt``/``.pth`` or ``.safetensors``), ours or the
original code's layout (DP-Cap's, or MAE's for ViP), needs the config named (a preset
or a file).
Everything runs in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

import models
from trainer.common.build import build_model, build_tokenizer
from trainer.common.checkpoints import load_model_weights, read_meta, step_folder
from trainer.common.config import DataConfig, FinetuneConfig, JobConfig, ModelConfig, load_config

logger = logging.getLogger(__name__)


def config_from_meta(step: Path) -> JobConfig:
    """The model and data sections (and a classifier's finetune section) of the run's saved
    config: all that builds the model and its inputs."""
    raw = read_meta(step)["config"]
    sections = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("finetune", FinetuneConfig)):
        if name not in raw:
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        if ignored := sorted(set(raw[name]) - known):
            logger.warning("%s: ignoring unknown %s settings %s", step, name, ", ".join(ignored))
        sections[name] = cls(**{k: v for k, v in raw[name].items() if k in known})
    return JobConfig(name=raw.get("name", "default"), **sections)


def locate(checkpoint: str, config: str | None) -> tuple[JobConfig, Path]:
    """The job config that builds the model, and the weights: a checkpoint folder (config
    from its meta.json unless `config` is given) or a weights file (`config` required)."""
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"{checkpoint}: no such checkpoint folder or file")
    if path.is_dir():
        path = step_folder(path)
        return (load_config(config) if config else config_from_meta(path)), path
    if not config:
        raise ValueError(f"{checkpoint}: a weights file does not say which model it holds; "
                         f"name its preset or config file with --config (e.g. dpcap_base_paper)")
    return load_config(config), path


def refuse_classifier(cfg: JobConfig, checkpoint: str) -> None:
    """probe, caption and evaluate judge a pre-trained encoder; a fine-tuned classifier is judged
    by its own job (and released by trainer.export): a ValueError saying so."""
    if cfg.is_classifier:
        raise ValueError(f"{checkpoint} holds a fine-tuned classifier (data.source=classes), not a pre-trained "
                         f"DP-Cap or ViP: its top-1 is in its job's runs/NAME/tb/eval_step_N.json, and "
                         f"python -m trainer.export releases it; probe, caption and evaluate take the encoder "
                         f"it was fine-tuned from")


def load_trained_model(cfg: JobConfig, weights: Path) -> nn.Module:
    """The job's model with the given weights (ours or the original code's layout), in eval mode."""
    model = build_model(cfg, build_tokenizer(cfg))
    with warnings.catch_warnings():  # DCP's note that it loads in one process: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_model_weights(model, str(weights), partial(models.from_original_layout, model))
    return model.eval()


def add_model_arguments(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """CHECKPOINT, --config (and --device): what every tool that loads a trained model takes."""
    parser.add_argument("checkpoint", help="a checkpoint folder (a step_* folder, or a run's checkpoint "
                        "folder: its latest step) or a weights file, .pt/.pth or .safetensors (ours or the "
                        "original code's layout)")
    parser.add_argument("--config", default=None, help="preset or .json/.yaml that builds the model: "
                        "required for a weights file; for a folder it replaces the saved config")
    if device:
        parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")


def pick_device(name: str | None) -> torch.device:
    """``--device``: CUDA when there is one, unless told otherwise."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
