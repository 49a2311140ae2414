"""Reading checkpoint folders: which are complete, their ``meta.json``, and the weights alone.

Layout of a run's checkpoint folder (written by ``trainer.job.checkpointer``)::

    step_00000100/           a complete checkpoint
        meta.json            step, privacy ledger and engine state, data position, config, backend
        .metadata, *.distcp  backend=fsdp2: DCP, model and optimizer tensors sharded by rank
        deepspeed/           backend=deepspeed: the engine's save_checkpoint (ZeRO partitions)
        weights.pt           backend=deepspeed: the full fp32 model weights, tensors only
    .tmp-step_00000200/      a save in progress (or killed): never read

Everything that reads one of our checkpoints (resume, ``--init``, probe, caption,
evaluate, export) finds it through here. The weights alone come from DCP (fsdp2) or
from ``weights.pt`` (deepspeed), so no tool needs the backend that trained the model.

Checkpoints from elsewhere run no code and read no file outside their folder. Three
files in a checkpoint are pickles: DCP's ``.metadata``, read here with an unpickler
that knows only the classes DCP's metadata is made of (:func:`read_dcp_metadata`, also
the reader :func:`load_dcp` hands to DCP), whose storage paths must name files inside
the folder; ``weights.pt`` and released ``.pt``/``.pth`` files, read with
``torch.load(weights_only=True)``; and DeepSpeed's own files, which its
``load_checkpoint`` would unpickle without restriction: :func:`read_deepspeed_file`
reads each with ``weights_only=True`` and only the three DeepSpeed classes they hold
allowed, both in :func:`check_deepspeed_files` (every file, on every rank, before
DeepSpeed starts) and as the loader DeepSpeed itself uses (``trainer.job.deepspeed_backend``).
Released weights may also be ``.safetensors`` (no pickle at all).

Written files are private and on disk before a checkpoint counts: ``meta.json`` is
created 0600 (:func:`write_private_json`), and every file a save writes is fsynced
(DCP does it for its own; :func:`fsync_tree` for DeepSpeed's).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
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
META_FORMAT = 2  # meta.json keyed by component (format 1: one flat dict)
DCP_METADATA = ".metadata"
DEEPSPEED_TAG = "deepspeed"  # the engine's own folder inside a step folder
WEIGHTS = "weights.pt"  # {"model": full fp32 state dict}, beside a DeepSpeed checkpoint
SAFETENSORS = ".safetensors"

# what DCP's .metadata pickle is made of (torch 2.14): its dataclasses, torch.Size, dtypes
# (and layouts, by name), the checkpoint's path. Not BytesStorageMetadata: a non-tensor entry,
# which DCP's loader would torch.load(weights_only=False); our checkpoints hold tensors only.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PureWindowsPath")}
# what DeepSpeed 0.19.8's checkpoint files hold beyond torch's weights-only allowlist
_DEEPSPEED_CLASSES = (("deepspeed.utils.tensor_fragment", "fragment_address"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"))


class CheckpointError(ValueError):
    """A checkpoint that is refused (it holds what our saves never write) or cannot be loaded;
    the message names it and says what to do."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Finds only the classes of :data:`_DCP_CLASSES` and torch's dtypes: anything else in the
    file (a function to call, any other class) stops the read before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_dcp_metadata(folder: Path) -> Metadata:
    """A DCP checkpoint's ``.metadata``, unpickled with only DCP's own classes allowed;
    a ValueError saying so (nothing in the file ran) if it holds anything else."""
    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing {path}: {e}, so DCP did not write it (a crafted checkpoint?). "
                              f"Nothing in it was run; do not load it elsewhere") from None
    except (OSError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise unloadable(folder, e) from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"refusing {path}: it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        _check_inside(folder, getattr(info, "relative_path", None), path)
    return metadata


def _check_inside(folder: Path, name: Any, metadata: Path) -> None:
    """A storage path of DCP's metadata: a plain relative name inside ``folder`` (our saves
    write ``__R_0.distcp``); an absolute path or one through ``..`` is refused, before any read."""
    relative = Path(str(name))
    if not isinstance(name, str) or relative.is_absolute() or ".." in relative.parts or name == "":
        raise CheckpointError(f"refusing {metadata}: it points DCP at {name!r}, outside its checkpoint folder, "
                              f"so DCP did not write it (a crafted checkpoint?). Nothing was read from there")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by :func:`read_dcp_metadata` (its own reader
    unpickles it unrestricted); tensors it reads with ``torch.load(weights_only=True)``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: never written by our saves
            raise ValueError(f"{self.path}: per-rank DCP metadata is not read here")
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_dcp(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load`` of a checkpoint folder (collective), its metadata checked first (a clear
    refusal on every rank rather than DCP's wrapped error), then read safely by DCP too."""
    read_dcp_metadata(folder)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)))
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        raise unloadable(folder, e) from e


def check_deepspeed_files(folder: Path) -> None:
    """Every ``*.pt`` of a DeepSpeed checkpoint folder read by :func:`read_deepspeed_file`,
    before DeepSpeed's ``load_checkpoint`` starts: every rank refuses a crafted folder
    together, rather than the ranks whose files DeepSpeed reads first."""
    files = sorted(Path(folder).rglob("*.pt"))
    if not files:
        raise ValueError(f"{folder}: no DeepSpeed checkpoint files (*.pt) in it")
    for path in files:
        read_deepspeed_file(path, "cpu")


def read_deepspeed_file(path: Path, map_location: Any = None) -> Any:
    """One file of a DeepSpeed checkpoint, with ``torch.load(weights_only=True)`` and only
    DeepSpeed's own classes (:data:`_DEEPSPEED_CLASSES`) allowed; a CheckpointError naming
    the file if it holds anything else (nothing in it ran), or if it cannot be read."""
    import importlib

    allowed = [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"refusing {path}: it holds more than tensors and DeepSpeed's checkpoint classes "
                              f"({detail}), so DeepSpeed did not write it as it is (a crafted checkpoint?). "
                              f"Nothing in it was run; do not load it elsewhere") from None
    except (OSError, RuntimeError, EOFError) as e:  # cut short, not a torch file
        raise unloadable(Path(path).parent.parent, e) from e


def write_private_json(path: Path, obj: Any) -> None:
    """A new file (it must not exist), created with mode 0600 (never readable by others, not
    even for a moment), written and flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """A folder's entries (files created or renamed in it) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, mine=lambda path: True) -> None:
    """The files of ``folder`` (recursively) that ``mine`` accepts, and its folders, on disk:
    on a shared file system only the process that wrote a file can flush it."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink() and mine(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *(p for p in Path(folder).rglob("*") if p.is_dir())]:
        fsync_dir(path)


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
    """A step folder's ``meta.json``, keyed by component (a checkpoint of the earlier flat
    layout is read as if written now); a ValueError naming the folder if it cannot be read."""
    try:
        with open(Path(path) / META) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than the stack
        raise unloadable(path, e) from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META}: not a JSON object")
    if meta.get("format", 1) > META_FORMAT:
        raise CheckpointError(f"{path / META}: written by a newer version of this trainer (meta.json format "
                              f"{meta['format']}; this one reads up to {META_FORMAT}): update the trainer")
    return meta if "format" in meta else _from_flat_meta(meta)


def _from_flat_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before meta.json was keyed by component (format 1: one flat
    dict), in today's layout, so that it resumes bit for bit; what it lacks stays absent
    or None (a resume then says which)."""
    components = {"train_state": {"step": meta.get("step"), "sampling_seed": meta.get("sampling_seed"),
                                  "lineage": meta.get("lineage"),
                                  # checkpoints before the backend seam are FSDP2's
                                  "backend": meta.get("backend", "fsdp2"), "world_size": meta.get("world_size")},
                  "engine": meta.get("engine"), "metrics": {}}
    if "privacy" in meta:
        components["privacy"] = {**meta["privacy"], "epsilon_rdp": meta.get("epsilon_rdp")}
    if "reader" in meta:
        components["reader"] = {**meta["reader"], "next_step": meta.get("step")}
    rest = {key: value for key, value in meta.items()
            if key not in ("step", "sampling_seed", "lineage", "backend", "world_size", "engine", "privacy",
                           "reader", "epsilon_rdp")}
    return {**rest, **components, "format": META_FORMAT}


def unloadable(path: Path, error: BaseException) -> CheckpointError:
    """What to do when a checkpoint cannot be loaded: it is left as it is, never deleted,
    and the previous one is one rename away (a folder not named step_* is ignored)."""
    path = Path(path)
    if isinstance(error, CheckpointException) and error.failures:  # the first rank's own error
        error = next(iter(error.failures.values()))[0]
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"cannot load checkpoint {path} ({type(error).__name__}: {detail[:300]}). It is left "
                      f"untouched. If it is damaged, move it aside to resume from the one before: "
                      f"mv {path} {path.parent / ('damaged-' + path.name)}")


def load_model_weights(model: nn.Module, path: str, convert_upstream) -> None:
    """Weights only (``--init``, the tools), from a checkpoint folder of ours or a weights file.

    Collective when the model is sharded (every rank loads). A folder may be a run's
    checkpoint directory (its latest step is used) or one ``step_*`` folder, written by
    either backend. A file (``.pt``/``.pth``, or ``.safetensors``) holds a state dict (or
    ``{"model": state_dict}``) in our layout or the original code's layout (converted
    with ``convert_upstream``).
    """
    p = Path(path)
    if p.is_dir():
        step_dir = step_folder(p)
        if (step_dir / WEIGHTS).is_file():
            _load_state_dict(model, read_weights_file(step_dir / WEIGHTS), step_dir / WEIGHTS, convert_upstream)
        elif (step_dir / DCP_METADATA).is_file():
            tensors = ModelOptimizerState(model, None)
            state = tensors.state_dict()
            load_dcp({"app": state}, step_dir)
            tensors.load_state_dict(state)
        else:
            raise ValueError(f"{step_dir}: holds neither DCP files ({DCP_METADATA}) nor {WEIGHTS}; "
                             f"not a checkpoint this trainer wrote")
        logger.info("initialised weights from %s", step_dir)
        return
    if not p.is_file():
        raise ValueError(f"{path}: no such weights file or checkpoint folder")
    _load_state_dict(model, read_weights_file(p), p, convert_upstream)
    logger.info("initialised weights from %s", p)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
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
