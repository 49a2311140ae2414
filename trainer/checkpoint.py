"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint.

Layout of ``<dir>``::

    step_00000100/           a complete checkpoint
        .metadata, *.distcp  DCP: model and optimizer tensors, sharded by rank
        meta.json            step, privacy history and engine state, data position, config
    .tmp-step_00000200/      a save in progress (or killed): never read

Atomicity: every rank writes into the temporary folder, then rank 0 writes
``meta.json`` last and renames the folder; a checkpoint without ``meta.json``
or with a ``.tmp-`` name is ignored, so a killed save never replaces the last
good one. DCP reshards on load, so a checkpoint written by W ranks resumes on
any number of ranks.

Only tensors go through DCP (its loader unpickles non-tensor values); every
other piece of state is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


class ModelOptimizerState(Stateful):
    """Model parameters and buffers, and the optimizer's per-parameter tensors (sharded)."""

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, rank: int):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir()
                 if _STEP_DIR.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, tensors: Stateful, meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-step_{step:08d}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        dcp.save({"app": tensors}, checkpoint_id=str(tmp))
        _barrier()
        if self.rank == 0:
            _write_json(tmp / META, meta)
            if final.exists():  # re-saving a step (e.g. resumed and stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        try:
            with open(Path(path) / META) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise _unloadable(path, e) from e

    @staticmethod
    def load(path: Path, tensors: Stateful) -> None:
        """Collective: load (and reshard) the DCP tensors into `tensors`."""
        try:
            dcp.load({"app": tensors}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise _unloadable(path, e) from e


def _unloadable(path: Path, error: BaseException) -> ValueError:
    """What to do when a checkpoint cannot be loaded: it is left as it is, never deleted,
    and the previous one is one rename away (a folder not named step_* is ignored)."""
    path = Path(path)
    if isinstance(error, CheckpointException) and error.failures:  # the first rank's own error
        error = next(iter(error.failures.values()))[0]
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"cannot load checkpoint {path} ({type(error).__name__}: {detail[:300]}). It is left "
                      f"untouched. If it is damaged, move it aside to resume from the one before: "
                      f"mv {path} {path.parent / ('damaged-' + path.name)}")


def step_folder(path: Path) -> Path:
    """A ``step_*`` folder, or a run's checkpoint folder (its latest complete step)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = Checkpointer(path, 1, 0).latest()
    if latest is None:
        raise ValueError(f"{path}: no complete checkpoint (step_*/{META}) in this folder")
    return latest


def load_model_weights(model: nn.Module, path: str, convert_upstream) -> None:
    """Weights only (``--init``, probes, export), from a checkpoint folder of ours or a .pt/.pth file.

    Collective (every rank loads). A folder may be a run's checkpoint directory
    (its latest step is used) or one ``step_*`` folder. A file holds a state
    dict (or ``{"model": state_dict}``) in our layout or the original code's
    layout (converted with ``convert_upstream``).
    """
    p = Path(path)
    if p.is_dir():
        step_dir = step_folder(p)
        tensors = ModelOptimizerState(model, None)
        state = tensors.state_dict()
        dcp.load({"app": state}, checkpoint_id=str(step_dir))
        tensors.load_state_dict(state)
        logger.info("initialised weights from %s", step_dir)
        return
    if not p.is_file():
        raise ValueError(f"{path}: no such weights file or checkpoint folder")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
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
    ours = set(get_model_state_dict(model).keys())
    if not ours <= set(sd):
        sd = convert_upstream(sd)
        missing = ours - set(sd)
        if missing:
            raise ValueError(f"{path}: neither our layout nor the original code's layout; "
                             f"missing {sorted(missing)[:5]}...")
    set_model_state_dict(model, {k: sd[k] for k in ours},
                         options=StateDictOptions(full_state_dict=True))
    logger.info("initialised weights from %s", p)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
