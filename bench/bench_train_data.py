"""Token-shard training data (issue 19): data time per step, resident memory against corpus size.

1. Data time. ``dataset.batch("train", B, gen)`` timed call by call in a loop (median of
   ``--calls`` calls per round), on the bundled tiny Shakespeare prepared as char shards
   (``fastgpt prepare``; ShardDataset), and as text (TextDataset, the character path, for
   comparison), B and the block size from the ``baby`` preset. The step: ``fastgpt.train.train``
   runs ``--step-iters`` float32 steps of the baby preset on the same data, and every call of
   its own ``_Run.train_step`` (forward, the next batch's fetch, backward, optimizer step) is
   timed, and with it the batch() calls made inside that step: medians over the steps after
   the first WARMUP_STEPS, and of the per-step ratio data/step, which compares times taken
   within the same step, so the load of a shared machine falls on both alike. The step time
   includes one batch fetch: training draws the next batch right after each forward pass
   (BatchStream.prefetch), in the same thread, so the data time is on the critical path, not
   hidden behind compute. A reference that is not fastgpt's is measured the same way: the
   ShardDataset with memory maps kept open (open_shard cached), as a reader that keeps maps would.
   Rounds run the three paths in turn. Target of the issue: data under 1% of the step.
2. Resident memory. Synthetic version-1 shards (uniform random uint16 tokens below the char
   vocabulary, 65, and a meta.json naming that tokenizer, so the baby model trains on them):
   a ``--small-mb`` set and a ``--big-mb`` set of shards of ``--shard-tokens`` tokens, written
   in chunks through numpy memmaps in a temporary folder deleted at the end. Each set trains
   ``--rss-iters`` baby iterations in a fresh ``python -m fastgpt train --data DIR`` process
   whose /proc/PID/status is read every 0.1 s: peak VmRSS (sampled, and the kernel's VmHWM),
   with its file-backed part (RssFile); VmRSS when the last estimate is printed (end of
   training, the last checkpoint being written) and when ``done:`` is printed (train()
   returned: loss.png written, matplotlib loaded), with the mappings of shard files the process
   holds then. The sets alternate over ``--rss-rounds`` rounds; medians. The issue's claim: the
   same resident memory within a few MB. Mind the noise: identical runs of the same set (the
   same backends, address randomisation off or on) differ by up to about 10 MB of anonymous
   memory (the malloc heap) on a 2-core AVX2 machine, so compare the medians with the spread
   the table prints.
   An in-process check on the big set says why: after ``--diag-batches`` batches, how many
   mappings of shard files /proc/self/maps still holds and how much RssFile (file-backed
   pages mapped here: page-cache pages count once mapped) and RssAnon grew, with fresh
   maps (fastgpt) and with the maps kept open (the reference above), which shows the check
   would see a leak.

Page cache: the synthetic shards were just written, so their pages are in the page cache
(timings and memory are for a warm cache; a cold cache adds disk reads to each batch). Timings
are medians with min-max over rounds; the machine and its CPU flags are printed first. Not a
test: run it by hand.

    python bench/bench_train_data.py                       # 10 MB vs 1 GB, 3 rounds
    python bench/bench_train_data.py --big-mb 300 --rss-rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from fastgpt import config as cfgmod
from fastgpt.data import TextDataset, bundled_text_path, read_text
from fastgpt.device import describe
from fastgpt.prepare import PrepareOptions, prepare
from fastgpt.shard_dataset import ShardDataset
from fastgpt.shards import HEADER_BYTES, HEADER_INTS, MAGIC, META_NAME, TOKEN_DTYPES, open_shard
from fastgpt.tokenizers import CharLevelTokenizer
from fastgpt.tools.environment import environment, format_env
from fastgpt.train import RunOptions, _Run, train

PRESET = "baby"
WARMUP_STEPS = 10        # training steps left out of the medians
CHUNK_TOKENS = 1 << 23   # tokens per memmap chunk when writing a synthetic shard (16 MB)


def spread(values: list[float], fmt: str = ".3f") -> str:
    """'median (min-max)' of values."""
    return (f"{statistics.median(values):{fmt}} "
            f"({min(values):{fmt}}-{max(values):{fmt}})")


# ---------------------------------------------------------------- 1. data time per step

def median_call_ms(fn, calls: int) -> float:
    """The median wall time of one call of ``fn``, in ms, over ``calls`` calls."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def kept_maps():
    """open_shard cached: the shards' maps stay open (a reference, not what fastgpt does)."""
    return mock.patch("fastgpt.shard_dataset.open_shard", functools.cache(open_shard))


@contextlib.contextmanager
def step_clock(dataset_cls):
    """Times fastgpt's own training steps (``_Run.train_step``: forward, the next batch's
    fetch, backward, optimizer step) one by one, and the ``dataset_cls.batch`` calls made
    inside each: yields {"step": [s, ...], "data": [s, ...]}, one entry per step."""
    times = {"step": [], "data": []}
    in_step = []                       # the data seconds of the step running now
    real_step, real_batch = _Run.train_step, dataset_cls.batch

    def train_step(run):
        in_step.append(0.0)
        t0 = time.perf_counter()
        loss = real_step(run)
        times["step"].append(time.perf_counter() - t0)
        times["data"].append(in_step.pop())
        return loss

    def batch(dataset, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_batch(dataset, *args, **kwargs)
        if in_step:
            in_step[-1] += time.perf_counter() - t0
        return out

    with mock.patch.object(_Run, "train_step", train_step), \
            mock.patch.object(dataset_cls, "batch", batch):
        yield times


def train_steps(data: str | None, dataset_cls, out_dir: Path, iters: int,
                eval_iters: int) -> dict[str, float]:
    """One fastgpt.train.train run of the baby preset in float32: the medians (warm-up steps
    dropped) of the step time, the data time inside a step and their per-step ratio."""
    opts = RunOptions(data=data, preset=PRESET, device="cpu", dtype="float32",
                      out_dir=str(out_dir), overwrite=True, sample_chars=0, progress=False,
                      header=False, overrides={"max_iters": iters, "eval_interval": iters,
                                               "eval_iters": eval_iters})
    with step_clock(dataset_cls) as times, contextlib.redirect_stdout(io.StringIO()):
        train(opts)
    steps, data = times["step"][WARMUP_STEPS:], times["data"][WARMUP_STEPS:]
    return {"step": 1e3 * statistics.median(steps), "data": 1e3 * statistics.median(data),
            "ratio": statistics.median(d / s for d, s in zip(data, steps))}


def data_time(args, tmp: Path, batch_size: int, block_size: int) -> float:
    """Part 1; returns the median step ms of the shard runs."""
    shards = str(tmp / "shakespeare-char")
    prepare(PrepareOptions(inputs=[str(bundled_text_path())], tokenizer="char", out_dir=shards,
                           progress=False))
    text = read_text()
    # name: (--data, dataset class, a dataset for the loop, keep the maps open)
    paths = {
        "token shards (ShardDataset)": (shards, ShardDataset, ShardDataset(shards, block_size),
                                        False),
        "text (TextDataset)": (None, TextDataset, TextDataset(
            text, CharLevelTokenizer.from_text(text), block_size), False),
        "shards, maps kept open (reference)": (shards, ShardDataset,
                                               ShardDataset(shards, block_size), True),
    }
    loop: dict[str, list[float]] = {name: [] for name in paths}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            data, cls, dataset, keep = paths[name]
            with kept_maps() if keep else contextlib.nullcontext():
                gen = torch.Generator().manual_seed(r)
                loop[name].append(median_call_ms(
                    lambda: dataset.batch("train", batch_size, gen), args.calls))
                runs[name].append(train_steps(data, cls, tmp / "run", args.step_iters,
                                              args.eval_iters))
    print(f"\n1. data time per step: {PRESET} preset (batch {batch_size} x block {block_size}), "
          f"float32, {torch.get_num_threads()} threads, {args.rounds} round(s), the paths in "
          f"turn.")
    print(f"   batch() loop: the median of {args.calls} calls of dataset.batch('train', "
          f"{batch_size}, gen) in a loop. step: fastgpt.train.train runs {args.step_iters} "
          f"steps; each call of its _Run.train_step (forward, the next batch's fetch, backward, "
          f"optimizer step) is timed, and the batch() calls inside it (in-step data); medians "
          f"over the steps after the first {WARMUP_STEPS}, and of the per-step ratio.")
    print("   Training fetches the next batch right after the forward pass, in the same thread: "
          "the data time is on the critical path, inside the step time.")
    print("   Median (min-max) over rounds.")
    print(f"   {'data path':<36} {'batch() ms, loop':>24} {'step ms':>22} {'loop/step':>9} "
          f"{'in-step data ms':>24} {'in-step/step':>20}")
    for name in paths:
        step = [run["step"] for run in runs[name]]
        print(f"   {name:<36} {spread(loop[name], '.4f'):>24} {spread(step, '.1f'):>22} "
              f"{100 * statistics.median(loop[name]) / statistics.median(step):>8.2f}% "
              f"{spread([run['data'] for run in runs[name]], '.4f'):>24} "
              f"{spread([100 * run['ratio'] for run in runs[name]], '.2f'):>19}%")
    shard = "token shards (ShardDataset)"
    ratio = statistics.median(run["ratio"] for run in runs[shard])
    looped = (statistics.median(loop[shard])
              / statistics.median(run["step"] for run in runs[shard]))
    print(f"   target of issue 19: shard data under 1% of the step; measured {100 * ratio:.2f}% "
          f"in the step ({'under' if ratio < 0.01 else 'NOT under'} 1%), loop/step "
          f"{100 * looped:.2f}% ({'under' if looped < 0.01 else 'NOT under'} 1%)")
    return statistics.median(run["step"] for run in runs[shard])


# ---------------------------------------------------------------- 2. resident memory

def write_synthetic(folder: Path, tokens: int, shard_tokens: int, vocab_size: int,
                    spec: dict, seed: int) -> tuple[int, int]:
    """Version-1 shards of uniform random tokens below ``vocab_size``, written chunk by chunk
    through memmaps (the writer never holds a shard), and a meta.json naming ``spec``.
    Returns (shard count, bytes)."""
    folder.mkdir(parents=True)
    dtype = TOKEN_DTYPES[1]
    rng = np.random.default_rng(seed)
    val = min(shard_tokens, max(tokens // 100, 4096))
    train_tokens = tokens - val
    n_train = -(-train_tokens // shard_tokens)
    sizes = [("val", val)] + [("train", train_tokens // n_train + (i < train_tokens % n_train))
                              for i in range(n_train)]
    prefix = folder.name.replace("_", "-")
    total = 0
    for index, (split, count) in enumerate(sizes):
        path = folder / f"{prefix}_{split}_{index:06d}.bin"
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, 1, count)
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.truncate(HEADER_BYTES + count * dtype.itemsize)
        for start in range(0, count, CHUNK_TOKENS):
            n = min(CHUNK_TOKENS, count - start)
            chunk = np.memmap(path, dtype=dtype, mode="r+",
                              offset=HEADER_BYTES + start * dtype.itemsize, shape=(n,))
            chunk[:] = rng.integers(0, vocab_size, size=n, dtype=np.uint16)
            chunk.flush()
            del chunk
        total += path.stat().st_size
    (folder / META_NAME).write_text(json.dumps({"format": "fastgpt-shards-1", "tokenizer": spec,
                                                "vocab_size": vocab_size,
                                                "note": "synthetic: uniform random tokens"}))
    return len(sizes), total


def proc_status(pid: int | str) -> dict[str, float]:
    """The memory lines of /proc/PID/status, in MB ({} once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out


def train_child(data: Path, out_dir: Path, iters: int, eval_iters: int) -> dict:
    """A fresh `python -m fastgpt train --data DIR` process, its memory read every 0.1 s."""
    argv = [sys.executable, "-m", "fastgpt", "train", "--data", str(data), "--preset", PRESET,
            "--device", "cpu", "--dtype", "float32", "--max-iters", str(iters),
            "--eval-interval", str(iters), "--eval-iters", str(eval_iters), "--sample-chars",
            "0", "--no-progress", "--out-dir", str(out_dir), "--overwrite"]
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=out_dir.parent)
    at: dict[str, dict] = {}
    output: dict[str, str] = {}

    def read(name, stream):
        lines = []
        for line in stream:
            lines.append(line)
            if name == "stdout" and line.startswith(f"iter {iters}:"):   # the last estimate
                at["end"] = proc_status(child.pid)
            if name == "stdout" and line.startswith("done:"):   # train() has returned
                at["done"] = proc_status(child.pid)
                at["done"]["maps"] = shard_mappings(data, child.pid)
        output[name] = "".join(lines)

    readers = [threading.Thread(target=read, args=(n, s))
               for n, s in (("stdout", child.stdout), ("stderr", child.stderr))]
    for reader in readers:
        reader.start()
    samples = []
    while child.poll() is None:
        status = proc_status(child.pid)
        if "VmRSS" in status:
            samples.append(status)
        time.sleep(0.1)
    for reader in readers:
        reader.join()
    if child.returncode != 0:
        raise SystemExit(f"training on {data} failed ({child.returncode}):\n"
                         f"{output.get('stderr', '')[-3000:]}")
    peak = max(samples, key=lambda s: s["VmRSS"])
    return {"peak": peak["VmRSS"], "peak_file": peak.get("RssFile", float("nan")),
            "hwm": samples[-1].get("VmHWM", float("nan")),
            "end": at.get("end", {}).get("VmRSS", float("nan")),
            "done": at.get("done", {}).get("VmRSS", float("nan")),
            "maps": at.get("done", {}).get("maps", -1),
            "seconds": time.perf_counter() - t0, "samples": len(samples)}


def shard_mappings(folder: Path, pid: int | str = "self") -> int:
    """How many of the process's mappings are files in ``folder`` (-1 once it is gone)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    return sum(f"{folder}/" in line for line in maps.splitlines())


def maps_check(folder: Path, block_size: int, batch_size: int, batches: int) -> list[tuple]:
    """(way, maps left, RssFile and RssAnon growth MB, ms/batch) over ``batches`` batches of
    the set, after a first one."""
    def one(way: str) -> tuple:
        dataset = ShardDataset(str(folder), block_size)
        gen = torch.Generator().manual_seed(0)
        dataset.batch("train", batch_size, gen)   # the first call's allocations
        before = proc_status("self")
        ms = median_call_ms(lambda: dataset.batch("train", batch_size, gen), batches)
        after = proc_status("self")
        return (way, shard_mappings(folder), after["RssFile"] - before["RssFile"],
                after["RssAnon"] - before["RssAnon"], ms)

    rows = [one("pread per window (fastgpt)")]
    with kept_maps():
        rows.append(one("maps kept open (reference)"))
    return rows


def resident_memory(args, tmp: Path, batch_size: int, block_size: int,
                    step_ms: float) -> None:
    text = read_text()
    tokenizer = CharLevelTokenizer.from_text(text)
    dtype = TOKEN_DTYPES[1]
    print(f"\n2. resident memory: synthetic shard sets in {tmp}")
    sets = {}
    for label, mb in (("small", args.small_mb), ("big", args.big_mb)):
        folder = tmp / f"synthetic_{label}"
        tokens = int(mb * 1e6) // dtype.itemsize
        t0 = time.perf_counter()
        count, size = write_synthetic(folder, tokens, int(args.shard_tokens),
                                      tokenizer.vocab_size, tokenizer.spec, seed=len(sets))
        sets[label] = folder
        print(f"   {label} set: {count} shards ({count - 1} train + 1 val), {tokens:,} tokens, "
              f"{size / 1e6:,.1f} MB, written in {time.perf_counter() - t0:.1f} s")
    runs: dict[str, list[dict]] = {label: [] for label in sets}
    for r in range(args.rss_rounds):
        for label in (list(sets) if r % 2 == 0 else list(reversed(sets))):
            runs[label].append(train_child(sets[label], tmp / "child", args.rss_iters,
                                           args.eval_iters))
    print(f"   resident memory (MB) of `python -m fastgpt train --data DIR --preset {PRESET} "
          f"--max-iters {args.rss_iters} --eval-iters {args.eval_iters} --dtype float32`, a "
          f"fresh process per run, /proc/PID/status every 0.1 s; sets alternate over "
          f"{args.rss_rounds} round(s)")
    print("   peak = largest VmRSS sampled (its file-backed part: RssFile), HWM = the kernel's "
          "VmHWM, end = VmRSS when the last estimate is printed (the last checkpoint is being "
          "written), done = VmRSS when `done:` is printed (train() returned: checkpoint and "
          "loss.png written, matplotlib loaded); maps = mappings of shard files then")
    keys = ("peak", "peak_file", "hwm", "end", "done")
    print(f"   {'set':<6} {'round':>5} {'peak':>8} {'(file)':>7} {'HWM':>8} {'end':>8} "
          f"{'done':>8} {'maps':>5} {'s':>6}")
    for label, rows in runs.items():
        for r, row in enumerate(rows):
            print(f"   {label:<6} {r + 1:>5} "
                  + " ".join(f"{row[k]:>{7 if k == 'peak_file' else 8}.1f}" for k in keys)
                  + f" {row['maps']:>5} {row['seconds']:>6.1f}")
    medians = {label: {k: statistics.median(row[k] for row in rows) for k in keys}
               for label, rows in runs.items()}
    for label, m in medians.items():
        print(f"   {label:<6} {'med':>5} "
              + " ".join(f"{m[k]:>{7 if k == 'peak_file' else 8}.1f}" for k in keys))
    diff = {k: medians["big"][k] - medians["small"][k] for k in keys}
    widest = max(max(r["peak"] for r in rows) - min(r["peak"] for r in rows)
                 for rows in runs.values())
    print(f"   big - small (medians): peak {diff['peak']:+.1f} (file {diff['peak_file']:+.1f}), "
          f"HWM {diff['hwm']:+.1f}, end {diff['end']:+.1f}, done {diff['done']:+.1f} MB; "
          f"one set's peaks spread over up to {widest:.1f} MB")

    print(f"\n   in this process, {args.diag_batches} batches of the big set "
          f"({len(list(sets['big'].glob('*_train_*.bin')))} train shards):")
    print(f"   {'way':<32} {'maps left':>9} {'RssFile +MB':>12} {'RssAnon +MB':>12} "
          f"{'ms/batch':>9} {'of step':>8}")
    for way, maps, file_mb, anon_mb, ms in maps_check(sets["big"], block_size, batch_size,
                                                      args.diag_batches):
        print(f"   {way:<32} {maps:>9} {file_mb:>12.1f} {anon_mb:>12.1f} {ms:>9.4f} "
              f"{100 * ms / step_ms:>7.2f}%")
    print(f"   (of step: against the median step of part 1, {step_ms:.1f} ms; a batch opens each "
          f"shard it reads, up to min(batch, shards) per batch)")


# ---------------------------------------------------------------- main

def print_machine() -> None:
    env = environment("cpu")
    print(f"# {format_env(env)}")
    for key, value in (("cpu", describe(torch.device("cpu"))), ("threads", env["threads"]),
                       ("torch", torch.__version__), ("numpy", np.__version__),
                       ("git", env["git_sha"]),
                       ("load", "%.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg())):
        print(f"   {key:<8} {value}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of part 1 (default 3)")
    p.add_argument("--calls", type=int, default=3000, help="batch() calls per round (default 3000)")
    p.add_argument("--step-iters", type=int, default=200,
                   help=f"training steps per step measurement (default 200; the first "
                        f"{WARMUP_STEPS} are left out)")
    p.add_argument("--eval-iters", type=int, default=2,
                   help="eval_iters of every training run (default 2)")
    p.add_argument("--small-mb", type=float, default=10, help="small shard set, MB (default 10)")
    p.add_argument("--big-mb", type=float, default=1000, help="big shard set, MB (default 1000)")
    p.add_argument("--shard-tokens", type=float, default=1e8,
                   help="tokens per synthetic shard (default 1e8: 200 MB)")
    p.add_argument("--rss-rounds", type=int, default=3, help="rounds of part 2 (default 3)")
    p.add_argument("--rss-iters", type=int, default=200,
                   help="iterations of each memory run (default 200)")
    p.add_argument("--diag-batches", type=int, default=2000,
                   help="batches of the in-process maps check (default 2000)")
    p.add_argument("--tmp", default=None, help="where the temporary folder goes (default: "
                   "the system's temporary directory)")
    args = p.parse_args(argv)
    if args.step_iters <= WARMUP_STEPS:
        p.error(f"--step-iters {args.step_iters}: need > {WARMUP_STEPS} (the first "
                f"{WARMUP_STEPS} steps are left out as warm-up)")
    need = (args.small_mb + args.big_mb) * 1e6 * 1.05 + 100e6
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free
    if free < need:
        p.error(f"the shard sets need about {need / 1e9:.2f} GB in "
                f"{args.tmp or tempfile.gettempdir()}, {free / 1e9:.2f} GB free: use a smaller "
                f"--big-mb or another --tmp")
    mcfg, tcfg = cfgmod.preset(PRESET)
    print_machine()
    with tempfile.TemporaryDirectory(prefix="bench-train-data-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        step_ms = data_time(args, tmp, tcfg.batch_size, mcfg.block_size)
        resident_memory(args, tmp, tcfg.batch_size, mcfg.block_size, step_ms)
    print("\nload at the end: %.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg())


if __name__ == "__main__":
    main()
