"""Embedding lookup: rows of ``weight`` (V, C) picked by integer ``indices`` of any shape."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import registry


def embedding_torch(indices, weight):
    return F.embedding(indices, weight)


registry.register("embedding", "torch", embedding_torch)
registry.set_default_order("embedding", "default", ["torch"])


def embedding(indices: torch.Tensor, weight: torch.Tensor, *, backend: Optional[str] = None,
              preferred: Optional[str] = None) -> torch.Tensor:
    """``weight[indices]`` with a gradient for ``weight``; output shape indices.shape + (C,)."""
    if weight.dim() != 2:
        raise FastGPTError(f"embedding weight must be 2-D (num_embeddings, dim); got shape "
                           f"{tuple(weight.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"embedding indices must be int64 or int32; got {indices.dtype}")
    chosen = registry.choose("embedding", weight.device.type, (indices, weight), {},
                             backend=backend, preferred=preferred)
    return chosen.fn(indices, weight)
