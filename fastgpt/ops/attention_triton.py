"""The ``triton`` and ``compile`` attention backends.

``triton``: fastgpt.kernels.attention (flash-attention-2 forward and backward, in-kernel dropout)
registered as two custom ops, ``fastgpt::attention_fwd(q, k, v, seed, scale, dropout_p) ->
(out, lse, out32)`` and ``fastgpt::attention_bwd(dout, q, k, v, out, lse, seed, scale,
dropout_p) -> (dq, dk, dv)``, tied together with ``register_autograd``. ``out32`` is the output
in fp32 for fp16/bf16 inputs (empty for fp32 ones, whose ``out`` is fp32 already); autograd
saves it for the backward, which needs delta = rowsum(dO * O) from an unrounded O (see the
kernel module's docstring). ``torch.library.triton_op`` lets torch.compile see the kernels
(``fullgraph=True`` traces straight through).

It runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` before the kernels are first used; read at call time). Kernels are
imported on first use, and the ops defined on the first availability check, so importing
fastgpt defines neither.

``compile``: the plain ``torch`` reference wrapped in ``torch.compile`` (compiled once, cached).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from fastgpt.errors import FastGPTError
from fastgpt.ops import registry
from fastgpt.ops._triton import (define_op, interpreting, kernels, loaded_for_gpu, store_dtype,
                                 triton_missing)
from fastgpt.ops.attention import attention_torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS = "attention"   # fastgpt.kernels.attention


def _kernels():
    return kernels(_KERNELS)


@registry.constant_under_compile
def _available() -> Optional[str]:
    """None when triton is installed (and then the ops are defined), else why not."""
    reason = triton_missing()
    if reason is None:
        define_ops()
    return reason


def _supports(q: Tensor, k: Tensor, v: Tensor, scale=None, dropout_p: float = 0.0) -> Optional[str]:
    dev = q.device.type
    if dev == "cpu":
        if not interpreting():
            return ("triton kernels need a CUDA device; on CPU they run only under the Triton "
                    "interpreter (set TRITON_INTERPRET=1 before starting Python)")
        if not torch.compiler.is_compiling() and loaded_for_gpu(_KERNELS, "attn_fwd"):
            return ("TRITON_INTERPRET=1 was set after the triton kernels were loaded; set it "
                    "before starting Python")
    elif dev != "cuda":
        return f"triton runs on cuda (or cpu under TRITON_INTERPRET=1), not {dev}"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32"
    D, T = q.shape[-1], q.shape[-2]
    if not 1 <= D <= 128:
        return f"head dim {D} is not supported; the triton kernel takes head dims up to 128"
    if dropout_p > 0.0 and T > 46340:
        return f"dropout needs T <= 46340 (32-bit dropout counter); got T={T}"
    return None


def _check_runnable(q: Tensor, dropout_p: float) -> None:
    reason = _available() or _supports(q, q, q, dropout_p=dropout_p)
    if reason is not None:
        raise FastGPTError(f"triton attention cannot run these inputs: {reason}")


# --- launchers ---

def _flags(dtype: torch.dtype) -> dict:
    """Constexprs that depend on dtype and environment, not on shape. fp32 dots use tf32 unless
    torch.set_float32_matmul_precision("highest"), as torch's own matmuls do; the kernels round
    their operands to tf32 themselves, so the interpreter computes what a GPU does."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return dict(UPCAST=interpreting() and dtype == torch.bfloat16,
                DOT_PRECISION="tf32" if tf32 else "ieee")


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _launcher(name: str, block_d: int, dtype: torch.dtype):
    """The kernel to launch: autotuned over its GPU configs, or as is under the interpreter."""
    if interpreting():
        return wrap_triton(getattr(_kernels(), name))
    return wrap_triton(_autotuned(name, block_d, _DTYPE_NAMES[dtype]))


@functools.cache
def _autotuned(name: str, block_d: int, dtype: str):
    import triton   # here, not at the top: importing triton costs ~0.5 s a CPU run never needs
    kernels = _kernels()
    fwd, bwd = kernels.launch_configs(block_d, dtype)
    if name == "attn_fwd":
        configs = fwd
    elif name == "attn_bwd_dkdv":
        configs = bwd
    else:  # dq streams key blocks past a query block: the dK/dV shape swapped
        configs = [(bn, bm, w, s) for bm, bn, w, s in bwd]
    # keyed by a power-of-two bucket of T, so a new T within a bucket does not re-tune
    return triton.autotune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
         for bm, bn, w, s in configs],
        key=["T_BUCKET", "DROPOUT"])(getattr(kernels, name))


def _blocks(name: str) -> dict:
    """Explicit block sizes under the interpreter (one config); the autotuner picks on GPU."""
    if not interpreting():
        return {}
    kernels = _kernels()
    bm, bn, _, _ = kernels.INTERPRET_BWD if name == "attn_bwd_dkdv" else kernels.INTERPRET_FWD
    return dict(BLOCK_M=bm, BLOCK_N=bn)


def _empty_bhtd(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """(B, H, T, D) viewed from (B, T, H, D) memory: the model's reshape back is then free."""
    B, H, T, D = like.shape
    return like.new_empty((B, T, H, D), dtype=dtype or like.dtype).transpose(1, 2)


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _bucket(T: int) -> int:
    return 1 << max(T - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _empty_out32(q: Tensor) -> Tensor:
    """The fp32 copy of the output for fp16/bf16 (same strides as out); empty for fp32."""
    if q.dtype == torch.float32:
        return q.new_empty((0,), dtype=torch.float32)
    return _empty_bhtd(q, torch.float32)


def _fwd(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, scale: float,
         dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    out = _empty_bhtd(q, store_dtype(q.dtype))
    out32 = _empty_out32(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    _launcher("attn_fwd", block_d, q.dtype)[lambda meta: (_cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, out, out32, lse, seed,     # out32 is empty (a null pointer) for fp32
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, T, _bucket(T), scale, dropout_p,
        HEAD_DIM=D, BLOCK_D=block_d, DROPOUT=dropout_p > 0.0, STORE_O32=q.dtype != torch.float32,
        **_flags(q.dtype), **_blocks("attn_fwd"))
    return out.to(q.dtype), lse, out32


def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seed: Tensor,
         scale: float, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """``out``: the forward's output, best its fp32 copy (out32), as delta is formed from it."""
    B, H, T, D = q.shape
    block_d = _block_d(D)
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    pre_m = 64
    wrap_triton(_kernels().attn_bwd_preprocess)[(_cdiv(T, pre_m), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, T,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m, DOT_PRECISION=_flags(q.dtype)["DOT_PRECISION"])
    dq, dk, dv = (_empty_bhtd(q, store_dtype(q.dtype)) for _ in range(3))
    common = (H, T, _bucket(T), scale, dropout_p)
    consts = dict(HEAD_DIM=D, BLOCK_D=block_d, DROPOUT=dropout_p > 0.0, **_flags(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    dkdv = _launcher("attn_bwd_dkdv", block_d, q.dtype)
    dkdv[lambda meta: (_cdiv(T, meta["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dk, dv, seed, *strides, *dk.stride(), *common,
        **consts, **_blocks("attn_bwd_dkdv"))
    dq_kernel = _launcher("attn_bwd_dq", block_d, q.dtype)
    dq_kernel[lambda meta: (_cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, seed, *strides, *dq.stride(), *common,
        **consts, **_blocks("attn_bwd_dq"))
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# The public ops (fastgpt.ops._triton.define_op: triton_ops, with opaque twins under the
# interpreter), defined on the first availability check, not at import.

@functools.cache
def define_ops() -> None:
    def _fwd_fake(q, k, v, seed, scale, dropout_p):
        B, H, T, D = q.shape
        return _empty_bhtd(q), q.new_empty((B, H, T), dtype=torch.float32), _empty_out32(q)

    def _bwd_fake(dout, q, k, v, out, lse, seed, scale, dropout_p):
        return _empty_bhtd(q), _empty_bhtd(q), _empty_bhtd(q)

    attention_fwd = define_op("fastgpt::attention_fwd", _fwd, _fwd_fake)
    define_op("fastgpt::attention_bwd", _bwd, _bwd_fake)

    def _setup_context(ctx, inputs, output):
        q, k, v, seed, scale, dropout_p = inputs
        out, lse, out32 = output
        ctx.mark_non_differentiable(lse, out32)
        # fp16/bf16: the backward's delta comes from the fp32 output (out is not kept)
        ctx.save_for_backward(q, k, v, out32 if out32.numel() else out, lse, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p

    def _backward(ctx, dout, dlse, dout32):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastgpt.attention_bwd(dout, q, k, v, out, lse, seed, ctx.scale,
                                                     ctx.dropout_p)
        return dq, dk, dv, None, None, None

    attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _seed_tensor(device: torch.device, dropout_p: float, seed: Optional[int]) -> Tensor:
    if dropout_p == 0.0:
        return torch.zeros(1, dtype=torch.int64, device=device)     # never read by the kernels
    if seed is None:   # drawn from torch's generator, so torch.manual_seed reproduces a run
        return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                     dropout_p: float = 0.0, seed: Optional[int] = None) -> Tensor:
    """Fused causal attention on (B, H, T, D); ``seed`` fixes the dropout mask (tests)."""
    if not torch.compiler.is_compiling():
        _check_runnable(q, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _, _ = torch.ops.fastgpt.attention_fwd(q, k, v,
                                                _seed_tensor(q.device, dropout_p, seed),
                                                scale, float(dropout_p))
    return out


def dropout_keep_mask(seed: int, B: int, H: int, T: int, dropout_p: float,
                      device="cpu") -> Tensor:
    """The (B, H, T, T) bool mask of scores the kernels keep for this seed (for tests)."""
    keep = torch.empty((B, H, T, T), dtype=torch.int8, device=device)
    seed_t = torch.full((1,), seed, dtype=torch.int64, device=device)
    block = 16
    _kernels().dropout_keep_mask[(_cdiv(T, block), B * H)](
        keep, seed_t, T, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


# under the Triton interpreter (a correctness tool: seconds per call) it is no candidate
registry.register("attention", "triton", attention_triton, supports=_supports,
                  available=_available, measured=not interpreting())
registry.register("attention", "compile", registry.compile_backend(attention_torch), measured=False)
