"""The fastgpt command end to end, and its answers to bad input."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fastgpt import cli, model
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import main
from fastgpt.ops import extension, registry

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "5", "--max-iters", "5",
        "--no-progress"]


def test_train_then_sample_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--out-dir", str(out),
                           "--sample-chars", "40", *TINY], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "--- sample ---" in done.stdout and "val loss" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"ckpt.pt", "metrics.jsonl", "loss.png"}
    sampled = subprocess.run([sys.executable, "-m", "fastgpt", "sample", "--out-dir", str(out),
                              "--prompt", "ROMEO:", "--max-new-tokens", "20", "--num-samples",
                              "2", "--device", "cpu"], capture_output=True, text=True,
                             timeout=600)
    assert sampled.returncode == 0, sampled.stderr
    texts = sampled.stdout.split("---------------\n")
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == 26 + 1 for t in texts)


# long enough, at a high enough rate, for the loss to fall clearly (evals at 0 and 20)
LEARN = ["--max-iters", "20", "--eval-interval", "20", "--eval-iters", "8", "--warmup-iters", "0"]


def _eval_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if r["kind"] == "eval"]


def test_bigram_trains(tmp_path):
    out = tmp_path / "b"
    assert main(["train", "--model", "bigram", "--out-dir", str(out), "--sample-chars", "0",
                 *TINY, *LEARN, "--learning-rate", "0.1"]) == 0
    state = load_checkpoint(out)
    assert state["model_kind"] == "bigram"
    assert {k: tuple(v.shape) for k, v in state["model"].items()} == \
        {"token_embedding_table.weight": (65, 65)}
    first, last = _eval_losses(out)
    assert last < first - 0.5, (first, last)


def test_naive_attention_trains(tmp_path, monkeypatch):
    tril = registry.get("attention", "tril")
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return tril.fn(*args, **kwargs)
    monkeypatch.setitem(registry._BACKENDS["attention"], "tril",
                        dataclasses.replace(tril, fn=counted))
    out = tmp_path / "t"
    assert main(["train", "--attention", "tril", "--out-dir", str(out), "--sample-chars", "0",
                 *TINY, *LEARN, "--learning-rate", "1e-2"]) == 0
    assert load_checkpoint(out)["model_args"]["attention"] == "tril"
    assert len(calls) >= 20          # one layer: a call per step, more per evaluation
    first, last = _eval_losses(out)
    assert last < first - 0.3, (first, last)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--out-dir", str(out), "--sample-chars", "0", *TINY]) == 0
    return out


def _bad(tmp_path, capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fastgpt: error: ") and err.count("\n") == 1, err   # one line
    assert match in err, err


@pytest.mark.parametrize("extra,match", [
    (["--preset", "huge"], "unknown preset 'huge'; presets are: baby, shakespeare-char, gpt2-small"),
    (["--attention", "warp"], "unknown attention backend 'warp'; known backends: loop, tril"),
    (["--cross-entropy", "nope"], "unknown linear_cross_entropy backend 'nope'"),
    (["--dtype", "float8"], "unknown dtype 'float8'; dtypes are: auto, float32, bfloat16, float16"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device"),
    (["--exact", "--dtype", "bfloat16"], "--exact trains in float32 (nanoGPT's fp32 math); "
                                         "--dtype bfloat16 conflicts with it"),
    (["--exact", "--transformer-block", "ext"], "--exact pins --transformer-block torch"),
    (["--exact", "--attention", "tril"], "--attention tril conflicts with it: drop --attention "
                                         "(or use sdpa)"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--n-head", "3"], "n_embd (16) must be divisible by n_head (3)"),
    (["--batch-size", "0"], "batch_size must be >= 1; got 0"),
])
def test_bad_train_options(tmp_path, capsys, extra, match):
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "run"), *TINY, *extra], match)
    assert not (tmp_path / "run").exists()      # a failed start leaves nothing on disk


def test_exact_trains_nanogpt_s_fp32_math(tmp_path):
    out = tmp_path / "exact"
    assert main(["train", "--exact", "--out-dir", str(out), "--sample-chars", "0", *TINY]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run_row = next(r for r in rows if r["kind"] == "run")
    assert run_row["exact"] is True and run_row["dtype"] == "float32"
    assert run_row["backends"]["transformer_block"] == "torch"
    assert run_row["backends"]["attention"] == "sdpa"


def test_train_help_lists_this_machines_backends_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())     # unwrapped
    for flag, op in (("--attention", "attention"), ("--cross-entropy", "linear_cross_entropy"),
                     ("--embedding", "embedding"), ("--transformer-block", "transformer_block")):
        names = [n for n in registry.available_backends(op)
                 if n != "triton" or torch.cuda.is_available()]
        assert f"{flag} BACKEND {flag[2:]} backend; on this machine: {', '.join(names)}" in text
    assert "--seed SEED seed of the initial weights, batches and dropout (default: 1337)" in text
    assert "(default: out)" in text
    assert "--n-layer INT baby 4, shakespeare-char 6, gpt2-small 12" in text
    assert "--exact train with nanoGPT's fp32 math step for step: float32, the torch " \
           "transformer block, sdpa attention and torch's AdamW" in text
    assert "exact fp32" not in text        # float32 alone is not exact: --exact is


def test_bad_data_files(tmp_path, capsys):
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "o"), "--data",
                            str(tmp_path / "missing.txt"), *TINY], "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "o"), "--data",
                            str(tmp_path / "empty.txt"), *TINY], "is empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "o"), "--data",
                            str(tmp_path / "latin1.txt"), *TINY], "is not UTF-8 text")
    (tmp_path / "short.txt").write_text("to be or not to be")
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "o"), "--data",
                            str(tmp_path / "short.txt"), *TINY], "needs at least 17 per split")
    assert not (tmp_path / "o").exists()        # none of the failed starts created it


def test_unwritable_out_dir_and_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "file" / "sub"), *TINY],
         "is not writable")
    _bad(tmp_path, capsys, ["train", "--resume", "--out-dir", str(tmp_path / "new"), *TINY],
         "--resume given but")
    assert not (tmp_path / "new").exists()


def test_training_on_a_user_text(tmp_path, capsys):
    poem = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "poem.txt").write_text(poem)
    assert main(["train", "--data", str(tmp_path / "poem.txt"), "--out-dir", str(tmp_path / "o"),
                 "--sample-chars", "20", *TINY]) == 0
    sample = capsys.readouterr().out.split("--- sample ---\n")[1].split("\n--------------")[0]
    assert len(sample) >= 20 and set(sample) <= set(poem)   # the poem's characters only
    assert load_checkpoint(tmp_path / "o")["vocab"] == "".join(sorted(set(poem)))


def test_bad_sample_options(trained, tmp_path, capsys):
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--prompt", "JULIET: ¿Qué€?"],
         "3 character(s) not in the model's vocabulary: '¿', 'é', '€'")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(tmp_path / "none")], "no checkpoint at")
    # the suggestion names the directory the user gave, not its parent
    missing = tmp_path / "a" / "doesnotexist"
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(missing)],
         f"train first (fastgpt train --out-dir {str(missing)!r})")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--temperature", "0"],
         "temperature must be > 0")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--top-k", "0"], "top_k must be >= 1")


def test_long_prompt_is_cropped_to_block_size(trained, capsys):
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert main(["sample", "--out-dir", str(trained), "--prompt", prompt,
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) == len(prompt) + 5 + 1   # + print's newline


@pytest.mark.parametrize("extra,code", [([], 0), (["--preset", "huge"], 2)])
def test_objects_are_frozen_at_exit_after_success(tmp_path, extra, code):
    # a command that succeeded skips the collector's passes over torch's objects at interpreter
    # exit; main() leaves the collector alone while the process runs (tests call it), and a
    # failed command keeps the ordinary exit (see fastgpt.cli._freeze_objects_at_exit)
    program = ("import atexit, gc; from fastgpt.cli import main; "
               "atexit.register(lambda: print('at exit', gc.get_freeze_count() > 0)); "  # runs last
               f"rc = main(['train', '--out-dir', {str(tmp_path / 'run')!r}, '--sample-chars', "
               f"'0', *{TINY + extra!r}]); print('after main', rc, gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [f"after main {code} 0", f"at exit {code == 0}"]


def test_misspelled_bench_provider_names_the_valid_ones():
    done = subprocess.run([sys.executable, "-m", "fastgpt", "bench", "attention", "--providers",
                           "trill", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("fastgpt: error: --providers 'trill': not a provider of "
                                  "attention; providers: loop, tril,"), done.stderr


def test_extension_index_check_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A token id past the table reaches the C++ embedding, as on CUDA, where check_tokens reads
    no values: the extension's bounds check is the user's one-line error."""
    out = tmp_path / "b"
    assert main(["train", "--model", "bigram", "--out-dir", str(out), "--sample-chars", "0",
                 *TINY]) == 0
    state = load_checkpoint(out)
    chars = state["tokenizer"]["chars"] + "~"                                 # id 65 of 65
    save_checkpoint(out / "ckpt.pt", {**state, "tokenizer": {"kind": "char", "chars": chars}})
    monkeypatch.setattr(model, "check_tokens", lambda idx, vocab_size, block_size: None)
    capsys.readouterr()
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(out), "--prompt", "a~"],
         "fastgpt: error: fastgpt::embedding_forward: index 65 is out of range for an embedding "
         "table of 65 rows")


def test_extension_dtype_check_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    assert extension.available() is None, extension.available()

    def run(opts):   # as if sampling had handed the C++ op a float64 table
        return torch.ops.fastgpt.embedding_forward(torch.zeros(3, 2, dtype=torch.float64),
                                                   torch.tensor([0]), -1)
    monkeypatch.setattr(cli, "sample_from_checkpoint", run)
    _bad(tmp_path, capsys, ["sample"], "fastgpt: error: fastgpt::embedding_forward: weight must "
                                       "be float32, float16 or bfloat16; got Double")


@pytest.mark.parametrize("error", [ValueError("math domain error"),
                                   IndexError("list index out of range"),
                                   RuntimeError("fastgpt::embedding_backward: rows too wide")])
def test_other_errors_keep_their_traceback(monkeypatch, error):
    def run(opts):
        raise error
    monkeypatch.setattr(cli, "sample_from_checkpoint", run)
    with pytest.raises(type(error), match=str(error)):
        main(["sample"])
