"""`fastgpt compile-report`: what each shipped GPU kernel costs the hardware, without a GPU.

Triton: every launch config that a kernel module in fastgpt.kernels lists in ``aot_configs()``
(see fastgpt.tools.aot) is compiled for each named architecture to a cubin; ptxas reports registers
per thread and spilled bytes, Triton the shared memory per block. The occupancy bound is the
number of resident warps per SM those allow (fastgpt.tools.aot.occupancy_warps_per_sm). Compiles run
in one subprocess per architecture without TRITON_INTERPRET (interpreted kernels cannot be
compiled), so the command works from any process.

CUDA extension (fastgpt._C): its kernels are compiled by nvcc, not here; `.ci/check_cuda_ext.sh`
builds them with ``-Xptxas -v``. Given that build log (``--ext-log FILE``, or the file named by
FASTGPT_PTXAS_LOG, or ./build/ptxas-ext.log when present) the report adds one row per kernel and
architecture (``--ext-only``: only those, no Triton compiles). The log is read by the parser the
Triton compiles use (fastgpt.tools.aot.parse_ptxas_log). It does not say the block size, so their
occupancy bound counts registers only, per warp.

``--strict`` exits 1 when any config spills, needs more shared memory than a block may have,
cannot place one block on an SM, or fails to compile.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import queue
import re
import subprocess
import sys
import threading
from typing import Optional

import fastgpt.kernels
from fastgpt.errors import FastGPTError
from fastgpt.tools.aot import (ARCH_LIMITS, AOTConfig, KernelResources, check, compile_for_arch,
                               occupancy_warps_per_sm, parse_ptxas_log, warps_by_registers)

EXT_LOG_ENV = "FASTGPT_PTXAS_LOG"
EXT_LOG_DEFAULT = os.path.join("build", "ptxas-ext.log")


def kernel_modules() -> list[str]:
    """Every module of the fastgpt.kernels package (those without aot_configs are skipped later)."""
    # the package only (no kernels defined): its modules load in the workers
    return [f"fastgpt.kernels.{m.name}" for m in pkgutil.iter_modules(fastgpt.kernels.__path__)]


def parse_archs(spec: str) -> list[int]:
    archs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = re.fullmatch(r"(?:sm_)?(\d+)", item)
        if not m or int(m.group(1)) not in ARCH_LIMITS:
            raise FastGPTError(f"--arch {item!r}: known architectures are "
                               f"{', '.join(f'sm_{a}' for a in sorted(ARCH_LIMITS))}")
        archs.append(int(m.group(1)))
    if not archs:
        raise FastGPTError("--arch is empty; e.g. --arch sm_80,sm_90")
    return archs


def _dtype_of(signature: dict) -> str:
    """The element type of the first floating pointer argument: the config's data dtype."""
    for ty in signature.values():
        m = re.match(r"\*(fp16|bf16|fp32|fp64)", ty)
        if m:
            return m.group(1)
    return "-"


# --- the worker: one process per architecture, one JSON line per config ----------------------

def _figures(res: KernelResources, warps_per_sm: int) -> dict:
    """A row's measured columns and its problems (what makes it unshippable)."""
    return dict(registers=res.registers, spill_bytes=res.spill_bytes,
                shared_bytes=res.shared_bytes, warps_per_sm=warps_per_sm,
                max_warps=ARCH_LIMITS[res.arch]["max_warps_per_sm"],
                problems=check(res) + ([] if warps_per_sm else ["one block does not fit on an SM"]))


def _worker(arch: int, modules: list[str], dtypes: Optional[list[str]]) -> None:
    for module in modules:
        mod = importlib.import_module(module)
        if not hasattr(mod, "aot_configs"):
            continue
        kw = {}
        if dtypes and "dtypes" in inspect.signature(mod.aot_configs).parameters:
            kw["dtypes"] = tuple(dtypes)
        for c in map(lambda c: AOTConfig(*c), mod.aot_configs(**kw)):
            row = dict(source="triton", module=module, kernel=c.kernel.__name__, arch=arch,
                       dtype=_dtype_of(c.signature),
                       config=dict({k: v for k, v in c.constexprs.items()},
                                   num_warps=c.num_warps, num_stages=c.num_stages))
            try:
                r = compile_for_arch(c.kernel, c.signature, c.constexprs, arch, c.num_warps,
                                     c.num_stages)
            except Exception as e:   # report it as a row; --strict fails on it
                msg = (str(e).strip().splitlines() or [""])[-1][:300]
                row.update(problems=[f"compile failed: {type(e).__name__}: {msg}"])
            else:
                row.update(_figures(r, occupancy_warps_per_sm(r, arch)))
            print(json.dumps(row, default=str), flush=True)


# --- the CUDA extension's ptxas log ----------------------------------------------------------

def parse_ext_log(text: str, archs: list[int]) -> list[dict]:
    """Rows for the kernels of ``archs`` in an nvcc ``-Xptxas -v`` log (fastgpt.tools.aot reads
    it). A device function that ptxas did not inline gets a row only when it spills (its
    registers count in its callers')."""
    rows = []
    for f in parse_ptxas_log(text):
        if f.arch not in archs or not (f.entry or f.spill_bytes):
            continue
        row = dict(source="ext", module="fastgpt._C", kernel=_demangle(f.name), arch=f.arch,
                   dtype="-", config={})
        if f.entry:
            res = KernelResources(row["kernel"], f.arch, registers=f.registers,
                                  spill_bytes=f.spill_bytes, shared_bytes=f.shared_bytes)
            row.update(_figures(res, warps_by_registers(f.registers, f.arch)))
        else:
            row.update(spill_bytes=f.spill_bytes,
                       problems=[f"device function spills {f.spill_bytes} bytes"])
        rows.append(row)
    return rows


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt"], input=name, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    # "void fastgpt::ns::(anonymous namespace)::kernel<fastgpt::ns::Fwd<float> >(...)"
    # -> "kernel<Fwd<float> >"
    out = re.sub(r"^void |\(anonymous namespace\)::", "", out).split("(")[0]
    return re.sub(r"\b(?:\w+::)+", "", out)


def find_ext_log(path: Optional[str]) -> Optional[str]:
    if path:
        if not os.path.exists(path):
            raise FastGPTError(f"--ext-log {path}: no such file (FASTGPT_PTXAS_LOG={path} "
                               f"bash .ci/check_cuda_ext.sh writes it)")
        return path
    for candidate in (os.environ.get(EXT_LOG_ENV), EXT_LOG_DEFAULT):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


# --- output --------------------------------------------------------------------------------

_SHORT = {"num_warps": "w", "num_stages": "s", "HEAD_DIM": "hd", "BLOCK_D": "bd",
          "BLOCK_M": "bm", "BLOCK_N": "bn", "BLOCK_V": "bv", "DROPOUT": "drop",
          "DOT_PRECISION": "dot", "HAS_SOFTCAP": "softcap", "HAS_SMOOTHING": "smooth"}


def config_str(config: dict) -> str:
    def val(v):
        return {True: "1", False: "0", "True": "1", "False": "0"}.get(v, str(v)) \
            if isinstance(v, (bool, str)) else str(v)
    return " ".join(f"{_SHORT.get(k, k)}={val(v)}" for k, v in config.items()
                    if k not in ("UPCAST",))   # UPCAST is on only under the interpreter


HEADER = (f"{'arch':<6} {'kernel':<26} {'dtype':<5} {'config':<52} {'regs':>5} {'spill B':>8} "
          f"{'smem KB':>8} {'warps/SM':>9}  status")


def _label(r: dict) -> str:
    """The arch, kernel, dtype and config columns. The extension's kernels have no dtype or
    config but long template names: theirs spans all three columns, so that none is cut short."""
    if r["source"] == "ext":
        return f"{'sm_%d' % r['arch']:<6} {r['kernel'][:85]:<85}"
    return (f"{'sm_%d' % r['arch']:<6} {r['kernel'][:26]:<26} {r['dtype']:<5} "
            f"{config_str(r['config'])[:52]:<52}")


def format_row(r: dict) -> str:
    problems = r.get("problems") or []
    if "registers" not in r:
        return f"{_label(r)} {'FAIL: ' + '; '.join(problems)}"
    occ = f"{r['warps_per_sm']}/{r['max_warps']}"
    status = "PROBLEM: " + "; ".join(problems) if problems else "ok"
    return (f"{_label(r)} {r['registers']:>5} {r['spill_bytes']:>8} "
            f"{r['shared_bytes'] / 1024:>8.1f} {occ:>9}  {status}")


def compile_all(archs: list[int], modules: list[str], dtypes: Optional[list[str]],
                on_row=None) -> list[dict]:
    """Compile in one worker process per architecture, in parallel; rows as they finish."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for arch in archs:
        cmd = [sys.executable, "-m", "fastgpt.tools.compile_report", "--worker", str(arch),
               ",".join(modules), ",".join(dtypes or [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    lines: queue.Queue = queue.Queue()

    def pump(p):
        for line in p.stdout:
            lines.put(line)
        lines.put(None)
    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    rows, done = [], 0
    while done < len(procs):
        line = lines.get()
        if line is None:
            done += 1
        elif line.startswith("{"):
            rows.append(json.loads(line))
            if on_row:
                on_row(rows[-1])
    for arch, p in zip(archs, procs):
        err = p.stderr.read()
        if p.wait() != 0:
            raise FastGPTError(f"compiling for sm_{arch} failed: "
                               f"{(err.strip().splitlines() or ['no output'])[-1]}")
    return rows


def add_compile_report_parser(sub) -> None:
    p = sub.add_parser("compile-report", help="registers, spills, shared memory and occupancy "
                       "of every shipped GPU kernel config (no GPU needed)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on any spill, over-limit or failed config")
    p.add_argument("--modules", default=None,
                   help="comma-separated kernel modules (default: every fastgpt.kernels module "
                        "with aot_configs)")
    p.add_argument("--dtypes", default=None,
                   help="only these data types, e.g. fp16,fp32 (default: every shipped one)")
    p.add_argument("--ext-log", default=None, metavar="FILE",
                   help=f"nvcc -Xptxas -v build log of fastgpt._C (default: ${EXT_LOG_ENV} or "
                        f"{EXT_LOG_DEFAULT} when present)")
    p.add_argument("--ext-only", action="store_true",
                   help="report only the CUDA extension's kernels from the ptxas log (no Triton "
                        "compiles; .ci/check_cuda_ext.sh uses this)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    p.set_defaults(run=run_compile_report)


def run_compile_report(args) -> int:
    archs = parse_archs(args.arch)
    log = find_ext_log(args.ext_log)
    if args.ext_only and not log:
        raise FastGPTError(f"--ext-only needs the extension's ptxas log: pass --ext-log FILE "
                           f"or set {EXT_LOG_ENV} (.ci/check_cuda_ext.sh keeps its log there)")
    modules = [] if args.ext_only else (args.modules.split(",") if args.modules
                                        else kernel_modules())
    dtypes = args.dtypes.split(",") if args.dtypes else None
    print(f"# fastgpt compile-report: {', '.join(f'sm_{a}' for a in archs)}; modules: "
          f"{', '.join(modules) or 'none (--ext-only)'}"
          + (f"; dtypes: {', '.join(dtypes)}" if dtypes else ""))
    print("# warps/SM: resident warps per SM allowed by registers and shared memory (of the max)")
    print(HEADER, flush=True)
    rows = compile_all(archs, modules, dtypes,
                       on_row=lambda r: print(format_row(r), flush=True)) if modules else []
    if log:
        ext = parse_ext_log(open(log).read(), archs)
        print(f"# fastgpt._C (CUDA extension) from {log}; warps/SM from registers only "
              f"(the block size is not in the log)")
        for r in ext:
            print(format_row(r))
        rows += ext
    else:
        print(f"# fastgpt._C: no ptxas log read (pass --ext-log FILE with an nvcc -Xptxas -v "
              f"build log, e.g. from .ci/check_cuda_ext.sh, or set {EXT_LOG_ENV})")
    bad = [r for r in rows if r.get("problems")]
    for arch in archs:
        rs = [r for r in rows if r["arch"] == arch and "registers" in r]
        if rs:
            print(f"# sm_{arch}: {len(rs)} configs, max {max(r['registers'] for r in rs)} "
                  f"registers, {sum(r['spill_bytes'] > 0 for r in rs)} spilling, "
                  f"{sum(bool(r.get('problems')) for r in rs)} with problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if not rows and args.ext_only:
        raise FastGPTError(f"no ptxas -v lines for {', '.join(f'sm_{a}' for a in archs)} in {log} "
                           f"(build with FASTGPT_PTXAS_VERBOSE=1)")
    if not rows:
        raise FastGPTError(f"no kernel configs found in {', '.join(modules)} (a module lists "
                           f"them in aot_configs(); see fastgpt.tools.aot)")
    if bad:
        print(f"# {len(bad)} config(s) with problems" + ("" if args.strict else
                                                         " (--strict makes this an error)"))
    return 1 if (bad and args.strict) else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), sys.argv[3].split(","),
                [d for d in sys.argv[4].split(",") if d] or None)
    else:
        sys.exit("usage: fastgpt compile-report ... (python -m fastgpt.tools.compile_report is the "
                 "subprocess worker)")
