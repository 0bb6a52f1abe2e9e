"""The `triton` and `compile` attention backends against the float64 reference.

Triton kernels run through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
q, k, v are always strided views of one (B, T, 3, H, D) tensor, as the model makes them.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastgpt.ops as ops
from fastgpt.errors import FastGPTError
from fastgpt.ops.attention import attention_torch
from fastgpt.ops.attention_triton import _available, attention_triton, dropout_keep_mask
from fastgpt.tools.accuracy import assert_matches_reference, compare

from attention_helpers import check_against_reference, check_all, qkv, run, tiny_gpt_losses

assert _available() is None, _available()   # also defines torch.ops.fastgpt.attention_*

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (B, H, T, D, dtype): every T in {1, 7, 64, 97, 256}, every D in {16, 32, 48, 64, 80, 96, 128},
# every dtype; the large-T cases kept few and narrow.
CASES = [
    (2, 3, 1, 16, F32), (2, 2, 7, 48, F16), (1, 2, 7, 128, BF16), (2, 2, 64, 16, F16),
    (1, 2, 64, 64, BF16), (1, 2, 97, 48, BF16), (1, 2, 97, 128, F32), (1, 3, 97, 64, F16),
    (1, 2, 33, 80, F16), (2, 1, 20, 96, F32), (1, 2, 40, 32, BF16), (1, 1, 256, 64, F16),
    (1, 1, 256, 16, BF16),
]


@pytest.mark.parametrize("B,H,T,D,dtype", CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}" for c in CASES])
def test_forward_backward_match_reference(B, H, T, D, dtype):
    q, k, v = qkv(B, H, T, D, dtype)
    dout = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)   # random and strided
    fast = run(attention_triton, q, k, v, dout)
    assert fast[0].dtype == dtype and all(g.dtype == dtype for g in fast[1])
    check_against_reference(fast, q, k, v, dout, f"triton {dtype}")


def peaked_qkv(B, H, T, D, dtype, seed):
    """q x2, k and v x3: most rows give one key nearly all the probability (1 - P ~ 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, H, D, generator=g) * torch.tensor([2.0, 3.0, 3.0])[:, None, None]
    q, k, v = (t.transpose(1, 2) for t in x.to(dtype).unbind(2))
    return q, k, v, torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_backward_on_peaked_softmax(dtype):
    # dS = P * (dP - delta) cancels on such rows; with delta from the fp16/bf16-rounded output
    # dQ and dK had up to 5x (bf16) and 9x (fp16) plain PyTorch's error; 2 of these 8 cases failed
    for T, D in [(2, 64), (3, 16)]:
        for seed in range(4):
            q, k, v, dout = peaked_qkv(1, 2, T, D, dtype, seed)
            fast = run(attention_triton, q, k, v, dout)
            check_against_reference(fast, q, k, v, dout, f"peaked T={T} D={D} seed={seed}")


def test_forward_keeps_the_fp32_output_for_backward():
    for dtype in (BF16, F16):
        q, k, v = qkv(1, 2, 7, 16, dtype, requires_grad=False)
        out, lse, out32 = torch.ops.fastgpt.attention_fwd(q, k, v, torch.zeros(1, dtype=torch.int64),
                                                          0.25, 0.0)
        assert out32.dtype == F32 and torch.equal(out32.to(dtype), out)   # rounded to nearest
    q, k, v = qkv(1, 2, 7, 16, F32, requires_grad=False)
    assert torch.ops.fastgpt.attention_fwd(q, k, v, torch.zeros(1, dtype=torch.int64), 0.25,
                                           0.0)[2].numel() == 0      # fp32: out is the fp32 copy


def tf32(x):
    """fp32 rounded to the nearest tf32 (10-bit mantissa, ties away from zero)."""
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


class TF32MatMul(torch.autograd.Function):
    """a @ b as a GPU computes it with tf32 allowed (operands rounded, fp32 sums), backward too;
    CPU matmuls ignore torch's tf32 setting."""
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return tf32(a) @ tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return tf32(g) @ tf32(b).mT, tf32(a).mT @ tf32(g)


def attention_tf32(q, k, v):
    """attention_torch's computation with tf32 matmuls: plain PyTorch on a GPU with tf32 on."""
    T = q.shape[-2]
    s = TF32MatMul.apply(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return TF32MatMul.apply(s.softmax(-1), v)


@contextlib.contextmanager
def matmul_precision(precision):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def check_worst_elements(fast, base, ref, label):
    """The accuracy rule's worst-element test alone, for tf32 results. Its scale test's floors
    are fp32's, far below the random scale error of tf32 rounding (~1e-5 here), so a tf32 result
    as accurate as plain PyTorch's tf32 fails it by chance (1 or 2 of 20 seeds per tensor)."""
    for name, f, b, r in zip(("out", "dq", "dk", "dv"), [fast[0], *fast[1]], [base[0], *base[1]],
                             [ref[0], *ref[1]]):
        _, err, plain, floor = compare(f, b, r)[:4]
        assert err <= 2 * plain + floor, f"{label} {name}: {err:.3g} > 2 x {plain:.3g} + {floor:.3g}"


def test_tf32_option_matches_torch_tf32():
    # on a GPU the tensor cores would truncate fp32 operands (up to 9x plain PyTorch's error,
    # biased); the kernels round them to nearest, as torch's tf32 matmuls do
    q, k, v = qkv(1, 2, 97, 64, F32)
    dout = torch.randn(1, 2, 97, 64)
    ieee = run(attention_triton, q, k, v, dout)
    with matmul_precision("high"):
        fast = run(attention_triton, q, k, v, dout)
    ref = run(attention_torch, q, k, v, dout, torch.float64)
    check_worst_elements(fast, run(attention_tf32, q, k, v, dout), ref, "tf32")
    # tf32 was really used: its error is a tf32 rounding's, far above IEEE fp32's
    for f, i, r in zip([fast[0], *fast[1]], [ieee[0], *ieee[1]], [ref[0], *ref[1]]):
        assert compare(f, i, r)[1] > 100 * compare(i, i, r)[1]


def test_scale_argument():
    q, k, v = qkv(1, 2, 19, 32, F32, requires_grad=False)
    out = attention_triton(q, k, v, scale=0.3)
    ref = attention_torch(q.double(), k.double(), v.double(), scale=0.3)
    assert_matches_reference(out, attention_torch(q, k, v, scale=0.3), ref, "scale=0.3")


def masked_reference(mask, p, scale=None):
    """The reference with the kernel's dropout mask applied: softmax, mask, rescale, @ v."""
    def fn(q, k, v):
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        s = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
        probs = s.masked_fill(future, float("-inf")).softmax(-1)
        return (probs * mask.to(probs.dtype) / (1 - p)) @ v
    return fn


@pytest.mark.parametrize("T,D,dtype", [(97, 48, F32), (40, 64, BF16), (7, 16, F16)])
def test_dropout_matches_reference_with_the_same_mask(T, D, dtype):
    B, H, p, seed = 1, 2, 0.3, 1234
    q, k, v = qkv(B, H, T, D, dtype)
    dout = torch.randn(B, H, T, D, dtype=dtype)
    mask = dropout_keep_mask(seed, B, H, T, p)
    keep = mask[..., torch.ones(T, T, dtype=torch.bool).tril()].float().mean().item()
    assert abs(keep - (1 - p)) < 0.1, keep
    fast = run(lambda q, k, v: attention_triton(q, k, v, dropout_p=p, seed=seed), q, k, v, dout)
    base = run(masked_reference(mask, p), q, k, v, dout)
    ref = run(masked_reference(mask, p), q, k, v, dout, torch.float64)
    check_all(fast, base, ref, f"dropout {dtype}")


def test_dropout_same_seed_same_result():
    q, k, v = qkv(1, 2, 33, 32, F32, requires_grad=False)
    a = attention_triton(q, k, v, dropout_p=0.2, seed=7)
    assert torch.equal(a, attention_triton(q, k, v, dropout_p=0.2, seed=7))
    assert not torch.equal(a, attention_triton(q, k, v, dropout_p=0.2, seed=8))
    torch.manual_seed(3)
    b = attention_triton(q, k, v, dropout_p=0.2)       # seed drawn from torch's generator
    torch.manual_seed(3)
    assert torch.equal(b, attention_triton(q, k, v, dropout_p=0.2))


@pytest.mark.parametrize("dtype,dropout_p", [(F32, 0.0), (F32, 0.25), (BF16, 0.0)])
def test_opcheck(dtype, dropout_p):
    q, k, v = qkv(1, 2, 9, 16, dtype)
    seed = torch.tensor([11], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastgpt.attention_fwd.default, (q, k, v, seed, 0.25, dropout_p))
    out, lse, out32 = torch.ops.fastgpt.attention_fwd(q, k, v, seed, 0.25, dropout_p)
    saved = out32 if out32.numel() else out     # what autograd keeps for the backward
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), saved.detach(), lse, seed, 0.25, dropout_p)
    torch.library.opcheck(torch.ops.fastgpt.attention_bwd.default, args)


def test_lse_is_the_log_sum_exp_of_scaled_scores():
    q, k, v = qkv(1, 2, 23, 16, F32, requires_grad=False)
    _, lse, _ = torch.ops.fastgpt.attention_fwd(q, k, v, torch.zeros(1, dtype=torch.int64), 0.25,
                                                0.0)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.25
    s = s.masked_fill(torch.ones(23, 23, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "compile"])
def test_torch_compile_fullgraph(backend):
    q, k, v = qkv(2, 2, 13, 16, F32)
    dout = torch.randn(2, 2, 13, 16)
    compiled = torch.compile(lambda q, k, v: ops.causal_attention(q, k, v, backend=backend),
                             fullgraph=True)
    fast = run(compiled, q, k, v, dout)
    check_against_reference(fast, q, k, v, dout, f"compiled {backend}")


def test_compile_backend_matches_reference():
    q, k, v = qkv(1, 2, 21, 48, F32)
    dout = torch.randn(1, 2, 21, 48)
    fast = run(lambda q, k, v: ops.causal_attention(q, k, v, backend="compile"), q, k, v, dout)
    check_against_reference(fast, q, k, v, dout, "compile")


def test_tiny_gpt_trains_like_sdpa():
    triton_losses = tiny_gpt_losses("triton")
    sdpa_losses = tiny_gpt_losses("sdpa")
    assert triton_losses == pytest.approx(sdpa_losses, rel=1e-4, abs=1e-5)
    assert triton_losses[-1] < triton_losses[0]


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 1, 4, 16, F32, requires_grad=False)
    with pytest.raises(FastGPTError, match="TRITON_INTERPRET"):
        ops.causal_attention(q, k, v, backend="triton")
    with pytest.raises(FastGPTError, match="TRITON_INTERPRET"):
        attention_triton(q, k, v)
    # the automatic choice on CPU is sdpa, quietly
    torch.testing.assert_close(ops.causal_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_unsupported_inputs_say_why():
    q, k, v = qkv(1, 1, 4, 256, F32, requires_grad=False)
    with pytest.raises(FastGPTError, match="head dim 256"):
        ops.causal_attention(q, k, v, backend="triton")
    q, k, v = qkv(1, 1, 4, 16, torch.float64, requires_grad=False)
    with pytest.raises(FastGPTError, match="float64"):
        ops.causal_attention(q, k, v, backend="triton")
