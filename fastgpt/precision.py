"""Mixed precision: dtype names, autocast contexts and the fp16 gradient scaler.

float32 runs plain; bfloat16 runs under autocast on CPU and CUDA (fp32 master weights);
float16 runs under autocast with a GradScaler and only on CUDA.
"""

from __future__ import annotations

import contextlib

import torch

from fastgpt.errors import FastGPTError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, device_type: str) -> torch.dtype:
    if name not in DTYPES:
        raise FastGPTError(f"unknown dtype {name!r}; dtypes are: {', '.join(DTYPES)}")
    if name == "float16" and device_type != "cuda":
        raise FastGPTError(f"--dtype float16 needs a CUDA device (device is {device_type}); "
                           f"use bfloat16 or float32 on {device_type}")
    if name == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastGPTError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return DTYPES[name]


def autocast(device_type: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, dtype: torch.dtype) -> torch.amp.GradScaler:
    # only float16 needs loss scaling; a disabled scaler is a no-op with a state dict
    return torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
