"""Generation: the KV-cached path against nanoGPT's full recomputation of the cropped context."""

import pytest
import torch

from fastgpt.config import GPTConfig
from fastgpt.kv_cache import KVCache
from fastgpt.model import BigramLanguageModel, GPT
from fastgpt.sample import generate, next_tokens


def _gpt(dtype=torch.float32, bias=True, **kw) -> GPT:
    cfg = GPTConfig(block_size=16, vocab_size=23, n_layer=3, n_head=2, n_embd=32, bias=bias, **kw)
    model = GPT(cfg)
    with torch.no_grad():   # non-zero biases, so a bias dropped on the cached path shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


def _reference(model, idx, n, temperature=1.0, top_k=None, generator=None):
    """nanoGPT's sampling loop: the whole cropped context through model() for every token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, next_tokens(logits[:, -1, :], temperature, top_k, generator)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 21])   # up to, at and past block_size 16
@pytest.mark.parametrize("bias", [True, False])
def test_cached_logits_match_full_recompute(prompt_len, bias):
    model = _gpt(bias=bias)
    cache = KVCache(model)
    idx = torch.randint(0, 23, (2, prompt_len))
    for step in range(20):                    # grows past block_size: the cropped windows too
        want = model(idx[:, -16:])[0][:, -1]
        got = cache.logits(idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grow = 3 if step % 7 == 3 else 1      # several tokens at once: recomputed, not cached
        idx = torch.cat([idx, torch.randint(0, 23, (2, grow))], dim=1)


def test_cached_logits_match_in_bfloat16():
    # the bf16 model's blocks are the C++ op; the cached path is the torch block's math in bf16
    model = _gpt(torch.bfloat16, bias=False)
    cache = KVCache(model)
    idx = torch.randint(0, 23, (1, 3))
    for _ in range(20):
        want = model(idx[:, -16:])[0][:, -1].float()
        torch.testing.assert_close(cache.logits(idx).float(), want, rtol=0.05, atol=0.05)
        idx = torch.cat([idx, torch.randint(0, 23, (1, 1))], dim=1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 5)])
def test_generate_samples_the_reference_tokens(temperature, top_k):
    model = _gpt()
    idx = torch.randint(0, 23, (3, 4))
    got = generate(model, idx, 40, temperature, top_k, torch.Generator().manual_seed(7))
    want = _reference(model, idx, 40, temperature, top_k, torch.Generator().manual_seed(7))
    assert got.shape == (3, 44)
    assert torch.equal(got, want)


def test_generate_without_a_cache():
    # a model in training mode (dropout would apply) and the bigram model recompute every token
    gpt = _gpt().train()
    bigram = BigramLanguageModel(GPTConfig(block_size=8, vocab_size=23)).eval()
    for model in (gpt, bigram):
        idx = torch.zeros((1, 1), dtype=torch.long)
        got = generate(model, idx, 30, generator=torch.Generator().manual_seed(3))
        want = _reference(model, idx, 30, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
