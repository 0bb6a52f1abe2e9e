"""The models: nanoGPT names, initial loss, learning, input checks, mixed precision."""

import math

import pytest
import torch

from fastgpt.config import GPTConfig, preset
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, BigramLanguageModel
from fastgpt.optim import make_optimizer

TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def test_parameter_names_match_nanogpt():
    names = set(GPT(TINY).state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "lm_head.weight"}
    for i in range(TINY.n_layer):
        expected |= {f"transformer.h.{i}.{p}.weight" for p in
                     ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}
    assert names == expected
    model = GPT(TINY)
    assert model.transformer.wte.weight is model.lm_head.weight     # tied


def test_baby_preset_is_nanogpts_cpu_run():
    m, t = preset("baby")
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.max_iters, t.learning_rate, t.min_lr, t.warmup_iters, t.beta2,
            t.eval_iters, t.eval_interval) == (12, 2000, 1e-3, 1e-4, 100, 0.99, 20, 250)
    with pytest.raises(FastGPTError, match="unknown preset 'tiny'"):
        preset("tiny")


def test_initial_loss_is_log_vocab():
    model = GPT(preset("baby")[0])
    x = torch.randint(0, 65, (8, 64))
    y = torch.randint(0, 65, (8, 64))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_gpt_overfits_one_batch():
    model = GPT(TINY)
    opt = make_optimizer(model, 3e-3, 0.0, (0.9, 0.99))
    x = torch.randint(0, 65, (4, 16))
    y = torch.randint(0, 65, (4, 16))
    for _ in range(200):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1


def test_bigram_learns_the_next_character():
    from fastgpt.data import CharTokenizer, TextDataset, read_text
    text = read_text()
    tok = CharTokenizer.from_text(text)
    data = TextDataset(text, tok, block_size=8)
    model = BigramLanguageModel(GPTConfig(vocab_size=tok.vocab_size, block_size=8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        _, loss = model(*data.batch("train", 64, gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        val = sum(model(*data.batch("val", 64, gen))[1].item() for _ in range(20)) / 20
    assert val < 2.6


def test_sampling_logits_are_last_position_only():
    model = GPT(TINY).eval()
    logits, loss = model(torch.randint(0, 65, (3, 5)))
    assert logits.shape == (3, 1, 65) and loss is None


def test_bad_token_input_is_rejected():
    model = GPT(TINY)
    with pytest.raises(FastGPTError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(FastGPTError, match="token id 65 is outside the vocabulary"):
        model(torch.tensor([[1, 65]]))
    with pytest.raises(FastGPTError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(FastGPTError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))


def test_bf16_autocast_step_on_cpu():
    model = GPT(TINY)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        loss32 = model(x, y)[1].item()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    opt.step()
    # the matmuls ran in bf16: not fp32's loss, but within bf16 rounding of it
    assert loss.dtype == torch.float32 and loss.item() != loss32
    assert abs(loss.item() - loss32) < 0.01 * loss32
    # fp32 master weights and gradients, and the step moved every one of them
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_gpt_with_each_naive_attention_gives_one_loss():
    torch.manual_seed(0)
    x = torch.randint(0, 65, (2, 16))
    losses = []
    for backend in ("loop", "tril", "sdpa", "torch"):
        torch.manual_seed(1)
        model = GPT(GPTConfig(**{**TINY.__dict__, "attention": backend})).double()
        losses.append(model(x, x)[1].item())
    assert max(losses) - min(losses) < 1e-10
