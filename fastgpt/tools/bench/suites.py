"""What `fastgpt bench` measures per op: the cases (providers x modes x shapes) and their callables.

Providers are registry backend names, called directly (``registry.get(op, name).fn``) after the
backend's own ``available``/``supports`` checks, so dispatch costs nothing in the timings.
``triton`` is left out on CPU by default: there it would be the Triton interpreter, a correctness
tool, not a fast path. Work per step, for TFLOP/s and GB/s:

* attention (B, H, T, D): causal FLOPs 2*B*H*T*T*D forward (4*B*H*T*T*D halved by the mask),
  2.5x that backward; baseline ``tril``.
* linear_cross_entropy (N, C, V): 2*N*C*V forward, 2x that backward; cross_entropy (N, V): bytes
  of logits read (forward) and read + gradient written (backward); baseline ``torch``.
  ``F.linear_cross_entropy`` (PyTorch's own, where it exists) runs beside ours.
* embedding (V, N, C): forward reads and writes N rows (+ indices); backward, timed as the
  gradient op alone (aten::embedding_backward vs fastgpt::embedding_backward), reads N gradient
  rows (+ indices) and writes the (V, C) gradient; baseline ``torch``.
* transformer_block (B, T, C, H heads): matmul FLOPs only (LayerNorm, GELU, softmax left out):
  forward 2*N*12*C*C for the four linears (N = B*T) plus causal attention's 2*B*H*T*T*D;
  backward 2x the linears' and 2.5x the attention's; float32 and bfloat16; baseline ``torch``.
  ``--dropout P`` adds dropout at the block's three places (shape key ``p``).

Sizes. ``--quick``: the smallest. The CPU default is sized to finish in a few minutes on 2 cores
(``--full`` is the larger grid); on CUDA the default is the full grid. Sizes given on the command
line (``--T``, ``--N``, ...) replace the grid's. The ``loop`` attention (a Python loop over the
B*T query rows, and a peak-memory profile that records each of its small ops) runs up to
LOOP_ROWS rows by default, LOOP_ROWS_FULL with ``--full``; its other cases are listed as skipped.

Memory. Each suite estimates the bytes a case holds at its peak (``Suite.memory``, on the high
side: inputs and gradients plus the provider's peak, scaled from peaks measured on CPU with
torch 2.13), so that the harness skips a case the device cannot hold instead of swapping.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastgpt.device import cpu_has_native_bf16
from fastgpt.errors import FastGPTError
from fastgpt.ops import BlockWeights, registry
from fastgpt.ops.linear_cross_entropy_chunked import auto_chunk_rows
from fastgpt.tools.bench.harness import MODES, Built, Case, SkipCase


def _default_dtype(args) -> str:
    return args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")


def _grid(args, *, quick: list, cpu: list, cpu_full: list, cuda: list) -> list:
    """One dimension's default sizes: --quick's, else the device's (--full's on the CPU)."""
    if args.quick:
        return quick
    if args.device.startswith("cuda"):
        return cuda
    return cpu_full if args.full else cpu


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


# PyTorch's own fused loss, timed beside ours where the installed torch has it
LCE_EXTRA = ("F.linear_cross_entropy",) if hasattr(F, "linear_cross_entropy") else ()


def _providers(op: str, args, extra: tuple = ()) -> list[str]:
    """The providers of ``op`` to time: those --providers names (check_providers has rejected
    names no suite knows), else every one that runs on the device."""
    names = registry.backend_names(op) + list(extra)
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        return [p for p in wanted if p in names]
    cuda = args.device.startswith("cuda")
    names = [n for n in names if cuda or n != "triton"]
    if getattr(args, "quick", False):
        names = [n for n in names if n != "compile"]   # compile time dominates a quick run
    return names


def _modes(args, default: tuple = MODES) -> list[str]:
    modes = args.modes.split(",") if args.modes else list(default)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise FastGPTError(f"--modes {','.join(bad)}: modes are {', '.join(MODES)}")
    return modes


def _backend(op: str, provider: str, *probe, **kw) -> Callable:
    """The backend's function, or SkipCase saying why it cannot run these inputs here."""
    b = registry.get(op, provider)
    reason = b.cannot_run(*probe, **kw)
    if reason:
        raise SkipCase(reason)
    return b.fn


def _step(forward: Callable, mode: str, grad: torch.Tensor | None, zero: Callable) -> Callable:
    """fwd: the forward; fwd+bwd: forward and backward; bwd: backward of one kept graph."""
    if mode == "fwd":
        return forward
    if mode == "fwd+bwd":
        def run():
            zero()
            forward().backward(grad)
        return run
    out = forward()
    return lambda: out.backward(grad, retain_graph=True)


# --- attention ------------------------------------------------------------------------------

# B*T query rows up to which the `loop` attention runs: its peak-memory profile records every
# small op (measured here: ~0.4 MB per row forward, 3-4 MB per row with backward; 1024 rows took
# 15-40 s to profile and held ~4 GB), and one fwd+bwd call at 1024 rows took 1.7-3.7 s
LOOP_ROWS, LOOP_ROWS_FULL = 256, 1024
LOOP_PROFILE_BYTES = {"fwd": 1 * 2 ** 20, "bwd": 4 * 2 ** 20, "fwd+bwd": 4 * 2 ** 20}   # per row


def _loop_skip(B: int, T: int, full: bool) -> str:
    """Why the `loop` attention is not run on B*T rows ("" if it is)."""
    rows, limit = B * T, LOOP_ROWS_FULL if full else LOOP_ROWS
    if rows <= limit:
        return ""
    where = "--full's" if full else f"the default's; --full runs up to {LOOP_ROWS_FULL}"
    return (f"a Python loop over B*T = {rows} rows, slow and profiled op by op: over {limit} "
            f"({where})")


def attention_cases(args) -> list[Case]:
    cuda = args.device.startswith("cuda")   # the CUDA default is the full grid
    Ts = args.T or _grid(args, quick=[64, 128], cpu=[64, 128, 256], cpu_full=[64, 128, 256],
                         cuda=[64, 256, 1024, 4096])
    Ds = args.D or _grid(args, quick=[64], cpu=[64], cpu_full=[64, 128], cuda=[64, 128])
    B, H = args.B or 4, args.H or 6
    dtype = _default_dtype(args)
    return [Case("attention", "attention", p, mode, dict(B=B, H=H, T=T, D=D), dtype,
                 skip=_loop_skip(B, T, args.full or cuda) if p == "loop" else "")
            for mode in _modes(args) for D in Ds for T in Ts
            for p in _providers("attention", args)]


# (B, H, T, T) score tensors a provider holds at its peak, forward alone and with backward
# (measured at B=2 H=4 T=512 D=64, float32 and bfloat16: tril 2.2 / 3.5, torch 2.4 / 3.5,
# compile 2.1 / 2.5, ext 0 / 1.5, sdpa 0 / 0 (flash-style on CPU); each up to 6 (B, H, T, D) more)
SCORES = {"tril": (2.5, 4.0), "torch": (2.5, 4.0), "compile": (2.5, 4.0), "ext": (0.0, 2.0),
          "sdpa": (0.0, 0.0), "triton": (0.0, 0.0)}


def attention_memory(case: Case) -> float:
    """Bytes an attention case may hold: inputs, gradients and output (8 (B, H, T, D) tensors)
    and the provider's peak above them (6 more and its SCORES, or the loop's profile records)."""
    B, H, T, D = (case.shape[k] for k in "BHTD")
    es = _itemsize(case.dtype)
    base = 14 * B * H * T * D * es
    if case.provider == "loop":
        return base + B * T * LOOP_PROFILE_BYTES[case.mode]
    fwd, train = SCORES.get(case.provider, SCORES["tril"])   # an unknown provider: as tril
    score_es = 4 if case.provider == "ext" else es   # ext keeps fp32 probabilities for backward
    return base + (fwd if case.mode == "fwd" else train) * B * H * T * T * score_es


def attention_build(case: Case, device: str) -> Built:
    B, H, T, D = (case.shape[k] for k in "BHTD")
    dtype = getattr(torch, case.dtype)
    # q, k, v as the model makes them: strided views of one (B, T, 3, H, D) projection
    x = torch.randn(B, T, 3, H, D, dtype=dtype, device=device)
    q, k, v = (t.transpose(1, 2).requires_grad_(case.mode != "fwd") for t in x.unbind(2))
    fn = _backend("attention", case.provider, q, k, v, scale=None, dropout_p=0.0)
    grad = torch.randn(B, H, T, D, dtype=dtype, device=device)

    def zero():
        q.grad = k.grad = v.grad = None

    fwd_flops = 2.0 * B * H * T * T * D
    flops = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[case.mode] * fwd_flops
    return Built(_step(lambda: fn(q, k, v), case.mode, grad, zero), flops=flops)


# --- cross-entropy --------------------------------------------------------------------------

def cross_entropy_cases(args) -> list[Case]:
    # chunked keeps 2**24 logits at a time (333 rows at V=50304): N beyond that shows the saving
    # The CPU default: one N, at the quick width. Each CPU case is a fresh process (~15 s here
    # before its first timed call, more with compile) that makes ~9 calls; at C=768 one fwd+bwd
    # at N=2048 took 17-19 s on the 2-core AVX2 EPYC, and N in {512, 1024} at C=64 took 4.3 min
    # in all. --quick sweeps N in {512, 1024} without compile; --full is the C=768 grid.
    Ns = args.N or _grid(args, quick=[512, 1024], cpu=[1024], cpu_full=[512, 1024, 2048],
                         cuda=[1024, 4096, 8192, 16384])
    Cs = args.C or _grid(args, quick=[64], cpu=[64], cpu_full=[768], cuda=[768])
    Vs = args.V or [50304]
    dtype = _default_dtype(args)
    modes = _modes(args, ("fwd+bwd",))
    lce = _providers("linear_cross_entropy", args, LCE_EXTRA)
    cases = [Case("cross-entropy", "linear_cross_entropy", p, mode, dict(N=N, C=C, V=V), dtype)
             for mode in modes for C, V in itertools.product(Cs, Vs) for N in Ns for p in lce]
    cases += [Case("cross-entropy", "cross_entropy", p, mode, dict(N=N, V=V), dtype)
              for mode in modes for V in Vs for N in Ns
              for p in _providers("cross_entropy", args)]
    return cases


FULL_LOGITS = ("torch", "compile", "F.linear_cross_entropy")


def cross_entropy_memory(case: Case) -> float:
    """Bytes a cross-entropy case may hold: inputs and their gradients + 3 float32 logit tensors
    of the rows a provider handles at once (measured: torch and F.linear_cross_entropy <= 3.0 x
    N*V*4 bytes, compile <= 2.0x, chunked <= 3.0x its 2**24-logit chunks)."""
    N, V = case.shape["N"], case.shape["V"]
    es = _itemsize(case.dtype)
    if case.op == "cross_entropy":
        return 2 * N * V * es + 3 * N * V * 4 + 8 * N
    C = case.shape["C"]
    rows = N if case.provider in FULL_LOGITS else min(N, auto_chunk_rows(V))
    return 2 * (N + V) * C * es + 8 * N + 3 * rows * V * 4


def cross_entropy_build(case: Case, device: str) -> Built:
    dtype = getattr(torch, case.dtype)
    N, V = case.shape["N"], case.shape["V"]
    targets = torch.randint(0, V, (N,), device=device)
    if case.op == "cross_entropy":
        logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=case.mode != "fwd")
        fn = _backend("cross_entropy", case.provider, logits, targets)
        forward = lambda: fn(logits, targets)  # noqa: E731

        def zero():
            logits.grad = None
        nbytes = N * V * logits.element_size()
        moved = {"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes}[case.mode]
        return Built(_step(forward, case.mode, None, zero), bytes=moved)
    C = case.shape["C"]
    hidden = torch.randn(N, C, device=device, dtype=dtype, requires_grad=case.mode != "fwd")
    weight = (torch.randn(V, C, device=device) * 0.02).to(dtype).requires_grad_(case.mode != "fwd")
    if case.provider == "F.linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            raise SkipCase(f"torch {torch.__version__} has no F.linear_cross_entropy")
        fn = lambda h, w, t: F.linear_cross_entropy(h, w, t)  # noqa: E731
    else:
        fn = _backend("linear_cross_entropy", case.provider, hidden, weight, targets)

    def zero():   # as zero_grad(set_to_none=True) does between steps
        hidden.grad = weight.grad = None
    flops = {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}[case.mode] * N * C * V
    return Built(_step(lambda: fn(hidden, weight, targets), case.mode, None, zero), flops=flops)


# --- embedding ------------------------------------------------------------------------------

def embedding_cases(args) -> list[Case]:
    Vs = args.V or [65, 50304]
    Ns = args.N or ([768] if args.quick else [768, 65536])
    Cs = args.C or ([128] if args.quick else [128, 768])
    dtype = args.dtype or "float32"
    return [Case("embedding", "embedding", p, mode, dict(V=V, N=N, C=C), dtype)
            for V in Vs for N in Ns for C in Cs for mode in _modes(args)
            for p in _providers("embedding", args)]


def embedding_memory(case: Case) -> float:
    """Bytes an embedding case may hold: weight, its gradient, output, grad_output, indices."""
    V, N, C = (case.shape[k] for k in "VNC")
    return (2 * V * C + 3 * N * C) * _itemsize(case.dtype) + 8 * N


def embedding_build(case: Case, device: str) -> Built:
    V, N, C = (case.shape[k] for k in "VNC")
    dtype = getattr(torch, case.dtype)
    weight = torch.randn(V, C, device=device).to(dtype).requires_grad_(True)   # as in training
    idx = torch.randint(0, V, (N,), device=device)
    grad = torch.randn(N, C, device=device).to(dtype)
    fn = _backend("embedding", case.provider, idx, weight)
    es, ies = weight.element_size(), idx.element_size()
    fwd_bytes = 2 * N * C * es + N * ies
    bwd_bytes = N * C * es + N * ies + V * C * es
    if case.mode == "bwd":   # the weight-gradient op alone
        if case.provider == "torch":
            op = torch.ops.aten.embedding_backward
            step = lambda: op(grad, idx, V, -1, False, False)  # noqa: E731
        elif case.provider == "ext":   # fn's availability check above loaded fastgpt._C
            op = torch.ops.fastgpt.embedding_backward
            step = lambda: op(grad, idx, V, -1, True)  # noqa: E731   (deterministic)
        else:
            out = fn(idx, weight)
            step = lambda: out.backward(grad, retain_graph=True)  # noqa: E731
        return Built(step, bytes=bwd_bytes)

    def zero():
        weight.grad = None
    moved = fwd_bytes if case.mode == "fwd" else fwd_bytes + bwd_bytes
    return Built(_step(lambda: fn(idx, weight), case.mode, grad, zero), bytes=moved)


# --- transformer block -----------------------------------------------------------------------

# (B, T, C, n_head): the baby preset (nanoGPT's CPU run) and shakespeare-char's block at batch 8
BLOCK_SHAPES = [(12, 64, 128, 4), (8, 256, 384, 6)]


def transformer_block_cases(args) -> list[Case]:
    sweep = bool(args.B or args.T or args.C or args.H)
    if sweep:   # a sweep around the baby block
        shapes = [(args.B or 12, T, C, args.H or 4) for C in (args.C or [128])
                  for T in (args.T or [64])]
    else:
        shapes = BLOCK_SHAPES[:1] if args.quick else BLOCK_SHAPES
    for B, T, C, H in shapes:
        if C % H:
            raise FastGPTError(f"transformer-block: --C {C} is not a multiple of --H {H} "
                               f"(the block's heads)")
    dropout = getattr(args, "dropout", None) or 0.0
    if not 0.0 <= dropout < 1.0:
        raise FastGPTError(f"transformer-block: --dropout must be in [0, 1); got {dropout}")
    # the key only with dropout, so that the cases without keep their names
    p = {"p": dropout} if dropout else {}
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    # a CPU without native bfloat16 emulates it (the larger block's fwd+bwd took ~9x float32's
    # time on the AVX2 EPYC here): its default list has bfloat16 at the baby block only
    emulated = not (args.device.startswith("cuda") or args.full or cpu_has_native_bf16())
    trim = emulated and not (sweep or args.dtype)
    return [Case("transformer-block", "transformer_block", prov, mode,
                 dict(B=B, T=T, C=C, H=H, **p), dt)
            for dt in dtypes for mode in _modes(args) for B, T, C, H in shapes
            if not (trim and dt == "bfloat16" and (B, T, C, H) != shapes[0])
            for prov in _providers("transformer_block", args)]


def transformer_block_memory(case: Case) -> float:
    """Bytes a block case may hold: weights and their gradients (12 C*C each), x, grad and
    output, + its peak (measured at the two BLOCK_SHAPES: <= 30 (B, T, C) + 4 float32 (B, H, T,
    T))."""
    B, T, C, H = (case.shape[k] for k in "BTCH")
    es = _itemsize(case.dtype)
    return (24 * C * C + 35 * B * T * C) * es + 4 * B * H * T * T * 4


def transformer_block_build(case: Case, device: str) -> Built:
    B, T, C, H = (case.shape[k] for k in "BTCH")
    dropout = case.shape.get("p", 0.0)
    dtype = getattr(torch, case.dtype)

    def param(*shape, std=0.02):   # nanoGPT's init; LayerNorm weights are ones
        t = torch.ones(shape) if std is None else torch.randn(shape) * std
        return t.to(device, dtype).requires_grad_(True)
    # x and the weights require grad in every mode, as in training: the forward then saves what
    # the backward needs, which is part of its cost
    x = torch.randn(B, T, C, device=device).to(dtype).requires_grad_(True)
    w = BlockWeights(param(C, std=None), None, param(3 * C, C), None, param(C, C), None,
                     param(C, std=None), None, param(4 * C, C), None, param(C, 4 * C), None)
    fn = _backend("transformer_block", case.provider, x, w, H, dropout_p=dropout)
    grad = torch.randn(B, T, C, device=device).to(dtype)

    def zero():
        x.grad = None
        for t in w:
            if t is not None:
                t.grad = None
    linear = 2.0 * B * T * 12 * C * C          # c_attn 3C*C, c_proj C*C, c_fc + mlp c_proj 8C*C
    attention = 2.0 * B * H * T * T * (C // H)  # 4*B*H*T*T*D halved by the causal mask
    flops = {"fwd": linear + attention, "bwd": 2 * linear + 2.5 * attention,
             "fwd+bwd": 3 * linear + 3.5 * attention}[case.mode]
    return Built(_step(lambda: fn(x, w, H, dropout_p=dropout), case.mode, grad, zero),
                 flops=flops)


# --- registry of suites ---------------------------------------------------------------------

@dataclass(frozen=True)
class Suite:
    cases: Callable        # (args) -> list[Case]
    build: Callable        # (case, device) -> Built
    memory: Callable       # (case) -> bytes it may hold at its peak (an estimate)
    baseline: str          # provider the speedups are relative to
    plot: tuple            # (shape key on x, Row field on y) for --plot
    ops: tuple             # registry ops whose backends are the providers
    extra_providers: tuple = ()
    isolate_on_cpu: bool = False


SUITES = {
    "attention": Suite(attention_cases, attention_build, attention_memory, "tril", ("T", "rate"),
                       ("attention",)),
    "cross-entropy": Suite(cross_entropy_cases, cross_entropy_build, cross_entropy_memory,
                           "torch", ("N", "peak_mb"), ("linear_cross_entropy", "cross_entropy"),
                           LCE_EXTRA, isolate_on_cpu=True),
    "embedding": Suite(embedding_cases, embedding_build, embedding_memory, "torch",
                       ("N", "rate"), ("embedding",)),
    "transformer-block": Suite(transformer_block_cases, transformer_block_build,
                               transformer_block_memory, "torch", ("T", "rate"),
                               ("transformer_block",)),
}


def providers(suite: str) -> list[str]:
    """Every provider a suite knows, runnable here or not."""
    s = SUITES[suite]
    names = [n for op in s.ops for n in registry.backend_names(op)] + list(s.extra_providers)
    return list(dict.fromkeys(names))


def check_providers(wanted: list[str], suites: list[str]) -> None:
    """A --providers name that none of ``suites`` knows (a typo) is an error naming the valid
    ones; a name only some of them know selects it where it exists."""
    known = list(dict.fromkeys(n for s in suites for n in providers(s)))
    bad = [n for n in wanted if n not in known]
    if bad:
        raise FastGPTError(f"--providers {', '.join(repr(n) for n in bad)}: not a provider of "
                           f"{', '.join(suites)}; providers: {', '.join(known)}")


def build(case: Case, device: str) -> Built:
    return SUITES[case.suite].build(case, device)


def memory(case: Case) -> float:
    return SUITES[case.suite].memory(case)
