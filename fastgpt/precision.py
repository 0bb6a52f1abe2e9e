"""Mixed precision: dtype names, autocast, the bf16 working copy, the fp16 gradient scaler, and
the optimizer step each mode takes (Stepper).

Every mode keeps fp32 master weights (what the optimizer updates and checkpoints hold).

* float32  - plain fp32;
* bfloat16 - on CUDA, autocast. On CPU, a bf16 working copy of the model runs forward and
             backward (LowPrecisionCopy); fastgpt.optim.FlatAdamW steps the fp32 master weights
             from its gradients and refreshes it in one C++ op (without the extension, its
             gradients are copied to the masters for torch.optim.AdamW and back). CPU
             autocast casts activations around every op and gains little (issue 7's profile:
             ~13% on nanoGPT's model); a model whose weights and activations are bf16
             throughout keeps the matmuls on the CPU's bf16 units without those casts. The loss head still runs in fp32 (fastgpt.model).
* float16  - autocast with a GradScaler; CUDA only.
* auto     - bfloat16 where the hardware multiplies it natively (CUDA with bf16 support, CPUs
             with avx512_bf16 or AMX), else float16 on CUDA and float32 on CPU.

bfloat16 asked for on a CPU without native bf16 is refused (emulated_bf16_refusal): torch
emulates its matmuls there: 75-155x slower than float32 on an AVX2 EPYC, at the baby preset's
shapes and at 1024^3 (0.9-2.1 GFLOP/s against 140-180), which made a bf16 run 21x slower than
float32 with no word why.
FASTGPT_ALLOW_EMULATED_BF16=1 runs it anyway (the bf16 code path's tests do, for correctness).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Optional

import torch

from fastgpt.config import TrainConfig
from fastgpt.device import cpu_has_native_bf16, cpu_model, speed_flags
from fastgpt.errors import FastGPTError
from fastgpt.optim import flat_adamw_or_none, make_optimizer, optimizer_groups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ALLOW_EMULATED_BF16_VAR = "FASTGPT_ALLOW_EMULATED_BF16"


def emulated_bf16_allowed() -> bool:
    """Whether FASTGPT_ALLOW_EMULATED_BF16 is 1 (unset or 0: no; anything else is an error)."""
    value = os.environ.get(ALLOW_EMULATED_BF16_VAR, "")
    if value not in ("", "0", "1"):
        raise FastGPTError(f"{ALLOW_EMULATED_BF16_VAR}={value!r}: expected 1 (train in bfloat16 "
                           f"on a CPU that emulates it) or 0 (unset: refuse)")
    return value == "1"


def emulated_bf16_refusal(name: str, device_type: str) -> Optional[str]:
    """Why dtype ``name`` may not train on ``device_type``: bfloat16 on a CPU without native bf16
    (see the module docstring), unless FASTGPT_ALLOW_EMULATED_BF16=1; None when it may."""
    if (name != "bfloat16" or device_type != "cpu" or cpu_has_native_bf16()
            or emulated_bf16_allowed()):
        return None
    return (f"bfloat16 on this CPU ({cpu_model()}: {speed_flags()}) is emulated: without "
            f"avx512_bf16 or amx_bf16 its bfloat16 matmuls run tens of times slower than "
            f"float32; use --dtype float32 (or auto), or set {ALLOW_EMULATED_BF16_VAR}=1 to run "
            f"emulated bfloat16 anyway")


def resolve_dtype(name: str, device_type: str) -> tuple[str, str]:
    """(dtype name, why): ``auto`` -> the fastest dtype this device trains well in; other names
    pass through as asked for."""
    if name != "auto":
        if name == "bfloat16" and device_type == "cpu" and not cpu_has_native_bf16():
            return name, f"asked for; emulated on this CPU ({ALLOW_EMULATED_BF16_VAR}=1)"
        return name, "asked for"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this GPU has bfloat16"
        return "float16", "auto: this GPU has no bfloat16"
    if cpu_has_native_bf16():
        return "bfloat16", "auto: this CPU has native bfloat16 (avx512_bf16 or amx_bf16)"
    return "float32", "auto: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"


def resolve_dtype_name(name: str, device_type: str) -> str:
    return resolve_dtype(name, device_type)[0]


def parse_dtype(name: str, device_type: str) -> torch.dtype:
    """The torch dtype a run on ``device_type`` trains in; FastGPTError for a name that is not a
    dtype, float16 off CUDA, bfloat16 where the device lacks it or only emulates it."""
    name = resolve_dtype_name(name, device_type)
    if name not in DTYPES:
        raise FastGPTError(f"unknown dtype {name!r}; dtypes are: auto, {', '.join(DTYPES)}")
    if name == "float16" and device_type != "cuda":
        raise FastGPTError(f"--dtype float16 needs a CUDA device (device is {device_type}); "
                           f"use float32 (or auto) on {device_type}")
    if name == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastGPTError("this GPU does not support bfloat16; use --dtype float16 or float32")
    refusal = emulated_bf16_refusal(name, device_type)
    if refusal is not None:
        raise FastGPTError(f"--dtype {refusal}")
    return DTYPES[name]


def uses_working_copy(device_type: str, dtype: torch.dtype) -> bool:
    return device_type == "cpu" and dtype == torch.bfloat16


def autocast(device_type: str, dtype: torch.dtype):
    if dtype == torch.float32 or uses_working_copy(device_type, dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device_type: str, dtype: torch.dtype) -> torch.amp.GradScaler:
    # only float16 needs loss scaling; a disabled scaler is a no-op with a state dict
    return torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))


class LowPrecisionCopy:
    """A low-precision copy of ``master`` that runs forward and backward.

    ``pairs`` lists (master, working) parameters for an optimizer that steps from the working
    gradients (fastgpt.optim.FlatAdamW). For torch.optim: after backward, ``grads_to_master()``
    moves the gradients to the fp32 master parameters (which the optimizer steps); after the
    step, ``refresh()`` copies the master weights back.
    The master gradients are views of one flat fp32 buffer, so the copy is one foreach call and
    ``clip_grad_norm_`` is one norm and one multiply: per-tensor work costs more than the
    arithmetic at the baby preset's size (~30 small tensors).
    Tied weights stay tied: ``deepcopy`` keeps the sharing and ``parameters()`` lists each once.
    """

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype):
        self.model = copy.deepcopy(master).to(dtype)
        self.pairs = list(zip(master.parameters(), self.model.parameters()))

    @functools.cached_property
    def _grad_flat(self) -> torch.Tensor:
        masters = [m for m, _ in self.pairs]
        return torch.zeros(sum(m.numel() for m in masters), dtype=torch.float32,
                           device=masters[0].device if masters else None)

    @functools.cached_property
    def _grad_views(self) -> list[torch.Tensor]:
        masters = [m for m, _ in self.pairs]
        return [g.view_as(m) for g, m in
                zip(self._grad_flat.split([m.numel() for m in masters]), masters)]

    def grads_to_master(self) -> None:
        have = [(view, work.grad) for (_, work), view in zip(self.pairs, self._grad_views)
                if work.grad is not None]
        if len(have) < len(self.pairs):
            self._grad_flat.zero_()   # parameters without a gradient count as 0 in the norm
        if have:
            torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
        for (master, work), view in zip(self.pairs, self._grad_views):
            master.grad = None if work.grad is None else view
            work.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ on the master gradients, without a host sync."""
        total = torch.linalg.vector_norm(self._grad_flat)
        self._grad_flat.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_([w for _, w in self.pairs], [m for m, _ in self.pairs])


class Stepper:
    """The optimizer step of one precision mode, chosen once so a training loop has one step:

    * ``flat``: bf16 on CPU; a bf16 working copy (LowPrecisionCopy) runs forward and backward and
      FlatAdamW clips, steps the fp32 masters and refreshes the copy in one C++ op (no scaler:
      bf16 needs no loss scaling). float32 on CPU takes FlatAdamW too, without a working copy
      (unless ``exact``: nanoGPT's torch.optim.AdamW and clip_grad_norm_, step for step);
    * ``working copy``: the same without the extension; torch.optim.AdamW steps the masters
      after the gradients are copied to them and clipped, then the copy is refreshed;
    * ``scaler``: every other mode; torch.optim.AdamW on the model itself, through a GradScaler
      (which scales only in float16). ``sharded``: the model is FSDP-sharded (fastgpt.sharding),
      which always takes this mode, its parameters and optimizer state being DTensor shards.

    ``model`` is the module to run forward and backward; ``backward(loss)`` then ``step()`` (which
    also zeroes the gradients) make one update. ``state_dict()`` holds the optimizer's and the
    scaler's state under the keys checkpoints keep them under.
    """

    def __init__(self, master: torch.nn.Module, device_type: str, dtype: torch.dtype,
                 t: TrainConfig, sharded: bool = False, exact: bool = False):
        betas = (t.beta1, t.beta2)
        # a sharded model (fastgpt.sharding) computes in ``dtype`` through FSDP's mixed
        # precision, so it needs no working copy: the ``scaler`` mode on DTensor parameters
        self.low = (LowPrecisionCopy(master, dtype)
                    if uses_working_copy(device_type, dtype) and not sharded else None)
        flat_fp32 = (device_type == "cpu" and dtype == torch.float32 and not sharded
                     and not exact)
        self.flat = (flat_adamw_or_none(optimizer_groups(master, t.weight_decay),
                                        None if self.low is None else self.low.pairs,
                                        t.learning_rate, betas, t.grad_clip)
                     if self.low is not None or flat_fp32 else None)
        self.optimizer = self.flat or make_optimizer(master, t.learning_rate, t.weight_decay, betas)
        self.scaler = grad_scaler(device_type, dtype)
        self.master, self.grad_clip = master, t.grad_clip
        self.model = master if self.low is None else self.low.model
        self.grad_norm: Optional[torch.Tensor] = None   # see step()

    @property
    def optimizer_name(self) -> str:
        """Which optimizer steps, for the run's header and run row."""
        if self.flat is not None:
            return ("fastgpt FlatAdamW (fp32 masters, bf16 working copy)" if self.low is not None
                    else "fastgpt FlatAdamW (fp32)")
        kind = "fused" if self.optimizer.defaults.get("fused") else "foreach"
        return f"torch.optim.AdamW ({kind})"

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Clip, step and zero the gradients; the working copy, if any, then holds the masters.
        ``grad_norm`` then holds the gradients' norm before clipping (a tensor: no host sync),
        or None when the step does not clip (grad_clip 0) and so computes none."""
        if self.flat is not None:
            self.flat.step()
            self.grad_norm = self.flat.last_grad_norm if self.grad_clip > 0 else None
        else:
            self.grad_norm = self._torch_step()
        self.optimizer.zero_grad(set_to_none=True)

    def _torch_step(self) -> Optional[torch.Tensor]:
        norm = None
        if self.low is not None:
            self.low.grads_to_master()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            if self.low is not None:
                norm = self.low.clip_grad_norm_(self.grad_clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.master.parameters(), self.grad_clip)
                if hasattr(norm, "full_tensor"):   # sharded parameters: the global norm
                    norm = norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.low is not None:
            self.low.refresh()
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """``state``: a checkpoint, or state_dict()'s; one without a scaler keeps the fresh one."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
