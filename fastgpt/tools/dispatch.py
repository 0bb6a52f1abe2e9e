"""`fastgpt dispatch`: the backend choices measured dispatch has cached on this machine
(fastgpt.ops.measured), one row per signature with every candidate's time, and the CPU matmul
peaks a training run's MFU divides by (fastgpt.flops); `--clear` forgets both, so the next run
measures again."""

from __future__ import annotations

from fastgpt import flops
from fastgpt.ops import measured
from fastgpt.tools.formatting import number


def _times(entry: dict) -> str:
    parts = [f"{name} {number(ms, '.3g')} ms" for name, ms in entry["times_ms"].items()]
    parts += [f"{name} failed ({why})" for name, why in entry.get("failed", {}).items()]
    return ", ".join(parts)


def format_table(entries: list[dict], markdown: bool = False) -> str:
    """The cached choices as text (or a Markdown table): op, device, dtype, shape, mode, chosen
    backend, each candidate's median time (forward, plus backward when training)."""
    head = ["op", "device", "dtype", "shape", "mode", "chosen", "candidates (median)"]
    rows = [[e["op"], e["device"], e["dtype"], e["shape"], e["mode"], e["chosen"], _times(e)]
            for e in sorted(entries, key=lambda e: (e["op"], e["device"], e["dtype"], e["shape"]))]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
                     for r in [head] + rows)


def add_dispatch_parser(sub) -> None:
    p = sub.add_parser("dispatch", help="show (or --clear) the backend choices measured on this "
                       "machine",
                       description="Measured dispatch times each candidate backend the first time "
                       "an op meets a new signature and caches the fastest (on CUDA by default; "
                       f"on the CPU with {measured.MODE_VAR}=measure). This prints that cache.")
    p.add_argument("--clear", action="store_true",
                   help="forget every cached choice, and the cached CPU matmul peaks (the "
                        "probe `fastgpt train` times for MFU on a CPU)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    path = measured.cache_path()
    if args.clear:
        removed = measured.clear_cache()
        print(f"removed {removed} cached choice(s) from {path}")
        print(f"removed {flops.clear_peak_cache()} cached CPU matmul peak(s) from "
              f"{flops.peak_cache_path()}")
        return 0
    entries = list(measured.read_cache().values())
    print(f"# {len(entries)} cached choice(s) in {path} (this torch, triton and fastgpt)")
    if entries:
        print(format_table(entries))
    peaks = flops.read_peak_cache()
    print(f"# {len(peaks)} cached CPU matmul peak(s) in {flops.peak_cache_path()}")
    for key, e in sorted(peaks.items()):
        print(f"{key}: {e.get('tflops', float('nan')):.3g} TFLOP/s ({e.get('measured', '?')})")
    return 0
