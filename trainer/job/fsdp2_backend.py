"""backend=fsdp2: torch FSDP2, applied from outside, with DCP checkpoints.

``fully_shard`` per block, then the root. Blocks are the elements of every
``nn.ModuleList`` child of the model (DP-Cap: encoder ``blocks`` and
``decoder_blocks``; ViP: ``blocks`` and ``decoder_blocks``), so model files
know nothing of sharding. Parameters are DTensors sharded on dim 0.

Gradients of a private run never go through FSDP's own reduce-scatter: the
privacy engine returns no weight gradients to autograd and reduces its clipped
sums itself through :class:`FSDPGradReducer` (FSDP2 skips parameters without
gradients; checked by tests/test_trainer_distributed.py).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from trainer.common.checkpoints import ModelOptimizerState, load_dcp
from trainer.common.config import JobConfig
from trainer.job.collectives import reduce_scatter_rows
from trainer.job.distributed import Distributed
from trainer.job.geometry import Geometry
from trainer.job.optim import build_optimizer

logger = logging.getLogger(__name__)

# the ds config keys fsdp2 honours; the others are DeepSpeed engine settings
HONOURED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16",
            "fp16", "gradient_clipping"}


def check_config(cfg: JobConfig, geo: Geometry) -> None:
    """fsdp2 takes the batch geometry and bf16 from the ds config; it names what it ignores."""
    ignored = set(cfg.ds) - HONOURED
    if not cfg.privacy.enabled and cfg.ds.get("gradient_clipping"):
        ignored.add("gradient_clipping")
    if ignored:
        logger.warning("ds_config %s: backend fsdp2 ignores %s (DeepSpeed engine settings; "
                       "backend=deepspeed honours them)", cfg.ds_config, ", ".join(sorted(ignored)))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for child in model.children() if isinstance(child, nn.ModuleList)
            for block in child]


def parallelize(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> nn.Module:
    """Shard parameters on dim 0 over the mesh; bf16 compute with fp32 reduction if asked."""
    dtype = torch.bfloat16 if bf16 else None  # None: parameters keep their (fp32) dtype
    # Only the root casts its inputs. FSDP's input cast rebuilds dataclass arguments, so a
    # block would write its KV cache (models' DecodeCache) into a copy and lose it.
    block_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_mp)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype,
                                                                 reduce_dtype=torch.float32))
    return model


class FSDPGradReducer:
    """reduce: full fp32 sum -> summed dim-0 shard; assign: shard -> DTensor grad.

    One reduce-scatter per parameter per step moves the clipped sum across ranks;
    each rank keeps only its own shard, to which the engine adds this rank's own
    noise (so every coordinate is noised exactly once).
    """

    def __init__(self, mesh: DeviceMesh, noise_stream: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.noise_stream = noise_stream
        self.bytes_sent = 0  # fp32 bytes this rank contributed to reductions; reset per step

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        if not isinstance(param, DTensor):
            # A replicated parameter would be noised once per rank (each rank has its own
            # noise stream): every parameter must be sharded by parallelize.
            if self.world_size > 1:
                raise ValueError(f"parameter of shape {tuple(param.shape)} is not FSDP-sharded; "
                                 "apply trainer.job.fsdp2_backend.parallelize to the whole model")
            return summed
        assert tuple(param.placements) == (Shard(0),), param.placements
        assert tuple(summed.shape) == tuple(param.shape), (summed.shape, param.shape)
        out = reduce_scatter_rows(summed, self.world_size, self.group)
        self.bytes_sent += out.numel() * self.world_size * 4
        return out[: param.to_local().shape[0]]

    def assign(self, param: nn.Parameter, grad: Tensor) -> None:
        if isinstance(param, DTensor):
            local = param.to_local()
            assert grad.shape == local.shape, (grad.shape, local.shape)
            param.grad = DTensor.from_local(grad.to(local.dtype).contiguous(), self.mesh, [Shard(0)],
                                            run_check=False, shape=param.shape,
                                            stride=param.stride())
        else:
            param.grad = grad.to(param.dtype)


class FSDP2Backend:
    """FSDP2 on the job's device mesh; torch AdamW; DCP checkpoints (resharded on load)."""

    name = "fsdp2"
    check_config = staticmethod(check_config)

    @staticmethod
    def describe(cfg: JobConfig) -> str:
        return "FSDP2, torch AdamW"

    def __init__(self, cfg: JobConfig, geo: Geometry, d: Distributed, private: bool):
        self.cfg = cfg
        self.device = d.device
        self.mesh = d.mesh
        self.bf16 = geo.bf16
        self.world_size = d.world_size
        # FSDP's root casts floating inputs to bf16 itself
        self.compute_dtype = torch.bfloat16 if geo.bf16 else torch.float32
        self.reducer = FSDPGradReducer(d.mesh, noise_stream=d.rank)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, model: nn.Module) -> nn.Module:
        self.model = parallelize(model, self.mesh, bf16=self.bf16)
        self.optimizer = build_optimizer(self.model, self.cfg, self.device)  # over the sharded parameters
        return self.model

    def backward(self, loss: Tensor, last: bool) -> None:
        # FSDP averages over ranks; its reduce-scatter runs once, on the last micro-batch
        self.model.set_requires_gradient_sync(last)
        (loss * self.world_size).backward()

    def check_resume(self, world_size: int) -> None:
        """DCP reshards: a checkpoint of any number of ranks resumes."""

    def before_assign(self) -> None:
        """FSDP takes DTensor gradients at any time."""
        self.reducer.bytes_sent = 0

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def gathered(self):
        """The root's own parameters gathered (the blocks gather theirs in their forward)."""
        self.model.unshard()
        try:
            yield self.model
        finally:
            self.model.reshard()

    def full_state_dict(self) -> dict[str, Tensor]:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))

    def save(self, folder: Path) -> None:
        dcp.save({"app": ModelOptimizerState(self.model, self.optimizer)}, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        load_dcp({"app": ModelOptimizerState(self.model, self.optimizer)}, folder)
