"""Accuracy rule shared by the tests and ``fastgpt check``, and the mutants that prove it bites.

A fast kernel's tensor ``fast`` in some dtype, plain PyTorch's ``plain`` computed in that same
dtype, and the float64 reference ``ref`` must satisfy both (eps = ``torch.finfo(dtype).eps``):

    worst element:  max|fast - ref| <= 2 max|plain - ref| + eps max|ref|
    scale:          |s(fast)| <= 2 max(|s(plain)|, noise(plain)) + eps/2 + eps(float32)

s(x) = <x - ref, ref> / <ref, ref> is x's relative scale error; noise(x) = ||x - ref|| /
(sqrt(n) ||ref||), with n = (sum ref^2)^2 / sum ref^4 the number of elements that carry the
reference, is the size s takes by chance when the errors are random, so plain's bar is never
below what luck gives it. The first test is flash-attention's, with a floor of one unit in the
last place at the reference's size (a fixed floor let 3% errors through on small gradients). The
second sees a kernel right up to a factor (a wrong normaliser, a missing temperature): 1% in
bfloat16 is only 1-3 units in the last place, the size of plain PyTorch's own rounding, which the
first cannot tell apart. Its floor: half a unit (a correctly rounded tensor whose largest values
are alike, e.g. a cross-entropy gradient's -1/N target entries, rounds them all the same way) plus
one unit of the fp32 arithmetic kernels use (a row's shared normaliser moves the whole row).
A reference that cancels to exactly zero (dq and dk at T=1) gets a first floor of four units at
the magnitude the caller names (the call's largest reference tensor), else the dtype's smallest
normal number; the scale test is then void.

Mutants: a backend whose output or one input gradient is scaled by 1.01, or has one element
(the last) moved by 5% of the tensor's largest magnitude. ``mutant`` builds one from a real
backend's function, ``register_mutants`` registers them as backends (for ``fastgpt check``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from fastgpt.ops import registry

FACTOR = 2.0
ZERO_REF_ULPS = 4.0     # floor of a reference that cancels to zero, at the call's magnitude
MUTANT_SCALE = 1.01
MUTANT_OFFSET = 0.05    # of the tensor's largest magnitude, added to its last element


class Comparison(NamedTuple):
    passed: bool
    err: float          # max|fast - ref|
    plain_err: float    # max|plain - ref|
    floor: float        # eps * max|ref|
    scale: float        # |scale(fast)|
    plain_scale: float  # max(|scale(plain)|, noise(plain))
    scale_floor: float  # eps / 2 + eps(float32)


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def scale_error(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(|<x - ref, ref>| / <ref, ref>, ||x - ref|| / (sqrt(n) ||ref||)): x's relative scale error
    and the size it takes by chance, with n = (sum ref^2)^2 / sum ref^4 the number of elements
    that carry the reference; (0, 0) for an all-zero ref."""
    r = ref.detach().double()
    r2 = r * r
    rr = r2.sum().item()
    if rr == 0:
        return 0.0, 0.0
    d = x.detach().double() - r
    n = rr * rr / (r2 * r2).sum().item()
    return abs((d * r).sum().item()) / rr, (d * d).sum().item() ** 0.5 / (n * rr) ** 0.5


def floor_for(ref64: torch.Tensor, dtype: torch.dtype, zero_ref_magnitude: float = 0.0) -> float:
    """One unit in the last place of ``dtype`` at the magnitude of ``ref64``; for an all-zero
    reference, at ``zero_ref_magnitude`` (the size of what it is computed from, when the caller
    knows it: a gradient that is zero by cancellation), else the smallest normal number."""
    info = torch.finfo(dtype)
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    if scale > 0:
        return info.eps * scale
    # a cancellation leaves a few roundings of the terms that cancelled, which may exceed the
    # call's largest result (dk at T=1: dO.v - dO.o, times q)
    return ZERO_REF_ULPS * info.eps * zero_ref_magnitude if zero_ref_magnitude > 0 else info.tiny


def compare(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
            factor: float = FACTOR, zero_ref_magnitude: float = 0.0) -> Comparison:
    """``fast`` and ``baseline`` (plain PyTorch in fast's dtype) against ``ref64``."""
    if fast.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(fast.shape)} != reference shape {tuple(ref64.shape)}")
    floor = floor_for(ref64, fast.dtype, zero_ref_magnitude)
    err, base = max_abs_error(fast, ref64), max_abs_error(baseline, ref64)
    scale, _ = scale_error(fast, ref64)
    base_scale, base_noise = scale_error(baseline, ref64)
    # half a unit of the dtype (values that are alike round alike), plus one unit of the fp32
    # arithmetic kernels compute in (a shared normaliser's rounding moves a whole row alike)
    acc_eps = torch.finfo(torch.float32 if fast.dtype.itemsize <= 4 else fast.dtype).eps
    scale_floor = torch.finfo(fast.dtype).eps / 2 + acc_eps
    ok = (bool(torch.isfinite(fast).all()) and err <= factor * base + floor
          and scale <= factor * max(base_scale, base_noise) + scale_floor)
    return Comparison(ok, err, base, floor, scale, max(base_scale, base_noise), scale_floor)


def assert_matches_reference(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
                             name: str = "output", factor: float = FACTOR,
                             zero_ref_magnitude: float = 0.0) -> None:
    """Raise with the worst elements listed when ``fast`` breaks the accuracy rule."""
    c = compare(fast, baseline, ref64, factor, zero_ref_magnitude)
    if c.passed:
        return
    diff = (fast.detach().double() - ref64.detach().double()).abs().flatten()
    worst = diff.nan_to_num(float("inf")).topk(min(5, diff.numel())).indices
    rows = "\n".join(
        f"  at {tuple(int(i) for i in torch.unravel_index(torch.tensor(j), fast.shape))}: got "
        f"{fast.flatten()[j].item():.6g}, reference {ref64.flatten()[j].item():.6g}, plain "
        f"{baseline.flatten()[j].item():.6g}" for j in worst.tolist())
    raise AssertionError(
        f"{name} ({fast.dtype}): max error {c.err:.3g} vs allowed {factor} x plain "
        f"{c.plain_err:.3g} + floor {c.floor:.3g}; scale error {c.scale:.3g} vs allowed "
        f"{factor} x plain {c.plain_scale:.3g} + {c.scale_floor:.3g}; worst elements:\n{rows}")


# --- mutants ----------------------------------------------------------------------------------

def _perturb(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` under mutation ``kind`` ("scale" or "element"), as a new tensor."""
    if kind == "scale":
        return (t.double() * MUTANT_SCALE).to(t.dtype)
    out = t.clone(memory_format=torch.contiguous_format)
    if out.numel():
        out.view(-1)[-1] += MUTANT_OFFSET * t.detach().abs().max().to(t.dtype)
    return out


class _MutateGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it is perturbed."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.kind = kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _perturb(g, ctx.kind), None


def _replace_input(args: tuple, kwargs: dict, names: tuple, name: str, fn: Callable):
    """args/kwargs with the input called ``name`` (a parameter of the op, in ``names`` order, or
    a field of a NamedTuple argument such as BlockWeights) replaced by fn(input)."""
    args = list(args)
    for i, value in enumerate(args):
        if i < len(names) and names[i] == name and value is not None:
            args[i] = fn(value)
            return tuple(args), kwargs, True
        if hasattr(value, "_fields") and getattr(value, name, None) is not None:
            args[i] = value._replace(**{name: fn(getattr(value, name))})
            return tuple(args), kwargs, True
    if kwargs.get(name) is not None:
        return tuple(args), {**kwargs, name: fn(kwargs[name])}, True
    return tuple(args), kwargs, False


def mutant(fn: Callable, target: str, kind: str, names: tuple = ()) -> Callable:
    """``fn`` with ``target`` ("out" for the output, or an input's name for its gradient)
    perturbed by ``kind``: "scale" (x1.01) or "element" (the last element moved by 5% of the
    tensor's largest magnitude). ``names``: the op's positional parameter names."""
    if kind not in ("scale", "element"):
        raise ValueError(f"mutant kind must be 'scale' or 'element'; got {kind!r}")

    def mutated(*args, **kwargs):
        if target != "out":
            args, kwargs, found = _replace_input(args, kwargs, names, target,
                                                 lambda t: _MutateGrad.apply(t, kind))
            if not found:
                raise ValueError(f"mutant: the op has no input {target!r} in this call")
        out = fn(*args, **kwargs)
        if target == "out":
            # the forward value changes; the gradient flowing back stays the real one
            out = out + (_perturb(out.detach(), kind) - out.detach())
        return out
    return mutated


# the inputs whose gradients a mutant can perturb, by op (positional names first)
OP_INPUTS = {
    "attention": ("q", "k", "v"),
    "cross_entropy": ("logits",),
    "linear_cross_entropy": ("hidden", "weight", "bias"),
    "embedding": ("indices", "weight"),
    "transformer_block": ("x", "weights"),
}


def mutant_name(backend: str, target: str, kind: str) -> str:
    what = "out" if target == "out" else f"d{target}"
    return f"{backend}~{what}" + ("*1.01" if kind == "scale" else "[-1]+5%")


def register_mutants(op: str, backend: str, targets: list[str]) -> list[str]:
    """Register, for each target ("out" or an input name) and kind, a mutant of ``backend`` as
    a backend of ``op``; returns their names (``triton~dlogits*1.01``, ``ext~out[-1]+5%``...)."""
    real = registry.get(op, backend)
    names = []
    for target in targets:
        for kind in ("scale", "element"):
            name = mutant_name(backend, target, kind)
            registry.register(op, name, mutant(real.fn, target, kind, OP_INPUTS[op]),
                              supports=real.supports, available=real.available)
            names.append(name)
    return names


@contextlib.contextmanager
def mutants_registered(op: str, backend: str, targets: list[str]):
    """register_mutants for the duration of a ``with`` block; yields their names."""
    names = register_mutants(op, backend, targets)
    try:
        yield names
    finally:
        registry.unregister(op, names)
