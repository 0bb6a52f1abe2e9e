"""The `ext` attention backend (csrc/attention_cpu.cpp) against the float64 reference.

q, k, v are strided views of one (B, T, 3, H, D) tensor, as the model makes them; the fused
kernel covers float32/bfloat16 with D <= 128, the batched-matmul path the other cases.
"""

import math

import pytest
import torch

import fastgpt.ops as ops
from fastgpt.errors import FastGPTError
from fastgpt.ops import registry
from fastgpt.ops.attention import attention_torch
from fastgpt.ops.attention_ext import attention_ext
from fastgpt.ops.extension import available
from fastgpt.tools.accuracy import assert_matches_reference

from attention_helpers import check_against_reference, qkv, run, tiny_gpt_losses

# the README install builds fastgpt._C: a missing extension is a failure, not a skip
assert available() is None, available()

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# every T in {1, 4, 7, 16, 17, 33, 64, 97}, D in {5, 16, 24, 32, 48, 64, 128} and the fused
# kernel's four register widths (D up to 16, 32, 64, 128); D = 200 and float16 take the
# batched-matmul path
CASES = [
    (2, 3, 1, 32, F32), (2, 3, 7, 32, BF16), (1, 2, 4, 5, F32), (2, 2, 16, 16, BF16),
    (1, 2, 17, 24, F32), (1, 2, 33, 48, BF16), (3, 4, 64, 32, BF16), (3, 4, 64, 32, F32),
    (1, 1, 97, 64, F32), (1, 2, 40, 128, BF16), (1, 1, 17, 200, F32), (2, 2, 33, 32, F16),
]


@pytest.mark.parametrize("B,H,T,D,dtype", CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}" for c in CASES])
def test_forward_backward_match_reference(B, H, T, D, dtype):
    q, k, v = qkv(B, H, T, D, dtype)
    dout = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)   # random and strided
    fast = run(attention_ext, q, k, v, dout)
    assert fast[0].dtype == dtype and all(g.dtype == dtype for g in fast[1])
    check_against_reference(fast, q, k, v, dout, f"ext {dtype}")


def test_float64_is_the_reference_math():
    q, k, v = qkv(2, 2, 13, 8, F64)
    dout = torch.randn(2, 2, 13, 8, dtype=F64)
    fast, ref = run(attention_ext, q, k, v, dout), run(attention_torch, q, k, v, dout)
    for a, b in zip([fast[0], *fast[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(attention_ext, qkv(1, 2, 5, 3, F64))


def test_contiguous_inputs_and_scale():
    q, k, v = [t.contiguous() for t in qkv(2, 2, 19, 32, F32, requires_grad=False)]
    out = attention_ext(q, k, v, scale=0.3)
    ref = attention_torch(q.double(), k.double(), v.double(), scale=0.3)
    assert_matches_reference(out, attention_torch(q, k, v, scale=0.3), ref, "scale=0.3")


def test_output_merges_heads_without_a_copy():
    q, k, v = qkv(2, 4, 9, 16, BF16, requires_grad=False)
    out = attention_ext(q, k, v)
    assert out.transpose(1, 2).is_contiguous()   # (B, T, H, D) memory: view(B, T, C) is free


def test_no_grad_and_grad_paths_give_the_same_output():
    q, k, v = qkv(2, 3, 21, 32, BF16)
    with torch.no_grad():
        plain = attention_ext(q, k, v)
    assert torch.equal(plain, attention_ext(q, k, v).detach())


def test_every_probability_row_sums_to_one_and_the_future_is_zero():
    q, k, v = qkv(1, 2, 23, 16, F32, requires_grad=False)
    _, probs = torch.ops.fastgpt.causal_attention_train(q, k, v, 0.25)
    assert probs.shape == (2, 23, 32) and probs.dtype == F32
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.25
    s = s.masked_fill(torch.ones(23, 23, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs[..., :23].double(), s.softmax(-1).flatten(0, 1),
                               atol=1e-6, rtol=1e-5)
    assert probs[..., 23:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_opcheck(dtype):
    q, k, v = qkv(1, 2, 9, 16, dtype)
    torch.library.opcheck(torch.ops.fastgpt.causal_attention.default, (q, k, v, 0.25))
    plain = [t.detach() for t in (q, k, v)]   # the train/backward ops run below autograd
    torch.library.opcheck(torch.ops.fastgpt.causal_attention_train.default, (*plain, 0.25))
    out, saved = torch.ops.fastgpt.causal_attention_train(*plain, 0.25)
    args = (torch.randn_like(out), *plain, saved, 0.25)
    torch.library.opcheck(torch.ops.fastgpt.causal_attention_backward.default, args)


def test_torch_compile_fullgraph():
    q, k, v = qkv(2, 2, 13, 16, F32)
    dout = torch.randn(2, 2, 13, 16)
    compiled = torch.compile(lambda q, k, v: ops.causal_attention(q, k, v, backend="ext"),
                             fullgraph=True, backend="aot_eager")
    fast = run(compiled, q, k, v, dout)
    check_against_reference(fast, q, k, v, dout, "compiled ext")


def test_tiny_gpt_trains_like_sdpa():
    ext_losses = tiny_gpt_losses("ext", transformer_block="torch")
    sdpa_losses = tiny_gpt_losses("sdpa", transformer_block="torch")
    assert ext_losses == pytest.approx(sdpa_losses, rel=1e-4, abs=1e-5)
    assert ext_losses[-1] < ext_losses[0]


def test_default_order_on_cpu():
    q, k, v = qkv(1, 2, 8, 16, BF16, requires_grad=False)
    args = {"scale": None, "dropout_p": 0.0}
    assert registry.choose("attention", "cpu", (q, k, v), args, dtype=BF16).name == "ext"
    # float32 too (`fastgpt train --exact` pins SDPA, nanoGPT's attention), and SDPA where the
    # kernel cannot run (dropout)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert registry.choose("attention", "cpu", (q32, k32, v32), args, dtype=F32).name == "ext"
    assert registry.choose("attention", "cpu", (q32, k32, v32), {**args, "dropout_p": 0.1},
                           dtype=F32).name == "sdpa"
    # dropout goes elsewhere quietly, and an explicit request says why it cannot
    assert registry.choose("attention", "cpu", (q, k, v), {**args, "dropout_p": 0.1},
                           dtype=BF16).name != "ext"
    with pytest.raises(FastGPTError, match="no dropout"):
        ops.causal_attention(q, k, v, dropout_p=0.1, backend="ext")


def test_bad_inputs_say_what_is_wrong():
    q, k, v = qkv(1, 2, 8, 16, F32, requires_grad=False)
    op = torch.ops.fastgpt
    with pytest.raises(ValueError, match="one shape"):
        op.causal_attention(q, k[:, :, :4], v, 0.25)
    with pytest.raises(ValueError, match="one floating dtype"):
        op.causal_attention(q, k.double(), v, 0.25)
    with pytest.raises(ValueError, match="4-D"):
        op.causal_attention(q[0], k[0], v[0], 0.25)
    out, saved = op.causal_attention_train(q, k, v, 0.25)
    with pytest.raises(ValueError, match="saved"):
        op.causal_attention_backward(out, q, k, v, saved[:, :4], 0.25)
    with pytest.raises(ValueError, match="grad_out"):
        op.causal_attention_backward(out[:, :1], q, k, v, saved, 0.25)
    assert math.isfinite(out.sum().item())
