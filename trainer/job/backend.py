"""The seam between the training job and its sharding engine (FSDP2 or DeepSpeed).

The :class:`~trainer.job.trainer.Trainer` does everything that does not depend on
how parameters are laid out across ranks: Poisson sampling, the privacy engine,
accounting, the privacy guard, metrics, resume. A backend does the rest, behind
one interface: it shards the model, owns the optimizer, supplies the privacy
engine's :class:`~privacy.reducer.GradReducer` (how a clipped sum crosses ranks
and becomes a gradient of the backend's layout), applies the step, and writes
and reads its tensors in a checkpoint folder. Nothing outside a backend asks
which one runs: the backends are registered in :data:`BACKENDS` alone, and each
checks its own config (``check_config``, before any work), its own resume rule
(``check_resume``) and describes itself for ``--dry-run`` (``describe``).

A private step, as the trainer drives it::

    for each micro-batch: engine.backward(model(batch))  # clipped sums, no autograd weight grads
    backend.before_assign()                             # the backend is ready to take gradients
    engine.finish_step()                                # reducer.reduce, noise once, reducer.assign
    backend.step(lr)

A non-private step calls ``backend.backward(loss, last)`` per micro-batch instead.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from trainer.common.config import JobConfig
from trainer.job.distributed import Distributed
from trainer.job.geometry import Geometry

# name -> "module:class", imported when chosen (DeepSpeed is imported only by a job that runs it)
BACKENDS = {
    "fsdp2": "trainer.job.fsdp2_backend:FSDP2Backend",
    "deepspeed": "trainer.job.deepspeed_backend:DeepSpeedBackend",
}


class Reducer(Protocol):
    """privacy.reducer.GradReducer, plus the bytes this rank sent in the current step."""

    noise_stream: int
    bytes_sent: int

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor: ...

    def assign(self, param: nn.Parameter, grad: Tensor) -> None: ...


class Backend(Protocol):
    name: str
    reducer: Reducer  # its bytes_sent counts from before_assign
    compute_dtype: torch.dtype  # the dtype floating inputs are given to the model in

    def __init__(self, cfg: JobConfig, geo: Geometry, d: Distributed, private: bool): ...

    @staticmethod
    def check_config(cfg: JobConfig, geo: Geometry) -> None:
        """Refuse (ValueError naming the key) what this backend cannot honour, warn about what
        it ignores; no process group needed."""

    @staticmethod
    def describe(cfg: JobConfig) -> str:
        """One line for ``--dry-run``: how this backend shards and optimizes."""

    def check_resume(self, world_size: int) -> None:
        """Refuse (ValueError) a checkpoint written by ``world_size`` ranks if this backend
        cannot load it on this job's."""

    def setup(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` (its layers already wrapped by the privacy engine, if any) and
        build its optimizer; returns what the job calls for the forward pass."""

    def backward(self, loss: Tensor, last: bool) -> None:
        """Non-private runs: accumulate the gradient of ``loss`` (a sum already scaled to
        a mean over the expected batch); reduce across ranks on the step's ``last``
        micro-batch."""

    def before_assign(self) -> None:
        """Private runs: after the step's last micro-batch and before the privacy engine
        assigns this step's noised gradient through :attr:`reducer`."""

    def step(self, lr: float) -> None:
        """Apply this step's gradient with learning rate ``lr``, then clear it."""

    def gathered(self) -> AbstractContextManager[nn.Module]:
        """The model with whole parameters on every rank, for calls other than forward
        (generate, zero-shot, features): collective, like evaluation itself."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """Collective: the model's full fp32 parameters and buffers, on rank 0's CPU (an
        empty dict on the other ranks)."""

    def save(self, folder: Path) -> None:
        """Collective: model and optimizer state into ``folder`` (which exists)."""

    def load(self, folder: Path) -> None:
        """Collective: restore what :meth:`save` wrote into ``folder``."""


def backend_class(name: str) -> type[Backend]:
    """The backend registered as ``name``; a ValueError naming the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(cfg: JobConfig, geo: Geometry, d: Distributed, private: bool) -> Backend:
    """The backend named by ``cfg.backend``."""
    return backend_class(cfg.backend)(cfg, geo, d, private)
