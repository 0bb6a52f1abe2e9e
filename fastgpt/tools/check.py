"""`fastgpt check`: validate every available backend of every op against float64 references.

How a user checks a new GPU, driver or Triton version before trusting a training run. For each
op, backend, dtype and shape of a grid (odd T, several head dims and vocabulary sizes, ignored
targets, padding rows, non-contiguous inputs), the backend's forward output and its gradients
(from a random grad_output) are compared with plain PyTorch in float64 on the same (rounded)
inputs. The rule is fastgpt.tools.accuracy's: largest error and scale error each at most 2x those of
plain PyTorch computing in the same dtype, plus a floor of about one unit in the last place at the
reference's magnitude. One row per forward and per backward (the worst gradient); exit status 1
if any row fails.

On a machine without CUDA the Triton kernels run through the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by the command before any kernel is defined): that checks the kernels'
arithmetic, not the GPU code generation, and the output says so.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from fastgpt.device import resolve_device
from fastgpt.errors import FastGPTError
from fastgpt.ops import BlockWeights, registry
from fastgpt.ops._triton import interpreting
from fastgpt.ops.registry import OPS, canonical_op
from fastgpt.tools.accuracy import compare
from fastgpt.tools.environment import environment, format_env
from fastgpt.tools.formatting import number
REFERENCE = "torch"     # every op's plain-PyTorch backend: the float64 reference and the baseline
# Teaching versions checked in float32/float64 only unless named with --backend: the lecture's
# loop adds each row's dK/dV contribution into bfloat16/float16 gradients one step at a time, so
# its low-precision gradients drift with T by design (it is never a default backend).
FULL_PRECISION_ONLY = {("attention", "loop"): "the lecture's loop accumulates gradients row by "
                                               "row in the input dtype; float32 only"}


@dataclass
class CheckRow:
    op: str
    backend: str
    dtype: str
    shape: str
    part: str                       # "fwd" or "bwd <tensor>"
    max_abs_err: Optional[float] = None
    plain_err: Optional[float] = None   # plain PyTorch in the same dtype
    ratio: Optional[float] = None       # max_abs_err / plain_err
    result: str = "PASS"            # PASS, FAIL or SKIP
    note: str = ""


# --- the grid ---------------------------------------------------------------------------------
# Each case: (label, make) where make(gen) -> (float64 leaves, other inputs, view, call).
#   leaves: {name: float64 tensor} that get gradients; view(leaves) -> the op's tensor inputs
#   (non-contiguous where the case says so); call(fn, *inputs) runs one backend.

def _attention_case(B, H, T, D):
    def make(gen):
        x = torch.randn(B, T, 3, H, D, generator=gen, dtype=torch.float64)

        def view(leaves):   # q, k, v (B, H, T, D): strided views of (B, T, H, D), as the model has
            return tuple(leaves[n].transpose(1, 2) for n in "qkv")
        # one leaf per input, so that each gradient is judged on its own
        return dict(zip("qkv", x.unbind(2))), view, \
            lambda fn, q, k, v: fn(q, k, v, scale=None, dropout_p=0.0)
    return f"B={B} H={H} T={T} D={D} (strided)", make


def _ce_case(N, V, ignored, **opts):
    def make(gen):
        wide = torch.randn(N, V + 3, generator=gen, dtype=torch.float64) * 2
        t = torch.randint(0, V, (N,), generator=gen)
        t[:ignored] = -100

        def view(leaves):   # logits (N, V) inside a wider buffer: row stride V + 3
            return leaves["logits"][:, :V], t
        return {"logits": wide}, view, lambda fn, x, tt: fn(x, tt, **_ce_kwargs(opts))
    extra = "".join(f" {k}={v}" for k, v in opts.items())
    return f"N={N} V={V} ignored={ignored}{extra} (strided)", make


def _ce_kwargs(opts):
    return dict(dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                     softcap=None, return_z_loss=False), **opts)


def _lce_case(N, C, V, ignored, **opts):
    def make(gen):
        h = torch.randn(N, C + 5, generator=gen, dtype=torch.float64)
        w = torch.randn(V, C, generator=gen, dtype=torch.float64) * C ** -0.5
        t = torch.randint(0, V, (N,), generator=gen)
        t[:ignored] = -100

        def view(leaves):
            return leaves["hidden"][:, :C], leaves["weight"], t
        return ({"hidden": h, "weight": w}, view,
                lambda fn, hh, ww, tt: fn(hh, ww, tt, bias=None, **_ce_kwargs(opts)))
    extra = "".join(f" {k}={v}" for k, v in opts.items())
    return f"N={N} C={C} V={V} ignored={ignored}{extra} (strided)", make


def _embedding_case(V, C, idx_shape, padding_idx):
    def make(gen):
        w = torch.randn(V, C, generator=gen, dtype=torch.float64)
        idx = torch.randint(0, V, tuple(reversed(idx_shape)), generator=gen).t()  # strided
        if padding_idx is not None:
            idx[0] = padding_idx

        def view(leaves):
            return idx, leaves["weight"]
        return {"weight": w}, view, lambda fn, i, ww: fn(i, ww, padding_idx=padding_idx)
    return f"V={V} C={C} idx={tuple(idx_shape)} (strided) padding_idx={padding_idx}", make


def _block_case(B, T, C, n_head, bias, strided=False):
    def make(gen):

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        # a realistic scale (unit activations, fan-in-scaled linears, LayerNorm weights near 1),
        # so low-precision errors are of the size training sees
        shapes = dict(ln_1_weight=(C,), c_attn_weight=(3 * C, C), attn_c_proj_weight=(C, C),
                      ln_2_weight=(C,), c_fc_weight=(4 * C, C), mlp_c_proj_weight=(C, 4 * C))
        leaves = {"x": randn(B, T, C + 5 if strided else C)}
        for name, shape in shapes.items():
            leaves[name] = 1 + randn(C, scale=0.1) if name.startswith("ln") else \
                randn(*shape, scale=shape[1] ** -0.5)
            if bias:
                leaves[name.replace("weight", "bias")] = randn(shape[0], scale=0.1)

        def view(leaves):   # x (B, T, C); strided: inside a wider buffer, row stride C + 5
            w = BlockWeights(**{f: leaves.get(f) for f in BlockWeights._fields})
            return leaves["x"][..., :C], w, n_head
        return leaves, view, lambda fn, x, w, nh: fn(x, w, nh)
    return (f"B={B} T={T} C={C} n_head={n_head} bias={bias}"
            + (" (strided x)" if strided else "")), make


def grid(op: str, quick: bool) -> list:
    if op == "attention":
        shapes = [(2, 3, 7, 48), (1, 2, 33, 16)] if quick else \
            [(1, 2, 1, 16), (2, 3, 7, 48), (1, 2, 97, 64), (1, 1, 256, 128)]
        return [_attention_case(*s) for s in shapes]
    if op == "cross_entropy":
        cases = [_ce_case(7, 65, 2), _ce_case(13, 1000, 3, label_smoothing=0.1, z_loss=1e-4)]
        if not quick:
            cases += [_ce_case(97, 50257, 5),
                      _ce_case(9, 65, 0, softcap=30.0, reduction="sum")]
        return cases
    if op == "linear_cross_entropy":
        cases = [_lce_case(7, 16, 65, 2), _lce_case(33, 48, 1000, 4, label_smoothing=0.1)]
        if not quick:
            cases += [_lce_case(64, 64, 50257, 3), _lce_case(97, 32, 65, 0, z_loss=1e-4)]
        return cases
    if op == "embedding":
        cases = [_embedding_case(65, 32, (4, 7), None), _embedding_case(1000, 48, (9, 11), 999)]
        if not quick:
            cases += [_embedding_case(50257, 64, (8, 16), 0)]
        return cases
    if op == "transformer_block":
        cases = [_block_case(2, 7, 48, 3, bias=False), _block_case(1, 33, 32, 2, bias=True)]
        if not quick:
            cases += [_block_case(3, 1, 64, 4, bias=True), _block_case(2, 97, 64, 4, bias=False),
                      _block_case(2, 7, 48, 3, bias=True, strided=True)]
        return cases
    raise FastGPTError(f"unknown op {op!r}; ops are: {', '.join(OPS)}")


# --- running one case -------------------------------------------------------------------------

def _run(fn: Callable, call: Callable, view: Callable, leaves64: dict, dtype: torch.dtype,
         grad_out: Callable[[torch.Tensor], torch.Tensor]):
    """Output and leaf gradients of one backend on ``leaves64`` rounded to ``dtype``;
    ``grad_out(out)`` gives the float64 gradient flowing into the output."""
    leaves = {k: v.to(dtype).requires_grad_() for k, v in leaves64.items()}
    out = call(fn, *view(leaves))
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out(out).to(out.dtype),
                                allow_unused=True)
    return out, dict(zip(names, grads))


def check_case(op: str, backend: str, label: str, make: Callable, dtype: torch.dtype,
               device: str, seed: int = 0, memo: Optional[dict] = None) -> list[CheckRow]:
    """The rows of one backend on one case. ``memo`` (a dict the caller keeps) shares the
    float64 and plain runs of a case between backends."""
    gen = torch.Generator().manual_seed(seed)
    leaves64, view, call = make(gen)
    # the reference sees exactly the values the dtype can hold
    leaves64 = {k: v.to(dtype).double().to(device) for k, v in leaves64.items()}
    dname = str(dtype).removeprefix("torch.")
    row = dict(op=op, backend=backend, dtype=dname, shape=label)

    def moved(leaves):
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in view(leaves))

    b = registry.get(op, backend)
    probe = moved({k: v.to(dtype) for k, v in leaves64.items()})
    kwargs = {"scale": None, "dropout_p": 0.0} if op == "attention" else {}
    reason = b.cannot_run(*probe, **kwargs)
    if reason:
        return [CheckRow(part="fwd+bwd", result="SKIP", note=reason, **row)]
    ref_fn = registry.get(op, REFERENCE).fn
    memo = {} if memo is None else memo
    key = (op, label, dtype, device, seed)
    cache = memo.setdefault(key, {})

    def grad_out(out):   # one random grad_output, drawn once, shared by every run
        if "g" not in cache:   # values the dtype holds, so every run sees the same numbers
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
            cache["g"] = g.to(device=device, dtype=torch.float64)
        return cache["g"]
    if "ref" not in cache:
        cache["ref"] = _run(ref_fn, call, moved, leaves64, torch.float64, grad_out)
        cache["base"] = _run(ref_fn, call, moved, leaves64, dtype, grad_out)
    (ref_out, ref_grads), (base_out, base_grads) = cache["ref"], cache["base"]
    try:
        out, grads = _run(b.fn, call, moved, leaves64, dtype, grad_out)
    except Exception as e:   # a backend that crashes fails the check; the rest still run
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        return [CheckRow(part="fwd+bwd", result="FAIL", note=f"{type(e).__name__}: {msg}", **row)]

    def judge(part, fast, base, ref):
        if fast is None or ref is None:
            return CheckRow(part=part, result="FAIL" if (fast is None) != (ref is None) else "PASS",
                            note="gradient missing" if fast is None and ref is not None else "",
                            **row)
        try:
            c = compare(fast, base, ref, zero_ref_magnitude=magnitude)
        except AssertionError as e:
            return CheckRow(part=part, result="FAIL", note=str(e), **row)
        ratio = c.err / c.plain_err if c.plain_err else (0.0 if c.err == 0 else float("inf"))
        note = "" if c.passed else (f"scale error {c.scale:.2g} vs plain {c.plain_scale:.2g}"
                                    f"; max error {c.err:.2g} vs plain {c.plain_err:.2g} + "
                                    f"floor {c.floor:.2g}")
        return CheckRow(part=part, max_abs_err=c.err, plain_err=c.plain_err, ratio=ratio,
                        result="PASS" if c.passed else "FAIL", note=note, **row)

    # the floor of a reference that is zero by cancellation: the call's largest reference tensor
    magnitude = max(t.abs().max().item() for t in (ref_out, *ref_grads.values())
                    if t is not None and t.numel())
    rows = [judge("fwd", out, base_out, ref_out)]
    back = [judge(f"bwd d{n}", grads[n], base_grads[n], ref_grads[n]) for n in ref_grads]
    # one backward row: the failing gradient if any, else the one with the largest ratio
    back.sort(key=lambda r: (r.result == "FAIL", r.ratio if r.ratio is not None else -1.0))
    rows.append(back[-1])
    return rows


def run_checks(ops: list[str], device: str, dtypes: list[torch.dtype], quick: bool,
               backends: Optional[list[str]] = None,
               progress: Optional[Callable[[CheckRow], None]] = None) -> list[CheckRow]:
    rows = []

    def emit(row):
        rows.append(row)
        progress and progress(row)

    for op in ops:
        runnable = []
        for name in (n for n in registry.backend_names(op) if backends is None or n in backends):
            reason = registry.get(op, name).available()
            if not reason and quick and name == "compile":
                reason = "--quick leaves out torch.compile backends (minutes of compiling)"
            if reason:
                emit(CheckRow(op, name, "-", "-", "fwd+bwd", result="SKIP", note=reason))
            else:
                runnable.append(name)
        for dtype in dtypes:
            names = []
            for name in runnable:
                why = FULL_PRECISION_ONLY.get((op, name))
                if why and dtype.itemsize < 4 and not backends:
                    emit(CheckRow(op, name, str(dtype).removeprefix("torch."), "-", "fwd+bwd",
                                  result="SKIP", note=why))
                else:
                    names.append(name)
            for label, make in grid(op, quick):
                memo = {}   # the float64 and plain runs of this case, shared by its backends
                for name in names:
                    for r in check_case(op, name, label, make, dtype, device, memo=memo):
                        emit(r)
    return rows


# --- output and the command -------------------------------------------------------------------

PART_WIDTH = 22     # "bwd dmlp_c_proj_weight", the longest gradient name (transformer_block)
HEADER = (f"{'op':<21} {'backend':<8} {'dtype':<9} {'pass':<{PART_WIDTH}} {'max abs err':>11} "
          f"{'plain err':>10} {'ratio':>6}  {'result':<6} shape")


def format_row(r: CheckRow) -> str:
    line = (f"{r.op:<21} {r.backend:<8} {r.dtype:<9} {r.part:<{PART_WIDTH}} "
            f"{number(r.max_abs_err, '.3g'):>11} {number(r.plain_err, '.3g'):>10} "
            f"{number(r.ratio, '.2f'):>6}  {r.result:<6} {r.shape}")
    return line + (f"  ({r.note})" if r.note else "")


def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="validate every backend against float64 references",
                       description="Run every available backend of every op over a grid of odd "
                       "shapes, forward and backward (random grad_output), against plain PyTorch "
                       "in float64. A tensor PASSes when (1) its largest error is at most 2x plain "
                       "PyTorch's in the same dtype + eps(dtype) x max|reference| (one unit in the "
                       "last place at the reference's size), and (2) its scale error "
                       "<x - ref, ref>/<ref, ref> is at most 2x plain PyTorch's (never counted "
                       "below the size rounding gives it by chance) + eps/2 + eps(float32). "
                       "Exit status 1 on any FAIL.")
    p.add_argument("--op", default=None, help=f"comma-separated ops (default: all): "
                   f"{', '.join(OPS)} (dashes allowed)")
    p.add_argument("--backend", default=None, help="comma-separated backend names (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (default: float32,"
                   "bfloat16 on cpu; float32,bfloat16,float16 on cuda)")
    p.add_argument("--quick", action="store_true", help="a small grid, about a minute on CPU")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    p.set_defaults(run=run_check_cli)


def _parse_dtypes(spec: str) -> list[torch.dtype]:
    out = []
    for name in spec.split(","):
        dt = getattr(torch, name.strip(), None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise FastGPTError(f"--dtype {name.strip()!r}: use float32, bfloat16, float16 or "
                               f"float64")
        out.append(dt)
    return out


def run_check_cli(args) -> int:
    device = str(resolve_device(args.device))
    ops = [canonical_op(op.strip(), "--op") for op in args.op.split(",")] if args.op else list(OPS)
    dtypes = _parse_dtypes(args.dtype or ("float32,bfloat16,float16" if device.startswith("cuda")
                                          else "float32,bfloat16"))
    interp = None
    if device == "cpu":
        # Triton kernels run on CPU only through the interpreter, which must be on before the
        # kernels are defined, i.e. before a triton backend's first call imports them: this is
        # the command's job.
        if not interpreting():
            if any(m.startswith("fastgpt.kernels.") for m in sys.modules):
                interp = ("Triton kernels were already loaded for GPU in this process: the "
                          "triton backends are skipped (run `fastgpt check` in a fresh process)")
            else:
                os.environ["TRITON_INTERPRET"] = "1"
        interp = interp or ("no GPU: Triton kernels run through the Triton interpreter "
                            "(TRITON_INTERPRET=1) on CPU tensors; this checks their arithmetic, "
                            "not GPU code generation")
    env = environment(device)
    print(f"# fastgpt check on {device}{' (quick grid)' if args.quick else ''}; {format_env(env)}")
    if interp:
        print(f"# {interp}")
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    backends = [b.strip() for b in args.backend.split(",")] if args.backend else None
    known = {n for op in ops for n in registry.backend_names(op)}
    for name in backends or []:
        if name not in known:
            raise FastGPTError(f"--backend {name!r} is not a backend of {', '.join(ops)}; "
                               f"backends: {', '.join(sorted(known))}")
    rows = run_checks(ops, device, dtypes, args.quick, backends,
                      progress=lambda r: print(format_row(r), flush=True))
    n = {k: sum(r.result == k for r in rows) for k in ("PASS", "FAIL", "SKIP")}
    print(f"# {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped in "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, device=device, interpreter=bool(interp),
                           quick=args.quick, rows=[asdict(r) for r in rows]), f, indent=1)
        print(f"wrote {args.json}")
    if not rows:
        raise FastGPTError("nothing was checked: no backend matched --op/--backend")
    return 1 if n["FAIL"] else 0
