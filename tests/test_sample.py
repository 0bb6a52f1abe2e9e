"""Generation: the KV-cached path against nanoGPT's full recomputation of the cropped context."""

import copy

import pytest
import torch

from fastgpt import ops
from fastgpt.config import GPTConfig
from fastgpt.errors import FastGPTError
from fastgpt.generate import KVCache, generate, next_tokens
from fastgpt.model import BigramLanguageModel, GPT
from fastgpt.ops import registry
from fastgpt.ops.transformer_block import transformer_block_torch
from fastgpt.tools.accuracy import assert_matches_reference


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


# plain PyTorch for every op of the full recompute: the yardstick of the accuracy rule
PLAIN = dict(attention="torch", embedding="torch", transformer_block="torch")


def _check_cached_logits(model, prompt_len, label, steps=20):
    """The cached last-position logits of a growing sequence against full recomputation of the
    cropped context, with fastgpt.tools.accuracy's rule over all steps at once: model() in float64
    is the reference, model() with plain PyTorch ops in the model's dtype the yardstick."""
    model64 = copy.deepcopy(model).double()
    cache = KVCache(model)
    idx = torch.randint(0, 23, (2, prompt_len))
    got, plain, ref = [], [], []
    for step in range(steps):                 # grows past block_size: the cropped windows too
        got.append(cache.logits(idx))
        window = idx[:, -model.config.block_size:]
        with torch.no_grad(), ops.use_backends(**PLAIN):
            plain.append(model(window)[0][:, -1])
            ref.append(model64(window)[0][:, -1])
        grow = 3 if step % 7 == 3 else 1      # several tokens at once: recomputed, not cached
        idx = torch.cat([idx, torch.randint(0, 23, (2, grow))], dim=1)
    # (steps, B, V) together: the rule's scale test needs more than one step's 46 logits
    assert_matches_reference(torch.stack(got), torch.stack(plain), torch.stack(ref), label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("prompt_len", [1, 16, 21])   # grows through, starts at, past block_size
@pytest.mark.parametrize("bias", [True, False])
def test_cached_logits_match_full_recompute(dtype, prompt_len, bias):
    _check_cached_logits(_gpt(dtype, bias=bias), prompt_len, f"cached logits {dtype} bias={bias}")


@pytest.fixture
def forgetful_block():
    """Registers a broken transformer_block backend, ``torch~forgets past``: the torch block that
    forgets its cached keys and values on ``fraction`` of its calls; returns its name. KVCache
    reaches it only through the op's dispatch (use_backends), so this also shows the cache
    decodes through fastgpt.ops."""
    name, gen, state = "torch~forgets past", torch.Generator().manual_seed(1), {}

    def block(x, w, n_head, *, past=None, **kwargs):
        if past is not None and torch.rand((), generator=gen) < state["fraction"]:
            past = None
        return transformer_block_torch(x, w, n_head, past=past, **kwargs)

    def use(fraction):
        state["fraction"] = fraction
        return name
    registry.register("transformer_block", name, block)
    try:
        yield use
    finally:
        registry.unregister("transformer_block", [name])


@pytest.mark.parametrize("fraction", [1.0, 0.59, 0.2])
def test_a_cache_that_drops_the_past_fails_the_check(forgetful_block, fraction):
    # bfloat16, where the rule is widest (0.05 tolerances once let a 59% drop rate through);
    # the check's full recompute names the torch block itself, so only the cache is broken
    with ops.use_backends(transformer_block=forgetful_block(fraction)):
        with pytest.raises(AssertionError, match="broken cache"):
            _check_cached_logits(_gpt(torch.bfloat16, bias=False), 3, "broken cache")


def test_the_unbroken_block_passes_through_the_same_dispatch(forgetful_block):
    with ops.use_backends(transformer_block=forgetful_block(0.0)):
        _check_cached_logits(_gpt(torch.bfloat16, bias=False), 3, "cache, forgetting nothing")


def test_cached_logits_a_percent_off_fail_the_check(monkeypatch):
    real = KVCache.logits
    monkeypatch.setattr(KVCache, "logits", lambda self, idx: real(self, idx) * 1.01)
    with pytest.raises(AssertionError, match="logits x 1.01"):
        _check_cached_logits(_gpt(torch.bfloat16, bias=False), 3, "logits x 1.01")


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


def test_a_block_backend_that_cannot_decode():
    # the C++ block has no KV cache: named in the config, generate recomputes the context for
    # every token (the named block runs) and KVCache itself says why it cannot run
    model = GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=32,
                          transformer_block="ext")).bfloat16().eval()
    idx = torch.randint(0, 23, (2, 3))
    got = generate(model, idx, 20, generator=torch.Generator().manual_seed(5))
    want = _reference(model, idx, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    with pytest.raises(FastGPTError, match=r"'ext' \(from model config\).*no incremental deco"):
        KVCache(model).logits(idx)
    # unnamed, the automatic choice (ext first for bfloat16 on CPU) takes the torch block quietly
    model.config.transformer_block = None
    _check_cached_logits(model, 3, "automatic block backend, bfloat16")
