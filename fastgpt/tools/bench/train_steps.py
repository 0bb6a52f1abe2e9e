"""`fastgpt bench train`: training-step speed of a preset per backend set and dtype.

Each configuration runs the real training loop (``fastgpt.train.train``) for a short run; the
per-log-interval throughput rows of its metrics.jsonl give tokens/s and ms/iter, with the first
two intervals dropped as warm-up. Configurations run interleaved over several rounds so that a
noisy neighbour hurts them alike. MFU is the run's own (fastgpt.flops: model FLOPs per token
from its run row, over a GPU's data-sheet peak for the dtype, or on a CPU the rate a matmul probe
measured at the run's start); "unknown" for a GPU without a data-sheet entry.

``... unlabelled`` configurations run without the profiler labels (fastgpt.ops.labels): what a
step cost before they existed, to show that they cost nothing measurable when not profiling.

A configuration is a name from CONFIGS or a spec ``op=backend[,op=backend...][@dtype]``, e.g.
``attention=tril,embedding=ext@bfloat16`` (ops: attention, cross_entropy, embedding,
transformer_block). ``default bf16`` names no backend: what `fastgpt train` runs in bfloat16.
A bfloat16 configuration on a CPU without native bf16 is skipped, its row saying why, as
`fastgpt train` refuses it there (fastgpt.precision; FASTGPT_ALLOW_EMULATED_BF16=1 runs it).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Optional
from unittest import mock

from fastgpt.config import BACKEND_FIELDS, backend_field, tokens_per_iter
from fastgpt.config import preset as get_preset
from fastgpt.device import resolve_device
from fastgpt.errors import FastGPTError
from fastgpt.flops import Throughput
from fastgpt.ops.registry import Backend
from fastgpt.precision import emulated_bf16_refusal, resolve_dtype_name
from fastgpt.tools.bench.harness import summarize, write_csv
from fastgpt import train as train_module
from fastgpt.train import RunOptions, train

CONFIGS = {
    "sdpa fp32": dict(attention="sdpa", dtype="float32"),
    "tril fp32": dict(attention="tril", dtype="float32"),
    "sdpa bf16": dict(attention="sdpa", dtype="bfloat16"),
    "triton bf16": dict(attention="triton", dtype="bfloat16"),
    "tril bf16": dict(attention="tril", dtype="bfloat16"),
    "torch-block bf16": dict(transformer_block="torch", dtype="bfloat16"),
    "default bf16": dict(dtype="bfloat16"),
    "default fp32": dict(dtype="float32"),
    "default fp32 unlabelled": dict(dtype="float32", labels=False),
    "default bf16 unlabelled": dict(dtype="bfloat16", labels=False),
}
DEFAULT = {"cpu": ["sdpa fp32", "tril fp32", "sdpa bf16", "torch-block bf16", "default bf16"],
           "cuda": ["triton bf16", "sdpa bf16", "tril bf16"]}


def parse_config(spec: str) -> dict:
    """A CONFIGS name or ``op=backend,...[@dtype]`` -> {field: backend, ..., "dtype": dtype}."""
    if spec in CONFIGS:
        return dict(CONFIGS[spec])
    backends, _, dtype = spec.partition("@")
    out = {"dtype": dtype or "float32"}
    for item in filter(None, backends.split(",")):
        op, eq, name = item.partition("=")
        try:
            field = backend_field(op.strip())
        except FastGPTError:
            field = None
        if not eq or field is None:
            raise FastGPTError(f"bad train config {spec!r}: use a name ({', '.join(CONFIGS)}) or "
                               f"op=backend[,op=backend][@dtype] with ops "
                               f"{', '.join(BACKEND_FIELDS)}")
        out[field] = name.strip()
    return out


def add_train_args(p) -> None:
    g = p.add_argument_group("bench train")
    g.add_argument("--preset", default="baby", help="model/training preset (default: baby)")
    g.add_argument("--iters", type=int, default=100, help="training iterations per run")
    g.add_argument("--rounds", type=int, default=3, help="interleaved runs per configuration")
    g.add_argument("--configs", default=None,
                   help="';'-separated configurations (names or op=backend,...@dtype); "
                        f"default on cpu: {'; '.join(DEFAULT['cpu'])}")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


@contextlib.contextmanager
def labels_removed():
    """Steps as they ran before the profiler labels: a backend call is its function, the loop's
    label contexts do nothing, not even the check whether a profiler records."""
    with mock.patch.object(Backend, "__call__", lambda self, *a, **kw: self.fn(*a, **kw)), \
            mock.patch.object(train_module, "labelled", lambda name: contextlib.nullcontext()):
        yield


def run_once(preset: str, iters: int, config: dict, compile: bool,
             device: str) -> tuple[list[float], dict]:
    """tokens/s of each log interval after the first two, and the run's `run` row (its FLOPs
    per token and the peak its MFU divides by)."""
    config = dict(config)
    dtype = config.pop("dtype")
    labelled = config.pop("labels", True)
    with tempfile.TemporaryDirectory() as out:
        opts = RunOptions(preset=preset, out_dir=out, device=device, dtype=dtype, compile=compile,
                          progress=False, header=False, sample_chars=0,
                          overrides=dict(max_iters=iters, eval_interval=10 ** 9, eval_iters=1,
                                         log_interval=10, **config))
        with contextlib.nullcontext() if labelled else labels_removed():
            train(opts)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    run_row = next(r for r in rows if r["kind"] == "run")
    return [r["tokens_per_s"] for r in rows if r["kind"] == "train"][2:], run_row   # drop warm-up


def refused(configs: dict[str, dict], device: str) -> dict[str, str]:
    """{name: why} of the configurations `fastgpt train` would refuse on ``device`` before
    training: bfloat16 on a CPU that only emulates it (fastgpt.precision)."""
    device_type = resolve_device(device).type
    out = {}
    for name, config in configs.items():
        why = emulated_bf16_refusal(resolve_dtype_name(config["dtype"], device_type), device_type)
        if why is not None:
            out[name] = why
    return out


def run_train_bench(args, env: dict) -> list[dict]:
    """Each configuration's ms/iter, tokens/s, TFLOP/s and MFU, printed and returned as rows
    (a configuration `fastgpt train` refuses here is a row with ``skipped``: why)."""
    device = args.device
    names = [s.strip() for s in args.configs.split(";")] if args.configs else \
        DEFAULT["cuda" if device.startswith("cuda") else "cpu"]
    configs = {n: parse_config(n) for n in names}
    if args.iters < 30:
        raise FastGPTError(f"--iters {args.iters}: need >= 30 (log every 10 iterations, the "
                           f"first two intervals are warm-up)")
    skipped = refused(configs, device)
    m, t = get_preset(args.preset)
    iter_tokens = tokens_per_iter(m, t)
    samples, run_rows = {n: [] for n in names}, {}
    for _ in range(args.rounds):
        for n in names:
            if n not in skipped:
                got, run_rows[n] = run_once(args.preset, args.iters, configs[n], args.compile,
                                            device)
                samples[n] += got
    base_name = next((n for n in names if n not in skipped), names[0])
    print(f"\n# bench train: preset={args.preset} iters={args.iters} rounds={args.rounds} "
          f"tokens/iter={iter_tokens} compile={args.compile}", flush=True)
    print(f"  {'config':<26} {'ms/iter':>9} {'p20-p80 ms':>17} {'tokens/s':>10} "
          f"{'vs ' + base_name:>14} {'TFLOP/s':>8} {'MFU':>8}")
    rows, base = [], None
    for n in names:
        if n in skipped:
            rows.append(dict(config=n, skipped=skipped[n]))
            print(f"  {n:<26} skipped: {skipped[n]}", flush=True)
            continue
        row = _row(n, samples[n], run_rows[n], iter_tokens, base)
        base = base or row["ms_per_iter"]
        rows.append(row)
    if args.csv:
        _write_csv(rows, configs, args, env)
    return rows


def _row(name: str, samples: list[float], run_row: dict, iter_tokens: int,
         base: Optional[float]) -> dict:
    """One measured configuration's row (printed): ms/iter against ``base`` (None: this is the
    baseline), tokens/s, TFLOP/s and MFU from the run's own `run` row."""
    ms = summarize([1e3 * iter_tokens / s for s in samples])
    base = base or ms["median"]
    tok_s = 1e3 * iter_tokens / ms["median"]
    row = dict(config=name, ms_per_iter=ms["median"], p20_ms=ms["p20"], p80_ms=ms["p80"],
               tokens_per_s=tok_s, speedup=base / ms["median"])
    rates = Throughput(run_row["flops_per_token"] or 0.0, run_row["peak_tflops"],
                       run_row["peak_source"] or "", run_row["world_size"])
    row.update(tflops=rates.tflops(tok_s), mfu=rates.mfu(tok_s),
               peak_source=run_row["peak_source"])
    mfu = "unknown" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    print(f"  {name:<26} {ms['median']:9.2f} {ms['p20']:8.2f}-{ms['p80']:<8.2f} "
          f"{tok_s:10.0f} {base / ms['median']:13.2f}x {row['tflops']:8.3g} {mfu:>8}",
          flush=True)
    return row


def _write_csv(rows: list[dict], configs: dict, args, env: dict) -> None:
    write_csv([dict(op="train", provider=r["config"], mode="fwd+bwd",
                    shape=f"preset={args.preset}", dtype=configs[r["config"]]["dtype"],
                    **({"skipped": r["skipped"]} if "skipped" in r else
                       dict(median_ms=r["ms_per_iter"], p20_ms=r["p20_ms"], p80_ms=r["p80_ms"],
                            rate=r["tokens_per_s"], unit="tokens/s", speedup=r["speedup"])))
               for r in rows], args.csv, env)
    print(f"appended {len(rows)} rows to {args.csv}")
