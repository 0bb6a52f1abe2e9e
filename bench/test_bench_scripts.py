"""Every script in bench/ runs as a user runs it (`python bench/<script>.py ...`), on tiny sizes.

Not timings: only that each script still works and prints what it promises, so none of them
rots between the times someone measures with it. Timings are never asserted.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
CPU = ["--device", "cpu", "--min-run-time", "0.01"]


def _script(name, *args, cwd=None):
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def _rows(out, *providers):
    """The table rows of ``providers``, none of them skipped."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    got = {r[0]: r for r in rows if r[0] in providers}
    assert set(got) == set(providers), out
    assert not any("skipped:" in " ".join(r) for r in got.values()), out
    return got


def test_bench_attention():
    code, out, err = _script("bench_attention.py", *CPU, "--T", "8", "--D", "16", "--B", "1",
                             "--H", "2", "--providers", "tril", "ext", "--modes", "fwd")
    assert code == 0, err
    assert "attention fwd float32" in out and "vs tril" in out
    assert _rows(out, "tril", "ext")["tril"][-1] == "1.00x"


def test_bench_cross_entropy():
    # the script's named `baby` case, each provider in a fresh process on CPU
    code, out, err = _script("bench_cross_entropy.py", "--cases", "baby", "--providers", "torch",
                             "chunked", "--device", "cpu", "--min-run-time", "0.01")
    assert code == 0, err
    assert "linear_cross_entropy fwd+bwd float32" in out and "N=768 C=128 V=65" in out
    _rows(out, "torch", "chunked")


def test_bench_embedding():
    code, out, err = _script("bench_embedding.py", *CPU, "--V", "10", "--N", "16", "--C", "8")
    assert code == 0, err
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert f"embedding {mode} float32" in out, out
    _rows(out, "torch", "ext")


def test_bench_transformer_block():
    code, out, err = _script("bench_transformer_block.py", *CPU, "--B", "1", "--T", "8", "--C",
                             "16", "--H", "2", "--modes", "fwd", "--dtype", "bfloat16")
    assert code == 0, err
    assert "transformer_block fwd bfloat16" in out
    _rows(out, "torch", "ext")


def test_bench_train_takes_comma_separated_configs():
    # The script turns "a,b" into `fastgpt bench train`'s "a;b". Too few iterations stop the
    # run before training, after the configurations were read: the --iters error, not "bad
    # train config", shows both names were understood (test_bench_harness runs a real one).
    code, out, err = _script("bench_train.py", "--device", "cpu", "--iters", "5",
                             "--configs", "tril fp32,sdpa fp32")
    assert code == 2 and "--iters 5: need >= 30" in err, err


def test_bench_prepare():
    # a tiny corpus and a tiny trained GPT-2-format vocabulary; each method runs once
    code, out, err = _script("bench_prepare.py", "--mb", "0.05", "--rounds", "1", "--vocab",
                             "300", "--train-chars", "20000", "--train-vocab")
    assert code == 0, err
    assert "corpus: tiny Shakespeare repeated to 0.05 MB" in out, out
    assert "tokenizer: a GPT-2-format .tiktoken file written by this script" in out, out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
            if line.startswith(("nanoGPT ", "prepare w"))}
    assert set(rows) == {"nanoGPT", "prepare w1", "prepare w2"}, out
    assert rows["nanoGPT"][-1] == "1.00x"
    # prepare's stream has one token more: the end-of-text before the document
    assert int(rows["prepare w1"][2].replace(",", "")) >= int(rows["nanoGPT"][1].replace(",", ""))


def test_bench_train_data():
    # tiny shard sets of several shards, short training runs, one round of everything
    code, out, err = _script("bench_train_data.py", "--rounds", "1", "--calls", "5",
                             "--step-iters", "12", "--rss-rounds", "1", "--rss-iters", "2",
                             "--small-mb", "0.05", "--big-mb", "0.3", "--shard-tokens", "40000",
                             "--diag-batches", "5")
    assert code == 0, err
    assert re.search(r"^   cpu +\S", out, re.M) and re.search(r"^   torch +\d", out, re.M), out
    for row in ("token shards (ShardDataset)", "text (TextDataset)",
                "shards, maps kept open (reference)"):
        assert re.search(rf"^   {re.escape(row)} +[\d.]+ \(.*%$", out, re.M), out
    assert re.search(r"measured [\d.]+% in the step \((NOT )?under 1%\)", out), out
    assert "big set: 5 shards (4 train + 1 val), 150,000 tokens" in out, out
    for label in ("small", "big"):
        # a training process holds no map of a shard once train() has returned
        assert re.search(rf"^   {label} +1( +[\d.]+){{5}} +0 +[\d.]+$", out, re.M), out
        assert re.search(rf"^   {label} +med( +[\d.]+){{5}}$", out, re.M), out
    # fastgpt's reads (pread) leave no mapping of a shard behind; the kept maps hold all 4
    assert re.search(r"^   pread per window \(fastgpt\) +0 ", out, re.M), out
    assert re.search(r"^   maps kept open \(reference\) +4 ", out, re.M), out


def test_bench_labels():
    code, out, err = _script("bench_labels.py", "--preset", "baby")
    assert code == 0, err
    # 10 calls with the torch block (attention separate), fewer where the fused block runs
    assert "Backend.__call__" in out and re.search(r"\d+ backend calls, 2 labelled contexts", out)
    assert "labels without a profiler:" in out and "% of the step" in out


def test_bench_fsdp():
    # two ranks on gloo, a tiny preset and block: every configuration runs and reports
    code, out, err = _script("bench_fsdp.py", "--preset", "baby", "--block-size", "16",
                             "--steps", "1")
    assert code == 0, err
    for config in ("| ddp |", "| fsdp |", "| fsdp+ac |", "| fsdp+selective |"):
        assert config in out, out
    assert "FSDP state per rank = 1.000 x (DDP's / 2)" in out


def _stand_in_nanogpt(tmp_path, body: str):
    """A nanoGPT checkout whose train.py reads --max_iters into `iters`, then runs ``body``."""
    nano = tmp_path / "nanoGPT"
    nano.mkdir()
    (nano / "train.py").write_text(
        "import sys\n"
        "iters = next(int(a.split('=')[1]) for a in sys.argv if a.startswith('--max_iters='))\n"
        + body)
    return nano


def test_vs_nanogpt(tmp_path):
    # a stand-in for nanoGPT's train.py that prints its last eval line as nanoGPT does
    nano = _stand_in_nanogpt(tmp_path,
                             "print(f'step {iters}: train loss 1.2345, val loss 1.5000')\n")
    tiny = "--n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 4 --eval-iters 1"
    code, out, err = _script("vs_nanogpt.py", "--nanogpt", str(nano), "--rounds", "1",
                             "--iters", "4", "--fastgpt-args", tiny, cwd=tmp_path)
    assert code == 0, err
    nano_row = re.search(r"^nanoGPT .* 1\.5000$", out, re.M)
    fast_row = re.search(r"^fastgpt +[\d.]+ +[\d.]+ +(\d+\.\d{4})$", out, re.M)
    assert nano_row and fast_row, out
    assert 0 < float(fast_row.group(1)) < 10
    assert re.search(r"^per round: [\d.]+x$", out, re.M), out
    assert re.search(r"fastgpt is [\d.]+x faster than nanoGPT \(median of the per-round ratios",
                     out), out


def test_vs_nanogpt_per_iteration(tmp_path):
    # a stand-in for nanoGPT's train.py that logs its iterations as nanoGPT does: 50 ms each,
    # the first (with its evaluation) 900 ms, which the median must leave out
    nano = _stand_in_nanogpt(
        tmp_path,
        "assert 'config/train_shakespeare_char.py' in sys.argv and '--eval_iters=1' in sys.argv\n"
        "for i in range(iters + 1):\n"
        "    print(f'iter {i}: loss 2.5000, time {900.0 if i == 0 else 50.0:.2f}ms, mfu 1.00%')\n")
    tiny = "--n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 4 --dropout 0"
    code, out, err = _script("vs_nanogpt.py", "--nanogpt", str(nano), "--rounds", "2",
                             "--preset", "shakespeare-char", "--iters", "5",
                             "--fastgpt-args", tiny, cwd=tmp_path)
    assert code == 0, err
    assert re.search(r"^nanoGPT +50\.0 ms/iter +rounds: 50\.0 50\.0$", out, re.M), out
    fast = re.search(r"^fastgpt +([\d.]+) ms/iter", out, re.M)
    assert fast and 0 < float(fast.group(1)) < 1000, out
    assert re.search(r"^per round: [\d.]+x, [\d.]+x$", out, re.M), out
    assert re.search(r"fastgpt is [\d.]+x faster than nanoGPT per iteration", out), out


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")
                                          if not p.name.startswith(("test_", "conftest"))))
def test_every_script_is_tested_here(script):
    assert f'"{script}"' in Path(__file__).read_text(), f"bench/{script} has no test here"
