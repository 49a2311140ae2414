"""Reading checkpoint folders: which are complete, their ``meta.json``, and the weights alone.

Layout of a run's checkpoint folder (written by ``trainer.job.checkpoint``)::

    step_00000100/           a complete checkpoint
        meta.json            step, privacy ledger and engine state, data position, config, backend
        .metadata, *.distcp  backend=fsdp2: DCP, model and optimizer tensors sharded by rank
        deepspeed/           backend=deepspeed: the engine's save_checkpoint (ZeRO partitions)
        weights.pt           backend=deepspeed: the full fp32 model weights, tensors only
    .tmp-step_00000200/      a save in progress (or killed): never read

Everything that reads one of our checkpoints (resume, ``--init``, probe, caption,
export) finds it through here. The weights alone come from DCP (fsdp2) or from
``weights.pt`` (deepspeed, read with ``torch.load(weights_only=True)``), so no tool
needs the backend that trained the model.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
DCP_METADATA = ".metadata"
DEEPSPEED_TAG = "deepspeed"  # the engine's own folder inside a step folder
WEIGHTS = "weights.pt"  # {"model": full fp32 state dict}, beside a DeepSpeed checkpoint


class ModelOptimizerState(Stateful):
    """DCP's view of a model and its optimizer: parameters and buffers, and the
    optimizer's per-parameter tensors (sharded for FSDP2, whole for a plain model).

    Only tensors go through DCP (its loader unpickles non-tensor values); every other
    piece of state is JSON in ``meta.json``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            # param_groups (lr, betas, ...) come from the config, not the checkpoint
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)["state"]
        _assert_tensors(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            full = get_optimizer_state_dict(self.model, self.optimizer)
            full["state"] = state["optim"]
            set_optimizer_state_dict(self.model, self.optimizer, full)


def _assert_tensors(tree: Any, path: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _assert_tensors(v, f"{path}.{k}")
    else:
        assert isinstance(tree, torch.Tensor), f"non-tensor {type(tree).__name__} at {path} would be pickled"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (a ``step_*`` folder with ``meta.json``), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def step_folder(path: Path) -> Path:
    """A ``step_*`` folder, or a run's checkpoint folder (its latest complete step)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    done = complete_checkpoints(path)
    if not done:
        raise ValueError(f"{path}: no complete checkpoint (step_*/{META}) in this folder")
    return done[-1]


def read_meta(path: Path) -> dict[str, Any]:
    """A step folder's ``meta.json``; a ValueError naming the folder if it cannot be read."""
    try:
        with open(Path(path) / META) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise unloadable(path, e) from e


def unloadable(path: Path, error: BaseException) -> ValueError:
    """What to do when a checkpoint cannot be loaded: it is left as it is, never deleted,
    and the previous one is one rename away (a folder not named step_* is ignored)."""
    path = Path(path)
    if isinstance(error, CheckpointException) and error.failures:  # the first rank's own error
        error = next(iter(error.failures.values()))[0]
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"cannot load checkpoint {path} ({type(error).__name__}: {detail[:300]}). It is left "
                      f"untouched. If it is damaged, move it aside to resume from the one before: "
                      f"mv {path} {path.parent / ('damaged-' + path.name)}")


def load_model_weights(model: nn.Module, path: str, convert_upstream) -> None:
    """Weights only (``--init``, probes, export), from a checkpoint folder of ours or a .pt/.pth file.

    Collective when the model is sharded (every rank loads). A folder may be a run's
    checkpoint directory (its latest step is used) or one ``step_*`` folder, written by
    either backend. A file holds a state dict (or ``{"model": state_dict}``) in our
    layout or the original code's layout (converted with ``convert_upstream``).
    """
    p = Path(path)
    if p.is_dir():
        step_dir = step_folder(p)
        if (step_dir / WEIGHTS).is_file():
            _load_state_dict(model, _read_weights_file(step_dir / WEIGHTS), step_dir / WEIGHTS, convert_upstream)
        elif (step_dir / DCP_METADATA).is_file():
            tensors = ModelOptimizerState(model, None)
            state = tensors.state_dict()
            try:
                dcp.load({"app": state}, checkpoint_id=str(step_dir))
            except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
                raise unloadable(step_dir, e) from e
            tensors.load_state_dict(state)
        else:
            raise ValueError(f"{step_dir}: holds neither DCP files ({DCP_METADATA}) nor {WEIGHTS}; "
                             f"not a checkpoint this trainer wrote")
        logger.info("initialised weights from %s", step_dir)
        return
    if not p.is_file():
        raise ValueError(f"{path}: no such weights file or checkpoint folder")
    _load_state_dict(model, _read_weights_file(p), p, convert_upstream)
    logger.info("initialised weights from %s", p)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: the file holds more than tensors (e.g. the original training "
            "script's argparse.Namespace) and is not unpickled here, since unpickling runs "
            "code. If you trust it, save only its weights first: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, convert_upstream) -> None:
    """Full tensors into ``model`` (plain or FSDP-sharded), ours or the original layout."""
    ours = set(get_model_state_dict(model).keys())
    if not ours <= set(sd):
        sd = convert_upstream(sd)
        missing = ours - set(sd)
        if missing:
            raise ValueError(f"{source}: neither our layout nor the original code's layout; "
                             f"missing {sorted(missing)[:5]}...")
    set_model_state_dict(model, {k: sd[k] for k in ours}, options=StateDictOptions(full_state_dict=True))
