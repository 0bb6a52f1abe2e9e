"""fastgpt models out to Hugging Face GPT-2 folders (fastgpt.export, `fastgpt export`), offline.

transformers loads what export writes without missing or unexpected keys; its float64 run of
the exported model is the reference fastgpt's own forward is held to (fastgpt.tools.accuracy's
rule, fp32 and bf16, with and without vocabulary padding); a GPT-2 converted in and exported
back is the source tensor for tensor; the tokenizers load in transformers.AutoTokenizer and
encode as fastgpt does.
"""

import dataclasses
import json
import logging

import pytest
import tiktoken
import tiktoken.load
import torch
import transformers
from safetensors.torch import load_file

from fastgpt import tokenizers
from fastgpt.checkpoint import save_checkpoint
from fastgpt.cli import main
from fastgpt.config import GPTConfig
from fastgpt.data import CharTokenizer, read_text
from fastgpt.export import ExportOptions, export, save_hf, tokenizer_files
from fastgpt.model import GPT
from fastgpt.pretrained import from_pretrained, source_tokenizer
from fastgpt.tokenizers import gpt2_from_file, train_bpe
from fastgpt.train import RunOptions, train
from test_pretrained import PADDED, assert_parity, save_gpt2, small_tokenizer_file
from test_tokenizers import small_gpt2_folder

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."


@pytest.fixture
def hf_warnings(caplog):
    """transformers' warnings, through pytest's log capture."""
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        transformers.utils.logging.disable_propagation()


def load_hf(folder, caplog):
    """GPT2LMHeadModel.from_pretrained(folder), asserting no key was missing, unexpected or
    mismatched and nothing was logged about weights."""
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                     "error_msgs")), info
    noise = [r.getMessage() for r in caplog.records
             if any(w in r.getMessage().lower() for w in ("missing", "unexpected", "initializ",
                                                           "not used", "mismatch"))]
    assert not noise, noise
    return hf.eval()


@pytest.mark.parametrize("vocab_size", [None, PADDED])
def test_a_converted_gpt2_exports_back_tensor_for_tensor(tmp_path, hf_warnings, vocab_size):
    save_gpt2(tmp_path / "src")
    model = from_pretrained(str(tmp_path / "src"), vocab_size=vocab_size)
    assert save_hf(model, tmp_path / "out", vocab_size=97, eot_id=96) == \
        ["config.json", "model.safetensors"]
    source, back = load_file(tmp_path / "src/model.safetensors"), \
        load_file(tmp_path / "out/model.safetensors")
    assert source.keys() == back.keys()
    for key in source:
        assert back[key].dtype == torch.float32 and torch.equal(back[key], source[key]), key
    config = json.loads((tmp_path / "out/config.json").read_text())
    src = json.loads((tmp_path / "src/config.json").read_text())
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "activation_function",
                "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == src[key], key
    load_hf(tmp_path / "out", hf_warnings)


def native_model(bias: bool, gelu: str, vocab_size: int) -> GPT:
    """A fastgpt GPT as training leaves one: its own initialisation, LayerNorms and biases
    moved; padding rows (beyond 97) zero, as a converted model's."""
    torch.manual_seed(5)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=vocab_size,
                          bias=bias, gelu_approximate=gelu))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.transformer.wte.weight[97:] = 0
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, gelu, vocab_size", [(False, "none", 97), (True, "tanh", PADDED)])
def test_fastgpt_matches_transformers_on_its_export(tmp_path, hf_warnings, dtype, bias, gelu,
                                                    vocab_size):
    model = native_model(bias, gelu, vocab_size)
    save_hf(model, tmp_path, vocab_size=97)
    hf = load_hf(tmp_path, hf_warnings)
    assert hf.config.activation_function == ("gelu_new" if gelu == "tanh" else "gelu")
    assert hf.config.vocab_size == 97                      # the padding rows stay behind
    assert_parity(model, hf, dtype)


def test_a_wrong_export_fails_the_parity_check(tmp_path, hf_warnings):
    model = native_model(True, "tanh", 97)
    save_hf(model, tmp_path, vocab_size=97)
    hf = load_hf(tmp_path, hf_warnings)
    with torch.no_grad():     # c_proj is square: a missed transpose would still load
        w = hf.transformer.h[1].attn.c_proj.weight
        w.copy_(w.t().clone())
    with pytest.raises(AssertionError, match="logits"):
        assert_parity(model, hf, torch.float32)


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=1,
            eval_interval=4, log_interval=4, warmup_iters=0, max_iters=4)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("char-run")
    train(RunOptions(out_dir=str(out), preset="baby", dtype="float32", device="cpu",
                     progress=False, header=False, sample_chars=0, overrides=TINY))
    return out


def test_export_of_a_character_run(char_run, tmp_path, hf_warnings, capsys):
    folder = tmp_path / "hf"
    assert main(["export", "--out-dir", str(char_run), "--hf", str(folder)]) == 0
    assert "wrote config.json, fastgpt_tokenizer.json, model.safetensors, tokenizer.json, " \
           "tokenizer_config.json (vocabulary 65)" in capsys.readouterr().out
    hf = load_hf(folder, hf_warnings)
    assert hf.config.activation_function == "gelu" and hf.config.bos_token_id is None
    # transformers' tokenizer is fastgpt's character vocabulary
    chars = CharTokenizer.from_text(read_text())
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert auto(TEXT)["input_ids"] == chars.encode(TEXT)
    assert auto.decode(chars.encode(TEXT)) == TEXT
    # fastgpt's model of the run against transformers' float64 run of the export
    state = torch.load(char_run / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    assert_parity(model, hf, torch.float32, vocab=65)
    # the folder trains on the same data again (its fastgpt_tokenizer.json is the run's)
    assert main(["train", "--init-from", str(folder), "--out-dir", str(tmp_path / "again"),
                 "--preset", "baby", "--max-iters", "2", "--eval-iters", "1", "--batch-size",
                 "2", "--sample-chars", "0", "--no-progress", "--dtype", "float32"]) == 0


def test_export_writes_nothing_over_a_model_without_overwrite(char_run, tmp_path, capsys):
    folder = tmp_path / "hf"
    assert main(["export", "--out-dir", str(char_run), "--hf", str(folder)]) == 0
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(["export", "--out-dir", str(char_run), "--hf", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "already holds a model (config.json, model.safetensors); pass --overwrite" in err
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert main(["export", "--out-dir", str(char_run), "--hf", str(folder), "--overwrite"]) == 0
    assert main(["export", "--out-dir", str(tmp_path / "none"), "--hf", str(folder)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def _checkpoint(out_dir, model_kind, cfg: GPTConfig, spec: dict):
    out_dir.mkdir()
    torch.manual_seed(0)
    model = GPT(cfg)
    save_checkpoint(out_dir / "ckpt.pt", {
        "model": model.state_dict(), "model_kind": model_kind, "model_args": dataclasses.asdict(cfg),
        "train_args": {}, "iter_num": 0, "tokenizer": spec})
    return model


def test_a_bigram_run_does_not_export(tmp_path, capsys):
    _checkpoint(tmp_path / "run", "bigram", GPTConfig(vocab_size=65), {"kind": "char",
                                                                      "chars": "abc"})
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 2
    assert "only GPT models export to GPT-2's layout" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No tiktoken cache, and any download fails at once instead of reaching out."""
    read_local = tiktoken.load.read_file

    def no_network(url):
        if "://" not in url:
            return read_local(url)
        raise ConnectionError(f"no network in this test: {url}")
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)


def test_a_gpt2_run_offline_exports_its_model_and_says_why_no_tokenizer(tmp_path, offline,
                                                                        hf_warnings, capsys):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50304, bias=True)
    model = _checkpoint(tmp_path / "run", "gpt", cfg, {"kind": "gpt2"})
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "fastgpt: no tokenizer files written: the gpt2 tokenizer needs GPT-2's vocabulary" \
        in captured.err and "--tokenizer-file" in captured.err
    assert "wrote config.json, fastgpt_tokenizer.json, model.safetensors (vocabulary 50,257)" \
        in captured.out
    hf = load_hf(tmp_path / "hf", hf_warnings)
    assert hf.config.vocab_size == 50257 and hf.config.eos_token_id == 50256
    assert torch.equal(hf.transformer.wte.weight.detach(),
                       model.transformer.wte.weight.detach()[:50257])
    assert source_tokenizer(tmp_path / "hf", 50257) == ({"kind": "gpt2"}, None)


def test_a_run_on_gpt2_s_own_tokenizer_exports_its_files(tmp_path, monkeypatch, offline,
                                                         hf_warnings):
    # stand-in: a small vocab.bpe + encoder.json pair plays GPT-2's own (their sha256)
    (tmp_path / "vocab").mkdir()
    files = small_gpt2_folder(tmp_path / "vocab")
    for name in ("vocab.bpe", "encoder.json"):
        monkeypatch.setitem(tokenizers.GPT2_FILE_SHA256, name, tokenizers._sha256(files / name))
    tok = gpt2_from_file(files)
    assert tok.spec == {"kind": "gpt2", "file": str(files.resolve())}
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=320)
    _checkpoint(tmp_path / "run", "gpt", cfg, tok.spec)
    result = export(ExportOptions(out_dir=str(tmp_path / "run"), hf_dir=str(tmp_path / "hf")))
    assert not result.notes and result.vocab_size == tok.vocab_size == 262
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(result.files)
    assert json.loads((tmp_path / "hf" / "fastgpt_tokenizer.json").read_text()) == \
        {"kind": "gpt2"}                                  # no machine's path in the folder
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert auto(TEXT)["input_ids"] == tok.encode(TEXT) and auto.eos_token_id == 261
    assert load_hf(tmp_path / "hf", hf_warnings).config.vocab_size == 262
    spec, back = source_tokenizer(tmp_path / "hf", 262)   # offline: from the folder's files
    assert spec == {"kind": "gpt2"} and back.encode(TEXT) == tok.encode(TEXT)


def test_a_gpt2_format_tokenizer_exports_as_gpt2_s_files(tmp_path):
    tok = gpt2_from_file(small_tokenizer_file(tmp_path))
    for name, data in tokenizer_files(tok, 32).items():
        (tmp_path / name).write_bytes(data)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(auto, transformers.GPT2Tokenizer)
    assert auto(TEXT)["input_ids"] == tok.encode(TEXT) and auto.eos_token_id == tok.eot_id
    spec, back = source_tokenizer(tmp_path, tok.vocab_size)      # and fastgpt reads them back
    assert spec == tok.spec and back.encode(TEXT) == tok.encode(TEXT)


def test_a_trained_bpe_exports_as_its_tokenizers_json(tmp_path):
    tok = train_bpe(300, [read_text()[:30000]])
    for name, data in tokenizer_files(tok, 32).items():
        (tmp_path / name).write_bytes(data)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(TEXT)["input_ids"] == tok.encode(TEXT) and auto.eos_token_id == tok.eot_id
    assert auto.decode(tok.encode(TEXT)) == TEXT
    spec, back = source_tokenizer(tmp_path, tok.vocab_size)
    assert spec == tok.spec and back.encode(TEXT) == tok.encode(TEXT)


def test_export_options_reach_the_python_api(char_run, tmp_path):
    result = export(ExportOptions(out_dir=str(char_run), hf_dir=str(tmp_path / "hf")))
    assert result.vocab_size == 65 and not result.notes
    assert "model.safetensors" in result.files
