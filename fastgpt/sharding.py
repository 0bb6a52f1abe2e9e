"""Fully sharded data parallel training (FSDP2: torch.distributed.fsdp.fully_shard).

Under ``--fsdp`` every transformer block, and then the root module (embeddings, final layer
norm, the tied head), becomes one FSDP unit: its fp32 parameters, their gradients and the
optimizer's state for them are split over the ranks (each parameter's rows, dim 0), so each rank
holds about 1/N of them. A unit's forward all-gathers its full parameters just before it runs
(and, with ``reshard_after_forward``, frees them right after, gathering them again for the
backward); its backward reduce-scatters the gradients, averaged over the ranks as DDP does.
The model's ops (fastgpt.ops: the C++ block on CPU, Triton on CUDA) therefore see ordinary,
unsharded tensors in forward and backward.

Mixed precision follows ``--dtype``: the gathered parameters are cast to bf16 or fp16 for
compute, gradients are reduced in fp32 and the sharded masters stay fp32. On CPU in bf16 this
replaces the bf16 working copy of fastgpt.precision (the gathered bf16 parameters are the working
copy), and the optimizer is torch's AdamW over the sharded parameters (DTensors): FlatAdamW keeps
whole parameters in flat buffers of its own, which a shard cannot be moved into.

Gradients are reduce-scattered at every micro-step of gradient accumulation and summed in the
fp32 shards (no unsharded gradients are kept between micro-steps), so memory stays 1/N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastgpt.config import GPTConfig
from fastgpt.model import Block, build_model

OPTIMIZER_NOTE = ("torch.optim.AdamW over the sharded parameters (FSDP; fastgpt's FlatAdamW needs "
                  "whole parameters)")


# torch.distributed's FSDP and checkpoint modules are imported where they are used: importing
# them takes ~1.7 s, which every run paid at start-up before, sharded or not.
if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in ``dtype``, reduce gradients in fp32; the sharded masters stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                reduce_dtype=torch.float32)


def shard(model: torch.nn.Module, device: torch.device, world_size: int, dtype: torch.dtype,
          reshard_after_forward: bool = True) -> int:
    """Shard ``model`` in place over the ``world_size`` ranks of the process group: each Block,
    then the root. Its parameters move to ``device`` (only the local shards stay there).
    Returns the number of FSDP units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision(dtype)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return len(blocks) + 1


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter, or a value computed from them)."""
    return hasattr(t, "full_tensor")


def local_numel(model: torch.nn.Module) -> int:
    """The parameter elements this rank holds (its shards; every element without FSDP)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())


def gathered(model: torch.nn.Module, kind: str, config: GPTConfig, rank: int,
             device: torch.device):
    """An unsharded copy of a sharded model on rank 0 (None on the others), for sampling in
    one process. Every rank calls this: the full weights are gathered to rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if rank != 0:
        return None
    plain = build_model(kind, config)
    plain.load_state_dict(state)
    return plain.to(device)
