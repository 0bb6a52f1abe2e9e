"""Embedding lookup: rows of ``weight`` (V, C) picked by integer ``indices`` of any shape."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.errors import FastGPTError
from fastgpt.ops import measured, registry


def embedding_torch(indices, weight, padding_idx=None):
    return F.embedding(indices, weight, padding_idx=padding_idx)


registry.register("embedding", "torch", embedding_torch)
registry.set_default_order("embedding", "default", ["torch"])


def _workload_key(indices, weight, *, padding_idx=None):
    *lead, T = indices.shape or (1,)
    (V, C) = weight.shape
    return (("indices", (*lead, measured.bucket(T))), ("V", V), ("C", C), ("padding_idx", padding_idx))


def _workload_inputs(key: dict, make: measured.InputMaker):
    V = key["V"]
    return (make.ints(key["indices"], V), make.floats((V, key["C"]))), {"padding_idx": key["padding_idx"]}


registry.set_workload("embedding", measured.Workload(_workload_key, _workload_inputs))


def embedding(indices: torch.Tensor, weight: torch.Tensor, *, padding_idx: Optional[int] = None,
              backend: Optional[str] = None, preferred: Optional[str] = None) -> torch.Tensor:
    """``weight[indices]`` with a gradient for ``weight``; output shape indices.shape + (C,).

    ``padding_idx`` is nn.Embedding's: that row gets no gradient; negative values count from the
    end (-1 is the last row); None means no padding row.
    """
    if weight.dim() != 2:
        raise FastGPTError(f"embedding weight must be 2-D (num_embeddings, dim); got shape "
                           f"{tuple(weight.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"embedding indices must be int64 or int32; got {indices.dtype}")
    if indices.device != weight.device:
        raise FastGPTError(f"embedding indices are on {indices.device} but weight is on "
                           f"{weight.device}; move them to one device")
    if padding_idx is not None:
        V = weight.shape[0]
        if not -V <= padding_idx < V:
            raise FastGPTError(f"padding_idx must be in [-{V}, {V}) for {V} embeddings; got "
                               f"{padding_idx}")
        padding_idx = padding_idx % V
    kwargs = {"padding_idx": padding_idx}
    chosen = registry.choose("embedding", weight.device.type, (indices, weight), kwargs,
                             backend=backend, preferred=preferred)
    return chosen(indices, weight, **kwargs)
