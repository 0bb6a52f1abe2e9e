"""Dropout inside the C++ block (``ext``): csrc/dropout_cpu.h's hashed masks.

With the masks a block call used (``transformer_block_dropout_masks`` of the seed it saved),
its output and every gradient meet the accuracy rule against the same block written out in
plain PyTorch with those masks, in float64 (the reference), float32 and bfloat16; the autograd
node gives the ops' own results; torch.manual_seed repeats a call, under torch.compile too, and
activation checkpointing replays the masks; the masks drop each site's elements at the rate
asked, independently of their neighbours.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops, recompute
from fastgpt.config import GPTConfig
from fastgpt.model import GPT
from fastgpt.ops import transformer_block_ext
from fastgpt.ops.transformer_block import BlockWeights
from test_transformer_block import _leaves, _map, _weights, assert_block_matches

assert transformer_block_ext.available() is None, transformer_block_ext.available()


def _cast(w, dtype):
    return _map(lambda t: t.to(dtype), w)


def _masked_block(x, w, n_head, p, masks):
    """nanoGPT's block with the given keep masks (attention probabilities, the two branches)."""
    keep_att, keep_1, keep_2 = (m.to(x.dtype) / (1 - p) for m in masks)
    B, T, C = x.shape
    h = F.layer_norm(x, (C,), w.ln_1_weight, w.ln_1_bias)
    qkv = F.linear(h, w.c_attn_weight, w.c_attn_bias).view(B, T, 3, n_head, C // n_head)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    scores = (q @ k.transpose(-1, -2)) * (C // n_head) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    y = ((probs * keep_att) @ v).transpose(1, 2).reshape(B, T, C)
    x = x + F.linear(y, w.attn_c_proj_weight, w.attn_c_proj_bias) * keep_1
    h = F.layer_norm(x, (C,), w.ln_2_weight, w.ln_2_bias)
    y = F.linear(F.gelu(F.linear(h, w.c_fc_weight, w.c_fc_bias)), w.mlp_c_proj_weight,
                 w.mlp_c_proj_bias)
    return x + y * keep_2


def _ext_ops(x, w, n_head, p, grad_out):
    """The C++ ops called directly: output, gradients (x, then weights present), seed."""
    args = (x, *w, n_head, p)
    out, saved = torch.ops.fastgpt.transformer_block_train(*args)
    grads = torch.ops.fastgpt.transformer_block_backward(grad_out, saved, *args)
    return out, grads, int(saved[-1][0])


def _reference(x, w, n_head, p, masks, grad_out):
    x = x.detach().requires_grad_(True)
    w = _map(lambda t: t.detach().requires_grad_(True), w)
    out = _masked_block(x, w, n_head, p, masks)
    return out, torch.autograd.grad(out, _leaves(x, w), grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# T = 70 and 97 end between the attention's 4-row tiles and its 8/16-lane key vectors; C = 24
# and 40 leave a row tail past the residual dropout's vectors
@pytest.mark.parametrize("B,T,C,H,bias,p", [(2, 7, 48, 3, False, 0.2), (1, 97, 64, 4, True, 0.5),
                                            (3, 33, 16, 1, True, 0.2), (2, 70, 40, 5, False, 0.5),
                                            (1, 1, 24, 2, True, 0.2)])
def test_matches_float64_reference_with_the_same_masks(dtype, B, T, C, H, bias, p):
    gen = torch.Generator().manual_seed(B * 1000 + T)
    w = _cast(_weights(C, bias, gen), dtype)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(B, T, C, generator=gen, dtype=torch.float64).to(dtype)
    fast, fast_grads, seed = _ext_ops(x, w, H, p, grad_out)
    masks = torch.ops.fastgpt.transformer_block_dropout_masks(seed, B, T, C, H, p)
    ref, ref_grads = _reference(x.double(), _cast(w, torch.float64), H, p, masks,
                                grad_out.double())
    plain, plain_grads = _reference(x, w, H, p, masks, grad_out)
    assert fast.dtype == dtype and fast.shape == (B, T, C)
    assert_block_matches(w, fast, fast_grads, plain, plain_grads, ref, ref_grads)


def test_float64_takes_the_same_masks_exactly():
    # float64 attention is the batched-matmul path: its masks come from keep_mask, not the
    # vectorised hash in the fused kernel; both must be the same function of the seed
    gen = torch.Generator().manual_seed(0)
    w = _weights(24, True, gen)
    x = torch.randn(2, 11, 24, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 11, 24, generator=gen, dtype=torch.float64)
    out, grads, seed = _ext_ops(x, w, 3, 0.3, grad_out)
    masks = torch.ops.fastgpt.transformer_block_dropout_masks(seed, 2, 11, 24, 3, 0.3)
    ref, ref_grads = _reference(x, w, 3, 0.3, masks, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_autograd_node_gives_the_ops_results_and_manual_seed_repeats_a_call():
    gen = torch.Generator().manual_seed(1)
    w = _cast(_weights(32, True, gen), torch.float32)
    x = torch.randn(2, 19, 32, generator=gen)
    grad_out = torch.randn(2, 19, 32, generator=gen)
    torch.manual_seed(7)
    out, grads, _ = _ext_ops(x, w, 4, 0.2, grad_out)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        xl = x.clone().requires_grad_(True)
        wl = BlockWeights(*(t.clone().requires_grad_(True) for t in w))
        y = ops.transformer_block(xl, wl, 4, dropout_p=0.2, backend="ext")
        runs.append((y, torch.autograd.grad(y, _leaves(xl, wl), grad_out)))
    for y, g in runs:
        assert torch.equal(y, out)
        assert all(torch.equal(a, b) for a, b in zip(g, grads))
    # without reseeding, the next call draws another seed: other masks
    assert not torch.equal(ops.transformer_block(x, w, 4, dropout_p=0.2, backend="ext"), out)
    with torch.no_grad():   # dropout_p > 0 drops without autograd too (train mode, no_grad)
        torch.manual_seed(7)
        assert torch.equal(ops.transformer_block(x, w, 4, dropout_p=0.2, backend="ext"), out)


def test_compiled_block_with_dropout_matches_eager_for_one_seed():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    w = BlockWeights(*(t.float().requires_grad_(True) for t in _weights(32, True, gen)))
    x = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 9, 32, generator=gen)

    def block(x, w):
        return ops.transformer_block(x, w, 4, dropout_p=0.2, backend="ext")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, block):
        torch.manual_seed(3)
        out = fn(x, w)
        results.append((out, torch.autograd.grad(out, _leaves(x, w), grad_out)))
    (out, grads), (ref, ref_grads) = results
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_replays_the_masks(mode):
    # the recomputed forward draws its seed again from the CPU generator, whose state
    # torch.utils.checkpoint restores: the same masks, so the same gradients to the bit
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.2,
                    transformer_block="ext")
    idx, tgt = torch.randint(0, 11, (3, 16)), torch.randint(0, 11, (3, 16))
    results = []
    for m in ("none", mode):
        torch.manual_seed(0)
        model = GPT(cfg)
        recompute.apply(model, m)
        _, loss = model(idx, tgt)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_backward_with_dropout_passes_opcheck():
    gen = torch.Generator().manual_seed(4)
    w = list(_cast(_weights(16, True, gen), torch.float32))
    x = torch.randn(2, 5, 16, generator=gen)
    args = (x, *w, 2, 0.2)
    _, saved = torch.ops.fastgpt.transformer_block_train(*args)
    torch.library.opcheck(torch.ops.fastgpt.transformer_block_backward.default,
                          (torch.randn_like(x), saved, *args))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_masks_drop_at_the_rate_asked_and_independently(p):
    B, T, C, H = 4, 64, 256, 4
    masks = torch.ops.fastgpt.transformer_block_dropout_masks(12345, B, T, C, H, p)
    assert [tuple(m.shape) for m in masks] == [(B, H, T, T), (B, T, C), (B, T, C)]
    for m in masks:
        m = m.reshape(-1, m.shape[-1]).double()
        n = m.numel()
        assert abs(m.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        centred = m - (1 - p)
        for pair in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
            corr = (pair[0] * pair[1]).mean().item() / (p * (1 - p))
            assert abs(corr) < 5 / math.sqrt(pair[0].numel()), corr   # neighbours unrelated
    # the three sites and another seed give other masks
    assert not torch.equal(masks[1], masks[2])
    other = torch.ops.fastgpt.transformer_block_dropout_masks(12346, B, T, C, H, p)
    assert not torch.equal(other[1], masks[1])
    assert not torch.equal(other[0], masks[0])


def test_bad_dropout_p_raises_a_clear_error():
    gen = torch.Generator().manual_seed(5)
    w = list(_cast(_weights(16, False, gen), torch.float32))
    x = torch.randn(1, 3, 16, generator=gen)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.5"):
        torch.ops.fastgpt.transformer_block(x, *w, 2, 1.5)
    with pytest.raises(ValueError, match=r"dropout_p in \[0, 1\); got .* dropout_p=-0.1"):
        torch.ops.fastgpt.transformer_block_dropout_masks(0, 1, 3, 16, 2, -0.1)
