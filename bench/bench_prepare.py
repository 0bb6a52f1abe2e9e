"""`fastgpt prepare` tokens/s against nanoGPT's prepare.py (one tiktoken encode_ordinary call).

The corpus is the bundled tiny Shakespeare repeated to ``--mb`` megabytes, one text file (one
document: prepare cuts it into pieces for its workers). Both sides use the same tiktoken
encoding: GPT-2's when tiktoken has its files cached; otherwise (or with --train-vocab) a
GPT-2-format .tiktoken file this script writes from a byte-level BPE it trains on tiny
Shakespeare (``--vocab`` tokens); the output says which. ``--tokenizer-file`` uses yours.

  nanoGPT     read the file, ``enc.encode_ordinary(text)``, np.uint16 array, ``tofile``
  prepare wK  ``fastgpt prepare --tokenizer gpt2 --workers K``: check pass over the input,
              tokenize in K processes, write llm.c shards + meta.json

Each measurement runs in a fresh process (rounds alternate the methods, so load from other
processes falls on all alike); the table gives the median wall time with its min-max over
rounds, tokens/s, MB/s of text, the peak resident memory (the main process; workers' largest
in brackets) and the speedup over nanoGPT. Not a test: run it by hand.

    python bench/bench_prepare.py --mb 100 --rounds 3 --workers 1 2
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken

from fastgpt.data import bundled_text_path, read_text
from fastgpt.prepare import PrepareOptions, prepare
from fastgpt.tokenizers import gpt2_from_file, train_bpe
from fastgpt.tools.environment import environment, format_env

GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


def gpt2_is_cached() -> bool:
    """Whether tiktoken would load GPT-2 from its cache (tiktoken/load.py's cache layout)."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(os.path.exists(os.path.join(folder, hashlib.sha1(u.encode()).hexdigest()))
               for u in GPT2_URLS)


def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte alphabet (Hugging Face's ByteLevel uses it too): character -> byte."""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


def write_trained_rank_file(path: Path, vocab: int, text: str) -> int:
    """Train a byte-level BPE on ``text`` and write its merges as a .tiktoken rank file: the
    256 bytes, then each merge's token in merge order. Returns the vocabulary (ranks + eot)."""
    model = json.loads(train_bpe(vocab, [text]).spec["json"])["model"]
    to_byte = _gpt2_bytes()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in a + b)
        ranks.setdefault(token, len(ranks))   # a token two merges make keeps its first rank
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return len(ranks) + 1


def make_corpus(path: Path, megabytes: float) -> int:
    unit = bundled_text_path().read_bytes()
    size = int(megabytes * 1e6)
    with open(path, "wb") as f:
        for _ in range(size // len(unit)):
            f.write(unit)
        tail = unit[:size % len(unit)]
        f.write(tail[:len(tail.decode("utf-8", errors="ignore").encode())])   # whole characters
    return path.stat().st_size


def measure(method: str, corpus: str, tokenizer_file: str | None, out: str) -> dict:
    """One timed run in this (fresh) process: seconds, tokens, peak memory in MB."""
    t0 = time.perf_counter()
    if method == "nanoGPT":
        enc = (gpt2_from_file(tokenizer_file).encoding if tokenizer_file
               else tiktoken.get_encoding("gpt2"))
        with open(corpus, encoding="utf-8") as f:
            ids = enc.encode_ordinary(f.read())
        dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
        np.array(ids, dtype=dtype).tofile(os.path.join(out, "train.bin"))
        tokens = len(ids)
    else:
        result = prepare(PrepareOptions(
            inputs=[corpus], tokenizer="gpt2", out_dir=out, tokenizer_file=tokenizer_file,
            workers=int(method.removeprefix("prepare w")), overwrite=True, progress=False))
        tokens = sum(result.tokens.values())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_isolated(method: str, corpus: Path, tokenizer_file: str | None, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    argv = [sys.executable, __file__, "--measure", method, "--corpus", str(corpus),
            "--out", str(out)] + (["--tokenizer-file", tokenizer_file] if tokenizer_file else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def choose_tokenizer(args, tmp: Path) -> tuple[str | None, str]:
    """(the --tokenizer-file to use or None for tiktoken's gpt2, a sentence saying which)."""
    if args.tokenizer_file:
        return args.tokenizer_file, f"the file {args.tokenizer_file} (GPT-2 format)"
    if gpt2_is_cached() and not args.train_vocab:
        return None, "tiktoken's gpt2 (cached), 50,257 tokens"
    path = tmp / "shakespeare.tiktoken"
    vocab = write_trained_rank_file(path, args.vocab, read_text()[:int(args.train_chars)])
    why = "asked with --train-vocab" if args.train_vocab else "tiktoken's gpt2 files are not cached"
    return str(path), (f"a GPT-2-format .tiktoken file written by this script: a byte-level BPE "
                       f"trained on tiny Shakespeare, {vocab:,} tokens ({why})")


def report(rows: dict[str, list[dict]], text_bytes: int) -> None:
    base = statistics.median(r["seconds"] for r in rows["nanoGPT"])
    print(f"{'method':<12} {'tokens':>12} {'median s':>9} {'(min-max)':>14} {'tokens/s':>12} "
          f"{'MB/s':>7} {'peak MB':>16} {'vs nanoGPT':>10}")
    for method, runs in rows.items():
        seconds = [r["seconds"] for r in runs]
        median = statistics.median(seconds)
        workers = max(r["worker_rss_mb"] for r in runs)
        memory = f"{max(r['rss_mb'] for r in runs):.0f}" + (f" [{workers:.0f}]" if workers else "")
        print(f"{method:<12} {runs[0]['tokens']:>12,} {median:>9.2f} "
              f"{f'({min(seconds):.2f}-{max(seconds):.2f})':>14} "
              f"{runs[0]['tokens'] / median:>12,.0f} {text_bytes / 1e6 / median:>7.1f} "
              f"{memory:>16} {base / median:>9.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100, help="corpus size in MB (default 100)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer-file", default=None, help="a GPT-2-format file to use")
    p.add_argument("--train-vocab", action="store_true",
                   help="use the trained file even when tiktoken's gpt2 is cached")
    p.add_argument("--vocab", type=int, default=50257, help="the trained BPE's vocabulary")
    p.add_argument("--train-chars", type=float, default=2e6,
                   help="characters of tiny Shakespeare to train it on (default: all)")
    p.add_argument("--measure", help=argparse.SUPPRESS)      # internal: one run, JSON out
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.corpus, args.tokenizer_file, args.out)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        text_bytes = make_corpus(tmp / "corpus.txt", args.mb)
        tokenizer_file, which = choose_tokenizer(args, tmp)
        print(f"# {format_env(environment('cpu'))}")
        print(f"corpus: tiny Shakespeare repeated to {text_bytes / 1e6:.2f} MB, one document; "
              f"{args.rounds} round(s)")
        print(f"tokenizer: {which}")
        methods = ["nanoGPT"] + [f"prepare w{k}" for k in args.workers]
        rows: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                rows[method].append(run_isolated(method, tmp / "corpus.txt", tokenizer_file,
                                                 tmp / method.replace(" ", "-")))
        report(rows, text_bytes)


if __name__ == "__main__":
    main()
