"""fastgpt.ops.transformer_block: the C++ block (``ext``) against the float64 reference.

Forward and every gradient must meet the accuracy rule (fastgpt.tools.accuracy) against the
``torch`` backend in float64, in float32 and bfloat16, with and without biases, at odd lengths
and with a non-contiguous input; the three custom ops pass opcheck; the op traces under
torch.compile(fullgraph=True); dispatch sends user-named attention backends to ``torch`` (dropout
stays on ``ext``: tests/test_block_dropout.py); bad input gets a clear error. Incremental decoding (transformer_block_decode, the KV
cache's path) gives the full block's rows and keys/values, and only ``torch`` runs it.
"""


import pytest
import torch

from fastgpt import ops
from fastgpt.config import GPTConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.ops import registry, transformer_block_ext
from fastgpt.ops.transformer_block import (BlockWeights, decode_unsupported,
                                           transformer_block_decode, transformer_block_torch)
from fastgpt.tools.accuracy import assert_matches_reference

# the README install builds fastgpt._C: a missing extension is a failure, not a skip
assert transformer_block_ext.available() is None, transformer_block_ext.available()


def _weights(C, bias, gen, F=None):
    """Float64 weights at a GPT-like scale (LayerNorm weights near 1, linears ~ 1/sqrt(in))."""
    F = 4 * C if F is None else F

    def lin(o, i):
        return torch.randn(o, i, generator=gen, dtype=torch.float64) * i ** -0.5

    def vec(n, centre=0.0):
        return centre + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)

    b = (lambda n: vec(n)) if bias else (lambda n: None)
    return BlockWeights(vec(C, 1.0), b(C), lin(3 * C, C), b(3 * C), lin(C, C), b(C),
                        vec(C, 1.0), b(C), lin(F, C), b(F), lin(C, F), b(C))


def _map(fn, w):
    """BlockWeights with fn applied to every weight that is not None."""
    return BlockWeights(*(None if t is None else fn(t) for t in w))


def _leaves(x, w):
    return [x] + [t for t in w if t is not None]


def _run(fn, x, w, n_head, grad_out):
    """Output and the gradients of x and every weight, for inputs cast to x's dtype."""
    x = x.detach().requires_grad_(True)
    w = _map(lambda t: t.detach().to(x.dtype).requires_grad_(True), w)
    out = fn(x, w, n_head)
    grads = torch.autograd.grad(out, _leaves(x, w), grad_out.to(out.dtype))
    return out, grads


def assert_block_matches(w, fast, fast_grads, plain, plain_grads, ref, ref_grads):
    """The accuracy rule for a block's output and the gradients of x and each weight present."""
    assert_matches_reference(fast, plain, ref, "output")
    names = ["x"] + [n for n, t in zip(BlockWeights._fields, w) if t is not None]
    for name, f, p, r in zip(names, fast_grads, plain_grads, ref_grads):
        assert_matches_reference(f, p, r, f"grad of {name}")


def _ext(x, w, n_head):
    return ops.transformer_block(x, w, n_head, backend="ext")


def _torch(x, w, n_head):
    return ops.transformer_block(x, w, n_head, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# C = 24 and 40 leave a LayerNorm row tail past the 16-lane vectors; 3 * 33 rows and 97 rows
# end mid-way through the LayerNorm backward's 64-row blocks
@pytest.mark.parametrize("B,T,C,H,bias", [(2, 7, 48, 3, False), (1, 1, 32, 2, True),
                                          (1, 97, 64, 4, False), (3, 33, 16, 1, True),
                                          (2, 50, 24, 2, True), (1, 70, 40, 5, False)])
def test_matches_float64_reference(dtype, B, T, C, H, bias):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    w = _weights(C, bias, gen)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    # every run sees the same dtype-rounded inputs
    x_low, w_low = x.to(dtype), _map(lambda t: t.to(dtype), w)
    ref, ref_grads = _run(_torch, x_low.double(), _map(torch.Tensor.double, w_low), H,
                          grad_out.to(dtype).double())
    plain, plain_grads = _run(_torch, x_low, w_low, H, grad_out)
    fast, fast_grads = _run(_ext, x_low, w_low, H, grad_out)
    assert fast.dtype == dtype and fast.shape == (B, T, C)
    assert_block_matches(w, fast, fast_grads, plain, plain_grads, ref, ref_grads)


def test_float64_matches_reference_closely_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(0)
    w = _weights(24, True, gen)
    wide = torch.randn(2, 11, 30, generator=gen, dtype=torch.float64)
    x = wide[:, :, 3:27]                                   # a strided view
    grad_out = torch.randn(2, 11, 24, generator=gen, dtype=torch.float64)
    out, grads = _run(_ext, x, w, 3, grad_out)
    ref, ref_grads = _run(_torch, x.contiguous(), w, 3, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    w = _map(lambda t: t.requires_grad_(True), _weights(8, True, gen))
    x = torch.randn(1, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, *flat):
        return ops.transformer_block(x, BlockWeights(*flat), 2, backend="ext")
    assert torch.autograd.gradcheck(f, (x, *w))


def test_no_grad_and_inference_mode_give_the_training_forward():
    gen = torch.Generator().manual_seed(2)
    w = _map(lambda t: t.float().requires_grad_(True), _weights(32, False, gen))
    x = torch.randn(2, 9, 32, generator=gen)
    with_grad = _ext(x, w, 4)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = _ext(x, w, 4)
    with torch.inference_mode():
        inference = _ext(x, w, 4)
    assert not no_grad.requires_grad
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, inference)


def _op_args(dtype, bias):
    gen = torch.Generator().manual_seed(3)
    w = _weights(16, bias, gen)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    return x.to(dtype), [None if t is None else t.to(dtype) for t in w]


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias):
    x, w = _op_args(torch.float32, bias)
    x.requires_grad_(True)
    w = [None if t is None else t.requires_grad_(True) for t in w]
    torch.library.opcheck(torch.ops.fastgpt.transformer_block.default, (x, *w, 2))
    plain = [x.detach()] + [None if t is None else t.detach() for t in w] + [2]
    torch.library.opcheck(torch.ops.fastgpt.transformer_block_train.default, tuple(plain))
    _, saved = torch.ops.fastgpt.transformer_block_train(*plain)
    torch.library.opcheck(torch.ops.fastgpt.transformer_block_backward.default,
                          (torch.randn_like(x.detach()), saved, *plain))


def _compiled_matches_eager(block, seed):
    """``block(x, w, 4)`` under torch.compile(fullgraph=True) gives eager's output and gradients;
    returns the (x, w) it ran on."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    w = _map(lambda t: t.float().requires_grad_(True), _weights(32, True, gen))
    x = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 9, 32, generator=gen)
    compiled = torch.compile(lambda x, w: block(x, w, 4), fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    grads = torch.autograd.grad(out, _leaves(x, w), grad_out)
    ref = block(x, w, 4)
    ref_grads = torch.autograd.grad(ref, _leaves(x, w), grad_out)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    return x, w


def test_compiles_with_fullgraph_forward_and_backward():
    _compiled_matches_eager(_ext, seed=4)


def test_gpt_loss_and_grads_match_between_backends():
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    idx, tgt = torch.randint(0, 11, (3, 16)), torch.randint(0, 11, (3, 16))
    results = []
    for backend in ("torch", "ext"):
        torch.manual_seed(5)
        model = GPT(GPTConfig(**{**cfg.__dict__, "transformer_block": backend})).double()
        _, loss = model(idx, tgt)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------- dispatch

def _f32(C=16, bias=False):
    gen = torch.Generator().manual_seed(6)
    w = _map(torch.Tensor.float, _weights(C, bias, gen))
    return torch.randn(2, 5, C, generator=gen), w


def test_default_is_ext_on_cpu_in_every_dtype():
    x, w = _f32()
    xb, wb = x.bfloat16(), _map(torch.Tensor.bfloat16, w)
    assert registry.choose("transformer_block", "cpu", (xb, wb, 2), {"dropout_p": 0.0},
                           dtype=torch.bfloat16).name == "ext"
    # float32 too: `fastgpt train --exact` pins the torch block, nanoGPT's math
    assert registry.choose("transformer_block", "cpu", (x, w, 2), {"dropout_p": 0.0},
                           dtype=torch.float32).name == "ext"


def test_named_attention_backends_go_to_torch_and_dropout_stays_on_ext():
    x, w = _f32()
    xb, wb = x.bfloat16(), _map(torch.Tensor.bfloat16, w)

    def auto(**kwargs):
        return registry.choose("transformer_block", "cpu", (xb, wb, 2),
                               {"dropout_p": 0.0, "attention": None, **kwargs},
                               dtype=torch.bfloat16).name
    assert auto(dropout_p=0.1) == "ext"
    assert auto(attention="sdpa") == "torch"
    assert auto(attention="torch") == "torch"
    assert auto(attention="ext") == "ext"    # the kernel the C++ block runs
    with ops.use_backends(attention="tril"):
        assert auto() == "torch"


def test_torch_backend_with_dropout_is_random_and_without_is_not():
    x, w = _f32()
    torch.manual_seed(0)
    a = ops.transformer_block(x, w, 2, dropout_p=0.5, backend="torch")
    b = ops.transformer_block(x, w, 2, dropout_p=0.5, backend="torch")
    assert not torch.equal(a, b)
    assert torch.equal(transformer_block_torch(x, w, 2), transformer_block_torch(x, w, 2))


def test_bad_inputs_raise_clear_errors():
    x, w = _f32()
    with pytest.raises(FastGPTError, match=r"shape \(B, T, C\).*got shape \(10, 16\)"):
        ops.transformer_block(x.view(10, 16), w, 2)
    with pytest.raises(FastGPTError, match="divide the channel count 16; got 3"):
        ops.transformer_block(x, w, 3)
    with pytest.raises(FastGPTError, match=r"c_attn_weight must have shape \(48, 16\)"):
        ops.transformer_block(x, w._replace(c_attn_weight=w.c_attn_weight[:30]), 2)
    with pytest.raises(FastGPTError, match=r"dropout_p must be in \[0, 1\); got 1.5"):
        ops.transformer_block(x, w, 2, dropout_p=1.5)
    # the C++ op checks every weight itself
    with pytest.raises(ValueError, match=r"c_fc_bias must have shape \[64\].*got \[63\]"):
        torch.ops.fastgpt.transformer_block(x, *w._replace(c_fc_bias=torch.zeros(63)), 2)
    with pytest.raises(ValueError, match="ln_2_weight must have x's dtype Float; got Double"):
        torch.ops.fastgpt.transformer_block(x, *w._replace(ln_2_weight=w.ln_2_weight.double()), 2)
    with pytest.raises(FastGPTError, match="ln_2_weight is torch.float64"):
        ops.transformer_block(x, w._replace(ln_2_weight=w.ln_2_weight.double()), 2, backend="ext")


# ----------------------------------------------------------------------- incremental decoding

def _keys_values(x, w, n_head):
    """The block's keys and values of every position of x, written out: (B, nh, T, hs) each."""
    B, T, C = x.shape
    h = torch.nn.functional.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias)
    qkv = torch.nn.functional.linear(h, w.c_attn_weight, w.c_attn_bias)
    _, k, v = qkv.view(B, T, 3, n_head, C // n_head).unbind(2)
    return k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("bias", [True, False])
def test_decoding_gives_the_full_blocks_rows(bias):
    # float64: the decoded rows equal the full block's up to rounding, whichever way the
    # sequence arrives (a prompt, one position at a time, several after a past)
    gen = torch.Generator().manual_seed(7)
    w = _weights(48, bias, gen)
    x = torch.randn(2, 13, 48, generator=gen, dtype=torch.float64)
    full = ops.transformer_block(x, w, 3)
    k_full, v_full = _keys_values(x, w, 3)
    out, past = transformer_block_decode(x[:, :5], w, 3)                     # the prompt
    torch.testing.assert_close(out, full[:, :5], rtol=1e-12, atol=1e-12)
    for t in range(5, 9):                                                     # one at a time
        out, past = transformer_block_decode(x[:, t:t + 1], w, 3, past=past)
        torch.testing.assert_close(out, full[:, t:t + 1], rtol=1e-12, atol=1e-12)
    out, past = transformer_block_decode(x[:, 9:12], w, 3, past=past)        # several rows
    torch.testing.assert_close(out, full[:, 9:12], rtol=1e-12, atol=1e-12)
    out, past = transformer_block_decode(x[:, 12:], w, 3, past=past, last_only=True)
    torch.testing.assert_close(out, full[:, 12:], rtol=1e-12, atol=1e-12)
    for got, want in zip(past, (k_full, v_full)):
        assert got.shape == (2, 3, 13, 16)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out, _ = transformer_block_decode(x, w, 3, last_only=True)   # a cropped window: no past
    torch.testing.assert_close(out, full[:, -1:], rtol=1e-12, atol=1e-12)


def test_a_decoding_block_that_drops_the_past_is_caught():
    # the check above fails when the past is forgotten (the rows then see only themselves)
    gen = torch.Generator().manual_seed(8)
    w = _weights(16, False, gen)
    x = torch.randn(1, 6, 16, generator=gen, dtype=torch.float64)
    out, _ = transformer_block_decode(x[:, 5:], w, 2)
    assert not torch.allclose(out, ops.transformer_block(x, w, 2)[:, 5:], rtol=1e-3, atol=1e-3)


def test_decoding_dispatch_takes_torch_and_refuses_ext_when_named():
    x, w = _f32()
    xb, wb = x.bfloat16(), _map(torch.Tensor.bfloat16, w)
    decode = {"dropout_p": 0.0, "attention": None, "past": None, "last_only": True,
              "return_kv": True}
    # bfloat16's automatic order starts at ext, which cannot decode: torch, quietly
    assert registry.choose("transformer_block", "cpu", (xb, wb, 2), decode,
                           dtype=torch.bfloat16).name == "torch"
    assert "no incremental decoding" in transformer_block_ext.supports(xb, wb, 2, **decode)
    with pytest.raises(FastGPTError, match=r"'ext' \(from backend= argument\) cannot run here: "
                                           r"the C\+\+ block has no incremental decoding"):
        transformer_block_decode(xb, wb, 2, backend="ext")
    with ops.use_backends(transformer_block="ext"), pytest.raises(FastGPTError, match="decoding"):
        transformer_block_decode(xb, wb, 2)
    with pytest.raises(ValueError, match="no incremental decoding"):
        transformer_block_ext.transformer_block_ext(xb, wb, 2, return_kv=True)
    # what generate asks before it keeps a KV cache
    assert decode_unsupported(xb, wb, 2) is None
    assert decode_unsupported(xb, wb, 2, preferred="torch") is None
    assert "no incremental decoding" in decode_unsupported(xb, wb, 2, preferred="ext")
    # the training path still takes ext in bfloat16
    assert registry.choose("transformer_block", "cpu", (xb, wb, 2), {"dropout_p": 0.0},
                           dtype=torch.bfloat16).name == "ext"


def test_bad_past_raises_clear_errors():
    x, w = _f32()
    k = torch.zeros(2, 2, 3, 8)
    with pytest.raises(FastGPTError, match="past must be None or \\(keys, values\\)"):
        transformer_block_decode(x, w, 2, past=k)
    with pytest.raises(FastGPTError, match=r"\(2, 2, T_past, 8\).*got \(2, 2, 3, 8\) and "
                                           r"\(2, 4, 3, 4\)"):
        transformer_block_decode(x, w, 2, past=(k, torch.zeros(2, 4, 3, 4)))
    with pytest.raises(FastGPTError, match=r"got \(1, 2, 3, 8\)"):
        transformer_block_decode(x, w, 2, past=(k[:1], k[:1]))


def test_torch_block_compiles_with_fullgraph_for_training_and_decoding():
    x, w = _compiled_matches_eager(_torch, seed=9)
    with torch.no_grad():
        _, past = transformer_block_decode(x[:, :8], w, 4)
        decode = torch.compile(lambda x, w, past: transformer_block_decode(x, w, 4, past=past),
                               fullgraph=True, backend="eager")
        got, _ = decode(x[:, 8:], w, past)
        want, _ = transformer_block_decode(x[:, 8:], w, 4, past=past)
    torch.testing.assert_close(got, want)
