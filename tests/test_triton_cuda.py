"""The Triton backends on a real GPU: the paths the interpreter cannot take.

Under TRITON_INTERPRET (tests/conftest.py sets it for the whole session) the Triton ops are opaque
custom_op twins, every launch has one config and dots have no tensor cores, so on CPU the
``torch.library.triton_op`` / ``wrap_triton`` tracing, autotuning and tf32 dots never run. Whether
Triton interprets is fixed when the kernels are defined, so these checks run in a child process
started without TRITON_INTERPRET, one per section (attention, cross_entropy); each test below
reports one check of that child. All are skipped without an NVIDIA GPU.

By hand: ``python tests/test_triton_cuda.py attention`` (or ``cross_entropy``) runs a section and
prints one JSON line per check.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import traceback
from unittest import mock

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

import fastgpt.ops as ops
from fastgpt.ops._triton import ENV_VAR, interpreting
from fastgpt.ops.attention import attention_torch
from fastgpt.ops.attention_triton import (_autotuned, _flags, _kernels, attention_triton,
                                          dropout_keep_mask)
from fastgpt.ops.cross_entropy import cross_entropy_torch
from fastgpt.ops.cross_entropy_triton import triton_unavailable
from fastgpt.tools.accuracy import assert_matches_reference, max_abs_error

from attention_helpers import check_against_reference, check_all, run
from test_attention_triton import (check_worst_elements, masked_reference, matmul_precision,
                                   peaked_qkv)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPE_NAMES = {F16: "fp16", BF16: "bf16", F32: "fp32"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "fastgpt-gpu-check "          # how the child's result lines start
CHILD_TIMEOUT_S = 1800

CHECKS: dict[str, dict] = {"attention": {}, "cross_entropy": {}}


def gpu_check(section):
    """Register a function as one check of a section (run in the child, reported by a test)."""
    def register(fn):
        CHECKS[section][fn.__name__] = fn
        return fn
    return register


# --- helpers (child side) ---

def cuda_qkv(B, H, T, D, dtype):
    """q, k, v (B, H, T, D) on the GPU: views of one (B, T, 3, H, D) tensor, as the model's."""
    x = torch.randn(B, T, 3, H, D, device="cuda", dtype=dtype)
    return [t.transpose(1, 2) for t in x.unbind(2)]


def cuda_dout(B, H, T, D, dtype):
    return torch.randn(B, T, H, D, device="cuda", dtype=dtype).transpose(1, 2)   # strided


def run_compiled(runner, fn, *args):
    """(runner(torch.compile(fn, fullgraph=True, dynamic=False), *args), the code Inductor
    wrote for it, forward and backward)."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    result, codes = run_and_get_code(runner, compiled, *args)
    return result, "\n".join(codes)


def assert_traced_into(code, kernels):
    """torch.compile saw the Triton kernels themselves (triton_op), not an opaque op."""
    missing = [k for k in kernels if k not in code]
    assert not missing, f"kernels {missing} are not in Inductor's code; the op stayed opaque"


class RecordCalls(TorchDispatchMode):
    """Records the arguments of each call of one op (to opcheck it with what autograd passes)."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.op:
            self.calls.append((args, kwargs))
        return func(*args, **kwargs)


def backward_args(loss, op):
    """The arguments of the one call of ``op`` that ``loss.backward()`` makes."""
    recorder = RecordCalls(op)
    with recorder:
        loss.backward()
    assert len(recorder.calls) == 1, f"{op} was called {len(recorder.calls)} times"
    # saved inputs arrive as the leaves themselves: the backward op takes no gradient
    return tree_map_only(torch.Tensor, torch.Tensor.detach, recorder.calls[0])


def timing(t):
    """A config's time from Triton's autotuner (a float, or quantiles)."""
    return t[0] if isinstance(t, (list, tuple)) else t


# --- attention ---

ATTENTION_KERNELS = ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")


@gpu_check("attention")
def attention_eager_matches_reference():
    cases = [(2, 3, 1, 16, F32), (2, 2, 7, 48, F16), (1, 2, 97, 128, BF16), (1, 3, 97, 64, F16),
             (1, 2, 33, 80, F16), (2, 1, 20, 96, F32), (1, 2, 40, 32, BF16), (1, 1, 256, 64, F16),
             (1, 2, 256, 128, BF16), (1, 2, 200, 64, F32)]
    for B, H, T, D, dtype in cases:
        q, k, v = cuda_qkv(B, H, T, D, dtype)
        dout = cuda_dout(B, H, T, D, dtype)
        check_against_reference(run(attention_triton, q, k, v, dout), q, k, v, dout,
                                f"eager B{B}H{H}T{T}D{D} {dtype}")
    # peaked softmaxes: delta from the fp32 output (tests/test_attention_triton.py)
    for dtype in (BF16, F16):
        for T, D in [(2, 64), (3, 16)]:
            for seed in range(4):
                q, k, v, dout = (t.cuda() for t in peaked_qkv(1, 2, T, D, dtype, seed))
                check_against_reference(run(attention_triton, q, k, v, dout), q, k, v, dout,
                                        f"peaked T={T} D={D} seed={seed} {dtype}")


@gpu_check("attention")
def attention_compile_fullgraph():
    def attend(q, k, v):
        return ops.causal_attention(q, k, v, backend="triton")
    for B, H, T, D, dtype in [(2, 3, 97, 64, F16), (1, 2, 64, 128, BF16), (2, 2, 33, 48, F32)]:
        q, k, v = cuda_qkv(B, H, T, D, dtype)
        dout = cuda_dout(B, H, T, D, dtype)
        fast, code = run_compiled(run, attend, q, k, v, dout)
        check_against_reference(fast, q, k, v, dout, f"compiled T{T}D{D} {dtype}")
        assert_traced_into(code, ATTENTION_KERNELS)
    # dropout: the compiled kernels draw the mask dropout_keep_mask shows
    p, seed, T, D = 0.3, 1234, 97, 64
    q, k, v = cuda_qkv(1, 2, T, D, BF16)
    dout = cuda_dout(1, 2, T, D, BF16)
    fast, code = run_compiled(run, lambda q, k, v: attention_triton(q, k, v, dropout_p=p,
                                                                    seed=seed), q, k, v, dout)
    mask = dropout_keep_mask(seed, 1, 2, T, p, device="cuda")
    check_all(fast, run(masked_reference(mask, p), q, k, v, dout),
              run(masked_reference(mask, p), q, k, v, dout, torch.float64), "compiled dropout")
    assert_traced_into(code, ATTENTION_KERNELS)


@gpu_check("attention")
def attention_compile_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: ops.causal_attention(q, k, v, backend="triton"),
                             fullgraph=True, dynamic=True)
    for T in (97, 50, 130):
        q, k, v = cuda_qkv(2, 2, T, 64, F16)
        dout = cuda_dout(2, 2, T, 64, F16)
        check_against_reference(run(compiled, q, k, v, dout), q, k, v, dout, f"dynamic T={T}")


@gpu_check("attention")
def attention_opcheck():
    fwd, bwd = torch.ops.fastgpt.attention_fwd.default, torch.ops.fastgpt.attention_bwd.default
    for dtype, p in [(F32, 0.0), (F32, 0.25), (BF16, 0.0), (F16, 0.2)]:
        q, k, v = (t.requires_grad_() for t in cuda_qkv(1, 2, 37, 64, dtype))
        seed = torch.tensor([11], dtype=torch.int64, device="cuda")
        torch.library.opcheck(fwd, (q, k, v, seed, 0.125, p))
        out = fwd(q, k, v, seed, 0.125, p)[0]
        args, kwargs = backward_args((out.float() * torch.randn_like(out.float())).sum(), bwd)
        torch.library.opcheck(bwd, args, kwargs)


@gpu_check("attention")
def attention_autotune():
    # fresh autotuners: every shipped config of the head dim is timed, the best one launched
    for D, dtype in [(64, F16), (128, BF16)]:
        _autotuned.cache_clear()
        q, k, v = cuda_qkv(1, 2, 300, D, dtype)
        dout = cuda_dout(1, 2, 300, D, dtype)
        check_against_reference(run(attention_triton, q, k, v, dout), q, k, v, dout,
                                f"autotuned D{D} {dtype}")
        for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
            tuner = _autotuned(name, D, DTYPE_NAMES[dtype])     # the instance that launched
            assert len(tuner.configs) > 1, (name, tuner.configs)
            assert len(tuner.cache) == 1, (name, tuner.cache)    # tuned once, for this T bucket
            times = {str(c): timing(t) for c, t in tuner.configs_timings.items()}
            assert len(times) == len(tuner.configs), (name, times)
            assert all(math.isfinite(t) for t in times.values()), (name, times)  # none failed
    _autotuned.cache_clear()


@gpu_check("attention")
def attention_every_shipped_config():
    # the autotuner launches only the winner: run each config pair on its own
    kernels = _kernels()
    for D, dtype in [(16, BF16), (24, F16), (48, F16), (96, BF16), (64, F32)]:
        block_d = max(16, 1 << (D - 1).bit_length())
        fwd, bwd = kernels.launch_configs(block_d, DTYPE_NAMES[dtype])
        for i in range(max(len(fwd), len(bwd))):
            one = ([fwd[min(i, len(fwd) - 1)]], [bwd[min(i, len(bwd) - 1)]])
            _autotuned.cache_clear()
            with mock.patch.object(kernels, "launch_configs", lambda *_: one):
                q, k, v = cuda_qkv(1, 2, 150, D, dtype)
                dout = cuda_dout(1, 2, 150, D, dtype)
                check_against_reference(run(attention_triton, q, k, v, dout), q, k, v, dout,
                                        f"D{D} {dtype} configs {one}")
    _autotuned.cache_clear()


@gpu_check("attention")
def attention_tf32():
    q, k, v = cuda_qkv(1, 2, 200, 64, F32)
    dout = cuda_dout(1, 2, 200, 64, F32)
    ref = run(attention_torch, q, k, v, dout, torch.float64)
    with matmul_precision("highest"):
        ieee = run(attention_triton, q, k, v, dout)
        plain_ieee = run(attention_torch, q, k, v, dout)
    with matmul_precision("high"):
        assert _flags(F32)["DOT_PRECISION"] == "tf32"
        fast = run(attention_triton, q, k, v, dout)
        plain = run(attention_torch, q, k, v, dout)          # cuBLAS with tf32
    assert max_abs_error(plain[0], ref[0]) > 100 * max_abs_error(plain_ieee[0], ref[0]), \
        "plain PyTorch did not use tf32 under set_float32_matmul_precision('high')"
    check_worst_elements(fast, plain, ref, "tf32")
    for f, i, r in zip([fast[0], *fast[1]], [ieee[0], *ieee[1]], [ref[0], *ref[1]]):
        assert max_abs_error(f, r) > 100 * max_abs_error(i, r), "the kernels did not use tf32"


@gpu_check("attention")
def attention_dropout_matches_reference_with_the_same_mask():
    p, seed = 0.3, 1234
    for T, D, dtype in [(97, 48, F32), (200, 64, BF16), (7, 16, F16)]:
        q, k, v = cuda_qkv(1, 2, T, D, dtype)
        dout = cuda_dout(1, 2, T, D, dtype)
        mask = dropout_keep_mask(seed, 1, 2, T, p, device="cuda")
        causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
        assert abs(mask[..., causal].float().mean().item() - (1 - p)) < 0.1
        fast = run(lambda q, k, v: attention_triton(q, k, v, dropout_p=p, seed=seed),
                   q, k, v, dout)
        check_all(fast, run(masked_reference(mask, p), q, k, v, dout),
                  run(masked_reference(mask, p), q, k, v, dout, torch.float64),
                  f"dropout T{T} {dtype}")


# --- cross-entropy ---

CE_KERNELS = ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel")
CE_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)


def ce_inputs(N, V, dtype):
    logits = (torch.randn(N, V, device="cuda", dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[1] = -100                                  # an ignored row
    return logits, targets


def ce_run(fn, logits, targets, g):
    """(loss, dlogits) of fn with a random upstream gradient g."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets)
    (grad,) = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), x)
    return loss.detach(), grad


def ce_check(fast, logits, targets, g, reduction, options, label):
    def plain(x, t):
        return cross_entropy_torch(x, t, reduction=reduction, **options)
    base = ce_run(plain, logits, targets, g)
    ref = ce_run(plain, logits.double(), targets, g)
    assert_matches_reference(fast[0], base[0], ref[0], f"{label} loss")
    assert_matches_reference(fast[1], base[1], ref[1], f"{label} grad")


def ce_cases():
    """(dtype, V, reduction, options, logits, targets, g) of every cross-entropy case."""
    for dtype in (F32, BF16, F16):
        for N, V in [(33, 65), (5, 50257)]:
            for reduction, options in [("mean", CE_OPTIONS), ("none", {})]:
                logits, targets = ce_inputs(N, V, dtype)
                g = torch.randn(N if reduction == "none" else (), device="cuda")  # losses' dtype
                yield dtype, V, reduction, options, logits, targets, g


@gpu_check("cross_entropy")
def cross_entropy_eager_matches_reference():
    assert triton_unavailable() is None
    for dtype, V, reduction, options, logits, targets, g in ce_cases():
        fast = ce_run(lambda x, t: ops.cross_entropy(x, t, backend="triton", reduction=reduction,
                                                     **options), logits, targets, g)
        ce_check(fast, logits, targets, g, reduction, options, f"eager {dtype} V={V} {reduction}")


@gpu_check("cross_entropy")
def cross_entropy_compile_fullgraph():
    assert triton_unavailable() is None
    for dtype, V, reduction, options, logits, targets, g in ce_cases():
        def loss(x, t):
            return ops.cross_entropy(x, t, backend="triton", reduction=reduction, **options)
        fast, code = run_compiled(ce_run, loss, logits, targets, g)
        ce_check(fast, logits, targets, g, reduction, options,
                 f"compiled {dtype} V={V} {reduction}")
        assert_traced_into(code, CE_KERNELS)


@gpu_check("cross_entropy")
def cross_entropy_opcheck():
    assert triton_unavailable() is None
    fwd = torch.ops.fastgpt.cross_entropy_fwd.default
    bwd = torch.ops.fastgpt.cross_entropy_bwd.default
    for dtype in (F32, BF16):
        for smoothing, softcap in [(0.0, 0.0), (0.1, 8.0)]:
            logits, targets = ce_inputs(9, 65, dtype)
            logits.requires_grad_()
            torch.library.opcheck(fwd, (logits, targets, -100, smoothing, softcap))
            loss = ops.cross_entropy(logits, targets, backend="triton", label_smoothing=smoothing,
                                     z_loss=1e-2, softcap=softcap or None)
            args, kwargs = backward_args(loss, bwd)
            torch.library.opcheck(bwd, args, kwargs)


# --- the child ---

def main(section: str) -> int:
    if interpreting() or not torch.cuda.is_available():
        print(f"needs an NVIDIA GPU and {ENV_VAR} unset", file=sys.stderr)
        return 2
    for name, check in CHECKS[section].items():
        torch.manual_seed(0)
        try:
            check()
            result = {"check": name, "ok": True}
        except Exception:
            result = {"check": name, "ok": False, "error": traceback.format_exc()}
        print(RESULT + json.dumps(result), flush=True)
    return 0


# --- the tests (parent side) ---

@functools.cache
def section_results(section: str) -> tuple[dict, str]:
    """Run one section in a child without TRITON_INTERPRET: (results by check, log tail)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), section], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return {}, f"the {section} child timed out after {e.timeout} s"
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT):
            r = json.loads(line[len(RESULT):])
            results[r["check"]] = r
    return results, f"exit code {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def assert_passed(section: str, name: str) -> None:
    results, log = section_results(section)
    if name not in results:
        pytest.fail(f"the {section} child reported nothing for {name}:\n{log}")
    if not results[name]["ok"]:
        pytest.fail(f"{name} failed on the GPU:\n{results[name]['error']}")


@pytest.mark.parametrize("name", list(CHECKS["attention"]))
def test_attention_on_gpu(name):
    assert_passed("attention", name)


@pytest.mark.parametrize("name", list(CHECKS["cross_entropy"]))
def test_cross_entropy_on_gpu(name):
    assert_passed("cross_entropy", name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
