"""Helpers the attention backend tests share (test_attention_triton.py, test_attention_ext.py).

q, k, v are strided views of one (B, T, 3, H, D) tensor, as the model makes them; a backend's
output and input gradients are checked against the float64 reference with fastgpt.tools.accuracy's
accuracy rule.
"""

import torch

from fastgpt.config import GPTConfig
from fastgpt.model import GPT
from fastgpt.ops.attention import attention_torch
from fastgpt.tools.accuracy import assert_matches_reference


def qkv(B, H, T, D, dtype, requires_grad=True):
    """q, k, v of shape (B, H, T, D): non-contiguous slices of one (B, T, 3, H, D) tensor."""
    x = torch.randn(B, T, 3, H, D, dtype=dtype)
    return [t.transpose(1, 2).requires_grad_(requires_grad) for t in x.unbind(2)]


def run(fn, q, k, v, dout, dtype=None):
    """Output and input gradients of fn, run on copies of q, k, v cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check_all(fast, base, ref, label):
    """fast's output and gradients against ref (float64), with base (plain PyTorch) as yardstick."""
    refs = [ref[0], *ref[1]]
    # dq and dk cancel to exactly zero at T=1: their floor is taken at the call's largest tensor
    magnitude = max(r.abs().max().item() for r in refs if r.numel())
    for name, f, b, r in zip(("out", "dq", "dk", "dv"), [fast[0], *fast[1]],
                             [base[0], *base[1]], refs):
        assert_matches_reference(f, b, r, f"{label} {name}", zero_ref_magnitude=magnitude)


def check_against_reference(fast, q, k, v, dout, label):
    """check_all for fast = run(backend, q, k, v, dout): plain attention_torch in the inputs'
    dtype is the yardstick, attention_torch in float64 the reference."""
    base = run(attention_torch, q, k, v, dout)
    ref = run(attention_torch, q, k, v, dout, torch.float64)
    check_all(fast, base, ref, label)


def tiny_gpt_losses(attention, **config):
    """Losses of 4 AdamW steps of a tiny seeded GPT using that attention backend."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32,
                    attention=attention, **config)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 65, (4, 17), generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(4):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out
