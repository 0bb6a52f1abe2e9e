"""Accuracy rule shared by the tests and ``fastgpt check`` (flash-attention's rule, scaled).

A fast kernel's output in some dtype passes when its max error against the float64 reference is
at most ``factor`` (2) times the max error of plain PyTorch computing in that same dtype, plus a
floor of one unit in the last place of the dtype at the reference's magnitude:

    max|fast - ref| <= 2 * max|plain - ref| + eps(dtype) * max|ref|

(eps = ``torch.finfo(dtype).eps``; for an all-zero reference the floor is the dtype's smallest
normal number, so a kernel must then be exactly zero wherever plain PyTorch is). The floor only
matters where plain PyTorch happens to be exact; it scales with the output, so a gradient of
size 1e-3 gets a floor of size 1e-3 * eps, not a fixed number that would let a 3% error through.
"""

from __future__ import annotations

import torch

FACTOR = 2.0


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def floor_for(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the magnitude of ``ref64``."""
    info = torch.finfo(dtype)
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return info.eps * scale if scale > 0 else info.tiny


def compare(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
            factor: float = FACTOR) -> tuple[bool, float, float, float]:
    """(passed, error of ``fast``, error of ``baseline``, floor), errors against ``ref64``."""
    if fast.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(fast.shape)} != reference shape {tuple(ref64.shape)}")
    floor = floor_for(ref64, fast.dtype)
    err, base = max_abs_error(fast, ref64), max_abs_error(baseline, ref64)
    ok = bool(torch.isfinite(fast).all()) and err <= factor * base + floor
    return ok, err, base, floor


def assert_matches_reference(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
                             name: str = "output", factor: float = FACTOR) -> None:
    """Raise with the worst elements listed when ``fast`` breaks the accuracy rule."""
    ok, err, base, floor = compare(fast, baseline, ref64, factor)
    if ok:
        return
    diff = (fast.detach().double() - ref64.detach().double()).abs().flatten()
    worst = diff.nan_to_num(float("inf")).topk(min(5, diff.numel())).indices
    rows = "\n".join(
        f"  at {tuple(int(i) for i in torch.unravel_index(torch.tensor(j), fast.shape))}: got "
        f"{fast.flatten()[j].item():.6g}, reference {ref64.flatten()[j].item():.6g}, plain "
        f"{baseline.flatten()[j].item():.6g}" for j in worst.tolist())
    raise AssertionError(f"{name}: max error {err:.3g} > {factor} x plain-PyTorch error {base:.3g} "
                         f"+ floor {floor:.3g} (eps of {fast.dtype} x max|reference|); worst "
                         f"elements:\n{rows}")
