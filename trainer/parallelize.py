"""Apply FSDP2 to a model from outside: fully_shard per block, then the root.

Blocks are the elements of every ``nn.ModuleList`` child of the model (DP-Cap:
encoder ``blocks`` and ``decoder_blocks``; ViP: ``blocks`` and
``decoder_blocks``), so model files know nothing of sharding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for child in model.children() if isinstance(child, nn.ModuleList)
            for block in child]


def parallelize(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> nn.Module:
    """Shard parameters on dim 0 over the mesh; bf16 compute with fp32 reduction if asked.

    Gradients never go through FSDP's own reduce-scatter: the privacy engine
    returns no weight gradients to autograd and reduces its clipped sums itself
    (trainer.reducer). FSDP2 skips parameters without gradients (checked by
    tests/test_trainer_distributed.py).
    """
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
