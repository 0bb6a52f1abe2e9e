"""The fastgpt command end to end, and its answers to bad input."""

import subprocess
import sys

import pytest

from fastgpt.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "5", "--max-iters", "5",
        "--no-progress"]


def test_train_then_sample_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--out-dir", str(out),
                           "--sample-chars", "40", *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--- sample ---" in done.stdout and "val loss" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"ckpt.pt", "metrics.jsonl", "loss.png"}
    sampled = subprocess.run([sys.executable, "-m", "fastgpt", "sample", "--out-dir", str(out),
                              "--prompt", "ROMEO:", "--max-new-tokens", "20", "--num-samples",
                              "2", "--device", "cpu"], capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    texts = sampled.stdout.split("---------------\n")
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == 26 + 1 for t in texts)


def test_bigram_and_naive_attention_train(tmp_path, capsys):
    assert main(["train", "--model", "bigram", "--out-dir", str(tmp_path / "b"),
                 "--sample-chars", "0", *TINY]) == 0
    assert main(["train", "--attention", "tril", "--out-dir", str(tmp_path / "t"),
                 "--sample-chars", "0", *TINY]) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--out-dir", str(out), "--sample-chars", "0", *TINY]) == 0
    return out


def _bad(tmp_path, capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert match in err, err


@pytest.mark.parametrize("extra,match", [
    (["--preset", "huge"], "unknown preset 'huge'; presets are: baby, shakespeare-char, gpt2-small"),
    (["--attention", "warp"], "unknown attention backend 'warp'; known backends: loop, tril"),
    (["--cross-entropy", "nope"], "unknown linear_cross_entropy backend 'nope'"),
    (["--dtype", "float8"], "unknown dtype 'float8'; dtypes are: auto, float32, bfloat16, float16"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--n-head", "3"], "n_embd (16) must be divisible by n_head (3)"),
])
def test_bad_train_options(tmp_path, capsys, extra, match):
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path), *TINY, *extra], match)


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


def test_unwritable_out_dir_and_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _bad(tmp_path, capsys, ["train", "--out-dir", str(tmp_path / "file" / "sub"), *TINY],
         "is not writable")
    _bad(tmp_path, capsys, ["train", "--resume", "--out-dir", str(tmp_path / "new"), *TINY],
         "--resume given but")


def test_training_on_a_user_text(tmp_path, capsys):
    (tmp_path / "poem.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["train", "--data", str(tmp_path / "poem.txt"), "--out-dir", str(tmp_path / "o"),
                 "--sample-chars", "20", *TINY]) == 0
    assert "--- sample ---" in capsys.readouterr().out


def test_bad_sample_options(trained, tmp_path, capsys):
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--prompt", "JULIET: ¿Qué€?"],
         "3 character(s) not in the model's vocabulary: '¿', 'é', '€'")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(tmp_path / "none")], "no checkpoint at")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--temperature", "0"],
         "temperature must be > 0")
    _bad(tmp_path, capsys, ["sample", "--out-dir", str(trained), "--top-k", "0"], "top_k must be >= 1")


def test_long_prompt_is_cropped_to_block_size(trained, capsys):
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert main(["sample", "--out-dir", str(trained), "--prompt", prompt,
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith(prompt)


@pytest.mark.parametrize("extra,code", [([], 0), (["--preset", "huge"], 2)])
def test_objects_are_frozen_at_exit_after_success(tmp_path, extra, code):
    # a command that succeeded skips the collector's passes over torch's objects at interpreter
    # exit; main() leaves the collector alone while the process runs (tests call it), and a
    # failed command keeps the ordinary exit (see fastgpt.cli._freeze_objects_at_exit)
    program = ("import atexit, gc; from fastgpt.cli import main; "
               "atexit.register(lambda: print('at exit', gc.get_freeze_count() > 0)); "  # runs last
               f"rc = main(['train', '--out-dir', {str(tmp_path / 'run')!r}, '--sample-chars', "
               f"'0', *{TINY + extra!r}]); print('after main', rc, gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [f"after main {code} 0", f"at exit {code == 0}"]
