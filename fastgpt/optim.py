"""The optimizers: torch's AdamW over nanoGPT's parameter groups, and FlatAdamW.

FlatAdamW: AdamW for fp32 master weights, trained through a bf16 working copy or directly in
float32, one C++ op a step.

Why: on CPU in bf16 (fastgpt.precision.LowPrecisionCopy) the optimizer step used to be five
passes over ~30 small tensors (bf16 grads -> fp32, norm, clip, torch's fused AdamW, fp32 ->
bf16) plus torch.optim's Python overhead: ~1.4 ms of a ~20 ms step at the baby preset.
``fastgpt::flat_adamw_step_`` (csrc/adamw_cpu.cpp) does it in two passes over flat buffers:
the masters, both moments and the working copy are views of one flat tensor each, and the
working copy's bf16 grads are read where autograd left them.

In float32 (no working copy) the same op replaces torch's clip_grad_norm_ (a norm per tensor, a
norm of norms, a multiply per tensor) and fused AdamW (Python around ~30 tensors): in the baby
preset's profile on a 2-core AVX2 EPYC the optimizer's share of a step went from 3.6 ms to
1.0 ms (the op alone: 0.77 ms for its 0.8M parameters), and a float32 run no longer imports
torch._dynamo at start-up.

It is a drop-in for torch.optim.AdamW(fused=True) + clip_grad_norm_ in that loop:
``param_groups`` (lr, betas, eps, weight_decay per group, settable), ``step()``,
``zero_grad()``, and ``state_dict()``/``load_state_dict()`` in torch.optim.AdamW's format, so
checkpoints move between the two either way. The update is bitwise torch's fused CPU AdamW
given the same clipped fp32 grads (see the kernel's docstring). It does not subclass
torch.optim.Optimizer: that imports torch._dynamo (~1 s at startup).

Gradients are read from the working parameters (masters never get any), or from the masters
when there is no working copy; a parameter without a gradient is skipped, as torch.optim skips
it. After every step the working copy is master.to(torch.bfloat16).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

from fastgpt.ops import extension

OP = "fastgpt::flat_adamw_step_"
# the group options torch.optim.AdamW(fused=True) writes into its state dicts, ours included, so
# that torch restores a fused AdamW from our checkpoints; the ones we cannot honour must be off
TORCH_GROUP_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                     "differentiable": False, "fused": True, "decoupled_weight_decay": True}
UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")
_logged: set = set()


def unavailable() -> Optional[str]:
    """None when the C++ op is there, else why not (importing fastgpt._C on first call)."""
    reason = extension.available()
    if reason is None and not extension.has_kernel(OP, "CPU"):
        reason = f"fastgpt._C has no {OP} (it was built from older sources; rebuild it)"
    return reason


@extension.on_load
def _register_fake() -> None:
    @torch.library.register_fake(OP)
    def _fake(master, exp_avg, exp_avg_sq, working, steps, grads, offsets, group, lr,
              weight_decay, beta1, beta2, eps, max_norm):
        return master.new_empty(())


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    """torch's AdamW over optimizer_groups, fused where available."""
    groups = optimizer_groups(model, weight_decay)
    # fused AdamW has CPU and CUDA kernels in recent torch; foreach is the portable fallback
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)


def flat_adamw_or_none(groups: list[dict], pairs, lr: float, betas: tuple[float, float],
                       max_grad_norm: float) -> Optional["FlatAdamW"]:
    """A FlatAdamW, or None (logged once) when the extension cannot run it."""
    reason = unavailable()
    if reason is not None:
        if reason not in _logged:
            _logged.add(reason)
            logging.getLogger("fastgpt").warning(
                f"fastgpt: the CPU optimizer step runs torch.optim.AdamW ({reason})")
        return None
    return FlatAdamW(groups, pairs, lr=lr, betas=betas, max_grad_norm=max_grad_norm)


class FlatAdamW:
    """AdamW with decoupled weight decay and optional clipping of the global grad norm.

    ``params``: fp32 CPU master parameters, or groups of them (dicts, as for torch.optim);
    ``pairs``: (master, working) for every master, the working one bf16 of the same shape; or
    None: no working copy, the masters themselves run forward and backward (float32).
    ``max_grad_norm > 0`` clips the working grads' global norm first, as
    torch.nn.utils.clip_grad_norm_ would; ``last_grad_norm`` then holds it (a tensor: no sync).
    The masters' and working parameters' storage moves into the flat buffers (their values
    stay; the working copy becomes master.to(bfloat16)).
    """

    def __init__(self, params, pairs: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]],
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, max_grad_norm: float = 0.0):
        reason = unavailable()   # also loads the extension
        if reason is not None:
            raise RuntimeError(f"FlatAdamW needs fastgpt._C: {reason}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    **TORCH_GROUP_FLAGS}
        params = list(params)
        if not params:
            raise ValueError("FlatAdamW got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict] = []
        for g in groups:
            group = {**defaults, **g, "params": list(g["params"])}
            _check_group(group)
            self.param_groups.append(group)
        self.max_grad_norm = float(max_grad_norm)
        self.last_grad_norm: Optional[torch.Tensor] = None

        masters = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in masters}) != len(masters):
            raise ValueError("FlatAdamW: some parameters appear more than once")
        working_of = None if pairs is None else {id(m): w for m, w in pairs}
        for i, m in enumerate(masters):
            if (not isinstance(m, torch.Tensor) or m.dtype != torch.float32
                    or m.device.type != "cpu"):
                raise ValueError(f"FlatAdamW: parameter {i} must be a float32 CPU tensor; got "
                                 f"{_describe(m)}")
            if working_of is None:
                continue
            w = working_of.get(id(m))
            if w is None:
                raise ValueError(f"FlatAdamW: parameter {i} (shape {tuple(m.shape)}) has no "
                                 f"working copy in pairs")
            if w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.shape != m.shape:
                raise ValueError(f"FlatAdamW: the working copy of parameter {i} must be a "
                                 f"bfloat16 CPU tensor of shape {tuple(m.shape)}; got "
                                 f"{_describe(w)}")
        self._masters = masters
        # the parameters whose grads are read and zeroed: the working copy's, or the masters'
        self._working = masters if working_of is None else [working_of[id(m)] for m in masters]
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._offsets = [0]
        for m in masters:
            self._offsets.append(self._offsets[-1] + m.numel())

        total = self._offsets[-1]
        self._master = torch.empty(total, dtype=torch.float32)
        self._exp_avg = torch.zeros(total, dtype=torch.float32)
        self._exp_avg_sq = torch.zeros(total, dtype=torch.float32)
        # empty without a working copy: the op then refreshes none
        self._work = torch.empty(0 if working_of is None else total, dtype=torch.bfloat16)
        self._steps = torch.zeros(len(masters), dtype=torch.float32)
        with torch.no_grad():
            for m, view in zip(masters, self._views(self._master)):
                view.copy_(m)
                m.data = view          # the parameter now lives in the flat buffer
            if working_of is not None:
                for w, wview in zip(self._working, self._views(self._work)):
                    w.data = wview
                self._work.copy_(self._master)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat's piece of every parameter, shaped like it."""
        return [flat[a:b].view(m.shape)
                for m, a, b in zip(self._masters, self._offsets, self._offsets[1:])]

    def step(self, closure=None):
        """Clip (if max_grad_norm > 0), update the masters and refresh the working copy."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.last_grad_norm = torch.ops.fastgpt.flat_adamw_step_.default(
            self._master, self._exp_avg, self._exp_avg_sq, self._work, self._steps,
            [w.grad for w in self._working], self._offsets, self._group_of,
            [float(g["lr"]) for g in groups], [float(g["weight_decay"]) for g in groups],
            [float(g["betas"][0]) for g in groups], [float(g["betas"][1]) for g in groups],
            [float(g["eps"]) for g in groups], self.max_grad_norm)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for w in self._working:
            if set_to_none:
                w.grad = None
            elif w.grad is not None:
                w.grad.detach_()
                w.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim.AdamW's format: per-parameter state by index, groups with indices."""
        state = {}
        for i, (step, m, v) in enumerate(zip(self._steps.tolist(), self._views(self._exp_avg),
                                             self._views(self._exp_avg_sq))):
            if step > 0:   # torch has state only for parameters it has stepped
                state[i] = {"step": torch.tensor(step, dtype=torch.float32),
                            "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of FlatAdamW or torch.optim.AdamW (checked fully before any change)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; this "
                             f"optimizer has {len(self.param_groups)}")
        for gi, (g, s) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(f"loaded state dict's parameter group {gi} has "
                                 f"{len(s['params'])} parameters; this optimizer's has "
                                 f"{len(g['params'])}")
            _check_group({**g, **s}, f"loaded parameter group {gi}")
        saved_ids = [i for s in saved_groups for i in s["params"]]
        for sid, m in zip(saved_ids, self._masters):
            st = state_dict["state"].get(sid)
            if st is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in st or tuple(st[key].shape) != tuple(m.shape):
                    raise ValueError(f"loaded state of parameter {sid} has "
                                     f"{key} {_describe(st.get(key))}; expected shape "
                                     f"{tuple(m.shape)}")
            if "max_exp_avg_sq" in st:
                raise ValueError(f"loaded state of parameter {sid} has max_exp_avg_sq "
                                 f"(amsgrad), which FlatAdamW does not implement")

        for g, s in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in s.items() if k != "params"})
        for i, (sid, m, v) in enumerate(zip(saved_ids, self._views(self._exp_avg),
                                            self._views(self._exp_avg_sq))):
            st = state_dict["state"].get(sid)
            if st is None:
                m.zero_()
                v.zero_()
                self._steps[i] = 0
            else:
                m.copy_(st["exp_avg"])
                v.copy_(st["exp_avg_sq"])
                self._steps[i] = float(st["step"])


def _check_group(group: dict, where: str = "FlatAdamW") -> None:
    bad = [k for k in UNSUPPORTED if group.get(k)]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} is not implemented; torch.optim.AdamW has it")
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    b1, b2 = group["betas"]
    if isinstance(lr, torch.Tensor) or not 0.0 <= lr:
        raise ValueError(f"{where}: lr must be a float >= 0; got {lr!r}")
    if not 0.0 <= eps:
        raise ValueError(f"{where}: eps must be >= 0; got {eps!r}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{where}: betas must be in [0, 1); got {group['betas']!r}")
    if not 0.0 <= wd:
        raise ValueError(f"{where}: weight_decay must be >= 0; got {wd!r}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} {x.device.type} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
