"""backend=deepspeed: ``deepspeed.initialize`` with the job's DeepSpeed config.

ZeRO stage 0-3 and its offload options come from ``zero_optimization``, bf16
from ``bf16.enabled``, the optimizer from the config's ``optimizer`` section
(AdamW; DeepSpeed builds it, e.g. its CPU Adam for offload) or, without one,
the trainer's torch AdamW. Either way the hyperparameters are the job's
(``optim.*``: peak lr, betas, weight decay per parameter group, the schedule).

How a private step reaches DeepSpeed. The privacy engine's layers give autograd
no weight gradient, so none of ZeRO's per-parameter gradient hooks ever fires
(DP libraries that clip per layer do so because ZeRO-2/3 reduce-scatter each
gradient as soon as autograd produces it). After the step's last micro-batch:

1. ``engine.backward`` at the accumulation boundary of a loss whose gradient is
   zero (stages 0 and 3: it depends on no parameter; ZeRO-1/2: the smallest
   parameter times zero, since their reduction buckets only exist once a gradient
   arrived): DeepSpeed reduces (next to) nothing and sets up the gradient
   partitions it steps from;
2. the privacy engine reduces each clipped sum through this module's reducer,
   adds noise once per coordinate, and the reducer hands the result over with
   DeepSpeed's public setters: ``deepspeed.utils.safe_set_full_grad`` (ZeRO-1/2),
   ``safe_set_local_grad`` (ZeRO-3), ``param.grad`` (stage 0, where the
   optimizer is the plain torch one);
3. ``engine.step()``.

Noise once per coordinate, by stage:

- ZeRO-3 (:class:`PartitionedGradReducer`): each rank owns a flat partition of
  every parameter; one reduce-scatter in that layout gives each rank the summed
  partition, which the engine noises from this rank's own stream.
- Stage 0, ZeRO-1, ZeRO-2 (:class:`ReplicatedGradReducer`): DeepSpeed takes each
  gradient whole and keeps its own partition of it (ZeRO-1/2) or all of it
  (stage 0), so every rank must hold the *same* noised gradient: a dim-0
  reduce-scatter, the engine noises this rank's chunk from its own stream, an
  all-gather assembles the identical full gradient on every rank.

Checkpoints: ``engine.save_checkpoint`` into the step folder's ``deepspeed/``
(DeepSpeed writes its ``zero_to_fp32.py`` beside it), plus ``weights.pt``, the
full fp32 weights (tensors only), which ``--init``, probe, caption and export
read without DeepSpeed. DeepSpeed does not fsync its files: each rank flushes the
ones it wrote. On load, DeepSpeed reads its files through its checkpoint engine's
``load``, which unpickles anything (``weights_only=False``); for the duration of
``load_checkpoint`` the engine is wrapped so that every file is read by
``trainer.common.checkpoints.read_deepspeed_file`` (weights only, DeepSpeed's own
classes allowed), after every file was checked the same way on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.common.checkpoints import (
    DEEPSPEED_TAG,
    WEIGHTS,
    check_deepspeed_files,
    fsync_tree,
    read_deepspeed_file,
)
from trainer.common.config import JobConfig, learning_rate
from trainer.common.torch_compat import all_gather, reduce_scatter_sum
from trainer.job.collectives import reduce_scatter_rows
from trainer.job.distributed import Distributed
from trainer.job.geometry import Geometry
from trainer.job.optim import build_optimizer, param_groups

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "Adam")  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
# settings of DeepSpeed's own gradient reduction, which a private step does not use
UNUSED_WITH_DP = ("prescale_gradients", "gradient_predivide_factor", "communication_data_type")
UNUSED_ZERO_WITH_DP = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size")


def _quiet_deepspeed() -> None:
    """What DeepSpeed (and the torch code it calls) prints on every rank that tells a user
    nothing, stopped before deepspeed is imported: on a machine without CUDA its accelerator
    detection warns that it fell back to the CPU (the trainer runs on the CPU exactly when
    torch sees no CUDA device, so it is told so), torch's extension loader warns that there
    is no CUDA runtime, and DeepSpeed's ZeRO code calls two torch collectives that torch
    deprecated (FutureWarning at every call). DeepSpeed's own logger is left as it is."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


_quiet_deepspeed()


@contextmanager
def _prints_to_debug_log():
    """DeepSpeed ``print``s a line per rank when it builds its CPU shared-memory op ("DeepSpeed
    deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"): logged at DEBUG level instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            logger.debug("deepspeed printed: %s", line)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------- the config

def check_config(cfg: JobConfig, geo: Geometry) -> None:
    """Refuse, naming the key, what DeepSpeed rejects or a private step cannot honour;
    warn about the keys that have no effect. No process group needed."""
    ds, name, private = cfg.ds, cfg.ds_config, cfg.privacy.enabled
    if geo.micro_batch * geo.accumulation * geo.world_size != geo.batch_size:
        per_step = geo.micro_batch * geo.world_size
        lower, upper = (geo.batch_size // per_step) * per_step, -(-geo.batch_size // per_step) * per_step
        raise ValueError(
            f"ds_config {name}: backend deepspeed needs train_batch_size = train_micro_batch_size_per_gpu "
            f"x gradient_accumulation_steps x world size, but {geo.batch_size} is not a multiple of "
            f"{geo.micro_batch} x {geo.world_size}; set ds.train_batch_size={lower or upper} or {upper}, or "
            f"change ds.train_micro_batch_size_per_gpu")
    for key in ("amp", "elasticity"):
        if ds.get(key, {}).get("enabled"):
            raise ValueError(f"ds_config {name}: {key}.enabled is not supported (the trainer decides the "
                             f"batch and the precision); remove it")
    if ds.get("managed_gradient_accumulation") is False:
        raise ValueError(f"ds_config {name}: managed_gradient_accumulation=false is not supported (the "
                         f"trainer marks each step's boundary itself); remove it")
    zero = ds.get("zero_optimization", {})
    stage = zero_stage(ds)
    if zero.get("mics_shard_size", -1) > 0 or zero.get("zero_hpz_partition_size", 1) > 1:
        raise ValueError(f"ds_config {name}: zero_optimization.mics_shard_size / zero_hpz_partition_size "
                         f"partition parameters over subgroups, which the private step does not support; "
                         f"remove them")
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        kind = optimizer.get("type")
        params = optimizer.get("params", {})
        if kind not in OPTIMIZERS or params.get("adam_w_mode") is False:
            raise ValueError(f"ds_config {name}: optimizer.type {kind!r} (adam_w_mode "
                             f"{params.get('adam_w_mode', 'default')}) is not supported; use AdamW")
        ours = {"lr": learning_rate(cfg), "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay}
        for key, value in ours.items():
            if key in params and params[key] != value:
                logger.warning("ds_config %s: optimizer.params.%s=%s is replaced by the job's %s (optim.*)",
                               name, key, params[key], value)
    elif (zero.get("offload_optimizer", {}).get("device", "none") != "none"
          and ds.get("zero_force_ds_cpu_optimizer", True)):
        raise ValueError(f"ds_config {name}: zero_optimization.offload_optimizer needs an optimizer section "
                         f'(e.g. "optimizer": {{"type": "AdamW"}}: DeepSpeed then builds its CPU Adam)')
    if "scheduler" in ds:
        logger.warning("ds_config %s: scheduler is ignored; the job's schedule sets the lr "
                       "(optim.warmup_steps, optim.decay_steps, optim.min_lr_ratio)", name)
    if private:
        if ds.get("torch_autocast", {}).get("enabled"):
            raise ValueError(f"ds_config {name}: torch_autocast.enabled is not supported with differential "
                             f"privacy; use bf16.enabled")
        if geo.bf16 and stage == 0:
            raise ValueError(f"ds_config {name}: bf16.enabled at zero_optimization.stage 0 runs DeepSpeed's "
                             f"fp16 optimizer (bf16 gradients, loss-scale machinery), which cannot take the "
                             f"private fp32 gradient; set zero_optimization.stage to 2 or 3 "
                             f"(ds.zero_optimization.stage=2; 1 keeps bf16 gradients)")
        accum = ds.get("data_types", {}).get("grad_accum_dtype")
        if geo.bf16 and stage == 1:
            if accum is not None:
                raise ValueError(f"ds_config {name}: data_types.grad_accum_dtype={accum!r} with ZeRO-1 and bf16: "
                                 f"in fp32 DeepSpeed 0.19.8 runs its BF16_Optimizer, whose safe_set_full_grad "
                                 f"cannot take a whole gradient; remove it, or use stage 2 or 3")
            logger.warning("ds_config %s: ZeRO-1 with bf16 keeps bf16 gradient partitions: the noised "
                           "gradient is rounded to bf16 when handed to DeepSpeed (stages 2 and 3 keep fp32)",
                           name)
        elif geo.bf16 and accum not in (None, "fp32"):
            raise ValueError(f"ds_config {name}: data_types.grad_accum_dtype={accum!r}: the private gradient "
                             f"is handed over in fp32; remove it")
        unused = [k for k in UNUSED_WITH_DP if k in ds] + [f"zero_optimization.{k}" for k in UNUSED_ZERO_WITH_DP
                                                            if zero.get(k)]
        if unused:
            logger.warning("ds_config %s: %s have no effect with differential privacy (the privacy engine "
                           "reduces the clipped gradients itself)", name, ", ".join(unused))
    _deepspeed_accepts(engine_config(cfg, geo), name, geo.world_size)


def cpu_allreduce_buffer(rank: int) -> Path:
    """The POSIX shared-memory file that DeepSpeed's CPU accelerator creates for ``rank``
    when its communication starts (deepspeed/ops/csrc/cpu/comm/shm.cpp, shm_initialize)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")


def _unlink_cpu_allreduce_buffer(rank: int, group) -> None:
    """DeepSpeed maps a 66 MB shared-memory buffer per rank on CPU and never unlinks it:
    every CPU run left 66 MB per rank in /dev/shm, which is RAM, until reboot. Once every
    rank has mapped its peers' buffers (they do so before deepspeed.initialize returns:
    hence the barrier), the names can go; the mappings live on until the processes end."""
    dist.barrier(group)
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def _deepspeed_accepts(config: dict[str, Any], name: str, world_size: int) -> None:
    """DeepSpeed's own config class reads the config as deepspeed.initialize will.

    Before deepspeed.comm starts, DeepSpeedConfig takes the world size to be 1, so
    it checks the batch assertion with the per-rank share of train_batch_size (whole:
    check_config checked the job's world size first)."""
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        seen = comm.get_world_size()
    except Exception:  # not started: DeepSpeedConfig falls back to one rank
        seen = 1
    checked = {**copy.deepcopy(config), "train_batch_size": config["train_batch_size"] // world_size * seen}
    try:
        DeepSpeedConfig(checked)
    except Exception as e:  # assertions, pydantic ValidationErrors, ValueErrors: all name the key
        detail = " ".join(str(e).split())
        raise ValueError(f"ds_config {name}: DeepSpeed refuses it: {type(e).__name__}: {detail[:600]}") from None


def engine_config(cfg: JobConfig, geo: Geometry) -> dict[str, Any]:
    """The config handed to deepspeed.initialize: the job's, with the geometry spelled out
    (DeepSpeed asserts train_batch_size = micro x accumulation x world; the Poisson
    sampler, not DeepSpeed, decides each step's batch), no gradient clipping unless
    asked for, the job's optimizer hyperparameters, and, in a private run under bf16,
    fp32 gradient partitions (ZeRO-2/3)."""
    ds = copy.deepcopy(cfg.ds)
    ds.update(train_batch_size=geo.batch_size, train_micro_batch_size_per_gpu=geo.micro_batch,
              gradient_accumulation_steps=geo.accumulation)
    # DeepSpeed clips the global gradient norm to 1.0 unless told otherwise: that would
    # rescale the noised gradient (and differ from fsdp2); only a non-private run may set it
    ds.setdefault("gradient_clipping", 0.0)
    ds.pop("scheduler", None)
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(
            lr=learning_rate(cfg), betas=list(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    if cfg.privacy.enabled and geo.bf16 and zero_stage(ds) >= 2:  # ZeRO-1: see check_config
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return ds


# --------------------------------------------------------------------------- reducers

class ReplicatedGradReducer:
    """Stage 0, ZeRO-1, ZeRO-2: every rank hands DeepSpeed the same full noised gradient.

    reduce: the cross-rank sum of this rank's dim-0 chunk (the engine noises it from
    this rank's stream); assign: the noised chunks all-gathered into the full
    gradient, identical on every rank, each coordinate noised by exactly one rank.
    """

    def __init__(self, group, world_size: int, noise_stream: int, stage: int):
        self.group = group
        self.world_size = world_size
        self.noise_stream = noise_stream
        self.stage = stage
        self.bytes_sent = 0  # fp32 bytes this rank contributed to collectives; reset per step

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        out = reduce_scatter_rows(summed, self.world_size, self.group)
        self.bytes_sent += out.numel() * self.world_size * 4
        return out

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad

        gathered = grad.new_empty((grad.shape[0] * self.world_size, *grad.shape[1:]))
        all_gather(gathered, grad.contiguous(), group=self.group)
        self.bytes_sent += gathered.numel() * 4
        full = gathered[: param.shape[0]]
        if self.stage == 0:  # the plain torch optimizer steps from param.grad
            param.grad = full.to(param.dtype)
        else:
            safe_set_full_grad(param, full)


class PartitionedGradReducer:
    """ZeRO-3: rank r owns elements [r n, (r + 1) n) of every flattened parameter, padded
    to world x n (n = the size of ``param.ds_tensor``, DeepSpeed's partition).

    reduce: one reduce-scatter in that layout, the summed own partition (the engine
    noises it from this rank's stream); assign: ``safe_set_local_grad``.
    """

    def __init__(self, group, world_size: int, noise_stream: int):
        self.group = group
        self.world_size = world_size
        self.noise_stream = noise_stream
        self.bytes_sent = 0

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        n = param.ds_tensor.numel()
        flat = summed.new_zeros(n * self.world_size)
        flat[: summed.numel()] = summed.flatten()
        out = summed.new_empty(n)
        reduce_scatter_sum(out, flat, group=self.group)
        self.bytes_sent += flat.numel() * 4
        return out

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(param, grad)


# --------------------------------------------------------------------------- the backend

class DeepSpeedBackend:
    name = "deepspeed"
    check_config = staticmethod(check_config)

    @staticmethod
    def describe(cfg: JobConfig) -> str:
        return (f"ZeRO stage {zero_stage(cfg.ds)}, "
                f"optimizer {cfg.ds.get('optimizer', {}).get('type', 'torch AdamW')}")

    def __init__(self, cfg: JobConfig, geo: Geometry, d: Distributed, private: bool):
        self.cfg = cfg
        self.device = d.device
        self.rank = d.rank
        self.world_size = d.world_size
        self.private = private
        self.config = engine_config(cfg, geo)
        self.stage = zero_stage(self.config)
        # DeepSpeed casts the model to bf16 but not its inputs
        self.compute_dtype = torch.bfloat16 if geo.bf16 else torch.float32
        self.group = group = d.mesh.get_group()
        if self.stage == 3:
            self.reducer = PartitionedGradReducer(group, d.world_size, noise_stream=d.rank)
        else:
            self.reducer = ReplicatedGradReducer(group, d.world_size, noise_stream=d.rank, stage=self.stage)
        self.engine = None

    def setup(self, model: nn.Module) -> nn.Module:
        import deepspeed

        with _prints_to_debug_log():
            if "optimizer" in self.config:  # DeepSpeed builds it, over the job's parameter groups
                self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, self.cfg),
                                                       config=self.config)
            else:
                self.engine, *_ = deepspeed.initialize(model=model, config=self.config,
                                                       optimizer=build_optimizer(model, self.cfg, self.device))
        logger.info("DeepSpeed ZeRO stage %d, optimizer %s", self.stage, type(self.engine.optimizer).__name__)
        if self.device.type == "cpu":
            _unlink_cpu_allreduce_buffer(self.rank, self.group)
        # private: the bare module (the engine's forward would scale output gradients by
        # 1 / accumulation steps, and the privacy engine runs its own backward)
        return self.engine.module if self.private else self.engine

    def backward(self, loss: Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages over ranks; the loss is already a mean over the batch
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def check_resume(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"it was written by {world_size} ranks; a DeepSpeed checkpoint resumes on the "
                             f"same number of ranks (backend=fsdp2 reshards)")

    def before_assign(self) -> None:
        self.reducer.bytes_sent = 0
        self.engine.set_gradient_accumulation_boundary(True)
        if self.stage in (1, 2):
            # ZeRO-1/2 allocate their reduction buckets when a first gradient arrives: give
            # them a zero one, of the smallest parameter, so their boundary code runs as usual
            smallest = min((p for p in self.engine.module.parameters() if p.requires_grad), key=Tensor.numel)
            nothing = (smallest * 0).sum()
        else:
            nothing = torch.zeros((), device=self.device, requires_grad=True) * 0
        self.engine.backward(nothing)  # step 1 of the module docstring

    def step(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()

    @contextmanager
    def gathered(self):
        with self._whole(list(self.engine.module.parameters())):
            yield self.engine.module

    def _whole(self, params: list[nn.Parameter]):
        """ZeRO-3 partitions parameters: gather them (read-only) for the block's duration."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    def full_state_dict(self) -> dict[str, Tensor]:
        """fp32 master weights where DeepSpeed keeps them (safe_get_full_fp32_param,
        collective: one parameter at a time), the parameters themselves otherwise (stage 0)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = dict(module.named_parameters())
        out = {}
        for key, value in module.state_dict().items():
            if key in params:
                full = safe_get_full_fp32_param(params[key]) if params[key].requires_grad else None
                if full is None:  # stage 0, or a frozen parameter
                    with self._whole([params[key]]):
                        full = params[key].detach().clone()
                value = full.float()
            if self.rank == 0:  # buffers are never partitioned
                out[key] = value.detach().cpu()
        return out

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)
        weights = self.full_state_dict()
        if self.rank == 0:
            torch.save({"model": weights}, folder / WEIGHTS)
        fsync_tree(folder, partial(_written_by, rank=self.rank))

    def load(self, folder: Path) -> None:
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise ValueError(f"no {DEEPSPEED_TAG}/ folder (not a checkpoint of backend=deepspeed)")
        check_deepspeed_files(folder / DEEPSPEED_TAG)  # every rank refuses a crafted folder, together
        with _weights_only_loads(self.engine):
            path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {folder / DEEPSPEED_TAG}")


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files; the others are rank 0's


def _written_by(path: Path, rank: int) -> bool:
    match = _RANK_FILE.search(path.name)
    return int(match.group(1)) == rank if match else rank == 0


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose ``load`` reads weights only; the rest is the engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return read_deepspeed_file(Path(path), map_location)


@contextmanager
def _weights_only_loads(engine):
    """Every file ``engine.load_checkpoint`` reads goes through its ``checkpoint_engine.load``
    (model states, ZeRO optimizer partitions): weights only while the block runs."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
