"""The privacy engine's GradReducer for FSDP2-sharded parameters.

The engine accumulates each parameter's clipped per-example gradient sum over
all micro-batches of a logical step in a full-shape fp32 buffer, then calls
``reduce`` once per parameter per step: one reduce-scatter moves the buffer
across ranks, and each rank keeps only its own shard, to which the engine adds
this rank's own noise (so every coordinate is noised exactly once).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


class FSDPGradReducer:
    """reduce: full fp32 sum -> summed dim-0 shard; assign: shard -> DTensor grad."""

    def __init__(self, mesh: DeviceMesh, noise_stream: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world_size = mesh.size()
        self.noise_stream = noise_stream
        self.bytes_sent = 0  # fp32 bytes this rank contributed to reductions; reset per step

    def reduce(self, param: nn.Parameter, summed: Tensor) -> Tensor:
        assert summed.dtype == torch.float32, summed.dtype
        if not isinstance(param, DTensor):
            # A replicated parameter would be noised once per rank (each rank has its own
            # noise stream): every parameter must be sharded by trainer.parallelize.
            if self.world_size > 1:
                raise ValueError(f"parameter of shape {tuple(param.shape)} is not FSDP-sharded; "
                                 "apply trainer.parallelize.parallelize to the whole model")
            return summed
        assert tuple(param.placements) == (Shard(0),), param.placements
        assert tuple(summed.shape) == tuple(param.shape), (summed.shape, param.shape)
        rows = summed.shape[0]
        chunk = -(-rows // self.world_size)  # torch.chunk: ceil, the last shards may be short/empty
        padded = summed.new_zeros((chunk * self.world_size, *summed.shape[1:]))
        padded[:rows] = summed
        out = summed.new_empty((chunk, *summed.shape[1:]))
        dist.reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_sent += padded.numel() * 4
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
