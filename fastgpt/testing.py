"""Accuracy rule shared by the tests and ``fastgpt check`` (flash-attention's rule).

A fast kernel's output in some dtype passes when its max error against the float64 reference is
at most ``factor`` times the error of plain PyTorch computing in that same dtype, plus a small
absolute floor for outputs that plain PyTorch happens to get exactly right.
"""

from __future__ import annotations

import torch

# floors per dtype: a few units in the last place at unit scale
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def compare(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
            factor: float = 2.0, floor: float | None = None) -> tuple[bool, float, float]:
    """(passed, error of ``fast``, error of ``baseline``), both against ``ref64``."""
    if fast.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(fast.shape)} != reference shape {tuple(ref64.shape)}")
    floor = FLOORS.get(fast.dtype, 1e-5) if floor is None else floor
    err, base = max_abs_error(fast, ref64), max_abs_error(baseline, ref64)
    ok = bool(torch.isfinite(fast).all()) and err <= factor * base + floor
    return ok, err, base


def assert_matches_reference(fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor,
                             name: str = "output", factor: float = 2.0,
                             floor: float | None = None) -> None:
    """Raise with the worst elements listed when ``fast`` breaks the accuracy rule."""
    ok, err, base = compare(fast, baseline, ref64, factor, floor)
    if ok:
        return
    diff = (fast.detach().double() - ref64.detach().double()).abs().flatten()
    worst = diff.nan_to_num(float("inf")).topk(min(5, diff.numel())).indices
    rows = "\n".join(
        f"  at {tuple(int(i) for i in torch.unravel_index(torch.tensor(j), fast.shape))}: got "
        f"{fast.flatten()[j].item():.6g}, reference {ref64.flatten()[j].item():.6g}, plain "
        f"{baseline.flatten()[j].item():.6g}" for j in worst.tolist())
    raise AssertionError(f"{name}: max error {err:.3g} > {factor} x plain-PyTorch error {base:.3g} "
                         f"+ floor ({fast.dtype}); worst elements:\n{rows}")
