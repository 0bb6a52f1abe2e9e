"""FlatAdamW (fastgpt/optim.py, csrc/adamw_cpu.cpp) against torch.optim.AdamW(fused=True).

Given the same clipped grads the update must be bitwise torch's (where torch runs its AVX-512
kernel, whose FMAs the op mirrors; elsewhere within an ulp); the grad norm must meet the
accuracy rule against float64; the working copy must be master.to(bfloat16); state dicts must
move between the two optimizers both ways; training must not import torch._dynamo.
"""

import logging
import subprocess
import sys

import pytest
import torch

from fastgpt import optim
from fastgpt.optim import FlatAdamW

# the README install builds fastgpt._C: a missing extension is a failure, not a skip
assert optim.unavailable() is None, optim.unavailable()

# odd sizes: tails of 1..15 lanes, a tensor of one element, one bigger than a 4096 block
SHAPES = [(65, 33), (33,), (1,), (3, 4099), (17,), (128, 96), (7, 5)]
BETAS = (0.9, 0.95)
DECAY = [0, 3, 5, 6]   # SHAPES in the weight-decay group; FlatAdamW's flat order puts them first


def _pair(decay_idx=DECAY):
    """fp32 masters, their bf16 working copies and torch's reference copies, in two groups."""
    masters = [torch.randn(s) * 0.1 for s in SHAPES]
    refs = [m.clone().requires_grad_() for m in masters]
    work = [m.to(torch.bfloat16).requires_grad_() for m in masters]
    masters = [m.requires_grad_() for m in masters]

    def groups(ps):
        return [{"params": [p for i, p in enumerate(ps) if i in decay_idx], "weight_decay": 0.1},
                {"params": [p for i, p in enumerate(ps) if i not in decay_idx],
                 "weight_decay": 0.0}]
    return masters, work, refs, groups


def _make(max_grad_norm=0.0):
    masters, work, refs, groups = _pair()
    flat = FlatAdamW(groups(masters), zip(masters, work), lr=3e-3, betas=BETAS,
                     max_grad_norm=max_grad_norm)
    ref = torch.optim.AdamW(groups(refs), lr=3e-3, betas=BETAS, fused=True)
    return flat, ref, masters, work, refs


def _grads(scale, missing=()):
    return [None if i in missing else (torch.randn(s) * scale).to(torch.bfloat16)
            for i, s in enumerate(SHAPES)]


def _clip_like_ours(params, max_norm, norm):
    """clip_grad_norm_'s scaling, with the norm FlatAdamW computed."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)


def _assert_same(a, b, what):
    """Bitwise where torch runs the AVX-512 kernel the C++ op mirrors, else within an ulp."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max()}"
    else:
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=0, msg=what)


def _assert_same_state(flat, ref, masters, refs, work):
    for i, (m, r, w) in enumerate(zip(masters, refs, work)):
        _assert_same(m.detach(), r.detach(), f"param {i}")
        assert torch.equal(w.detach(), m.detach().to(torch.bfloat16)), f"working copy {i}"
    ours, theirs = flat.state_dict()["state"], ref.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for k in ours:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            _assert_same(ours[k][key], theirs[k][key], f"state {k} {key}")


@pytest.mark.parametrize("max_norm", [0.0, 1e6, 0.5], ids=["no-clip", "clip-inactive", "clip"])
def test_steps_match_torch_fused_adamw(max_norm):
    flat, ref, masters, work, refs = _make(max_norm)
    for it, (scale, lr, missing) in enumerate([(1.0, 3e-3, ()), (0.01, 1e-3, (2,)),
                                               (3.0, 2e-3, ()), (1.0, 5e-4, (0, 4)),
                                               (0.1, 3e-4, ())]):
        for opt in (flat, ref):
            for g in opt.param_groups:
                g["lr"] = lr
        grads = _grads(scale, missing)
        for w, r, g in zip(work, refs, grads):
            w.grad = g
            r.grad = None if g is None else g.float()
        flat.step()
        if max_norm > 0:
            norm = flat.last_grad_norm
            exact = torch.cat([g.double().flatten() for g in grads if g is not None]).norm()
            theirs = torch.nn.utils.clip_grad_norm_(refs, float("inf"))   # measures only
            assert abs(norm.double() - exact) <= 2 * abs(theirs.double() - exact) + 2e-7 * exact
            _clip_like_ours(refs, max_norm, norm)
        else:
            assert flat.last_grad_norm.isnan()
        ref.step()
        _assert_same_state(flat, ref, masters, refs, work)
        flat.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        assert all(w.grad is None for w in work)
    assert flat.state_dict()["state"][5]["step"] == 4   # SHAPES[2] (flat index 5) skipped once


@pytest.mark.parametrize("max_norm", [0.0, 0.5], ids=["no-clip", "clip"])
def test_without_a_working_copy_steps_the_masters_from_their_own_grads(max_norm):
    """float32 training: pairs=None; the masters' fp32 grads are read and zeroed, nothing else
    is written, and the update is torch's fused AdamW's given the same clipped grads."""
    masters, _, refs, groups = _pair()
    flat = FlatAdamW(groups(masters), None, lr=3e-3, betas=BETAS, max_grad_norm=max_norm)
    ref = torch.optim.AdamW(groups(refs), lr=3e-3, betas=BETAS, fused=True)
    assert flat._work.numel() == 0
    for scale, missing in [(1.0, ()), (3.0, (2,)), (0.1, ())]:
        grads = [None if i in missing else torch.randn(s) * scale for i, s in enumerate(SHAPES)]
        for m, r, g in zip(masters, refs, grads):
            m.grad = g
            r.grad = None if g is None else g.clone()
        flat.step()
        if max_norm > 0:
            exact = torch.cat([g.double().flatten() for g in grads if g is not None]).norm()
            assert abs(flat.last_grad_norm.double() - exact) <= 1e-6 * exact
            _clip_like_ours(refs, max_norm, flat.last_grad_norm)
        ref.step()
        for i, (m, r) in enumerate(zip(masters, refs)):
            _assert_same(m.detach(), r.detach(), f"param {i}")
        flat.zero_grad(set_to_none=True)
        assert all(m.grad is None for m in masters)
    ours, theirs = flat.state_dict()["state"], ref.state_dict()["state"]
    for k in theirs:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            _assert_same(ours[k][key], theirs[k][key], f"state {k} {key}")


def test_clipping_matches_clip_grad_norm():
    """End to end against clip_grad_norm_ + AdamW: equal up to the norm's last-ulp difference."""
    flat, ref, masters, work, refs = _make(max_grad_norm=1.0)
    for _ in range(3):
        grads = _grads(2.0)
        for w, r, g in zip(work, refs, grads):
            w.grad, r.grad = g, g.float()
        flat.step()
        torch.nn.utils.clip_grad_norm_(refs, 1.0)
        ref.step()
    for m, r in zip(masters, refs):
        torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def _op_args(flat, grads, max_norm):
    """The op's arguments for FlatAdamW's buffers; grads in SHAPES order."""
    grads = [grads[i] for i in DECAY + [i for i in range(len(SHAPES)) if i not in DECAY]]
    return (flat._master, flat._exp_avg, flat._exp_avg_sq, flat._work, flat._steps, grads,
            flat._offsets, flat._group_of, [1e-3, 1e-3], [0.1, 0.0], [0.9, 0.9], [0.95, 0.95],
            [1e-8, 1e-8], max_norm)


def test_fp32_grads_and_threads_give_the_same_result():
    """fp32 grads that hold bf16 values equal bf16 grads; one thread equals two."""
    results = []
    for dtype, threads in ((torch.bfloat16, 2), (torch.float32, 2), (torch.bfloat16, 1)):
        torch.manual_seed(1)
        flat, *_ = _make()
        grads = [g.to(dtype) for g in _grads(1.0)]
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            norm = torch.ops.fastgpt.flat_adamw_step_(*_op_args(flat, grads, 0.5))
        finally:
            torch.set_num_threads(old)
        results.append((norm, flat._master.clone(), flat._exp_avg_sq.clone()))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


def test_state_dict_round_trips_with_torch_adamw():
    flat, ref, masters, work, refs = _make()
    for w, r, g in zip(work, refs, _grads(1.0, missing=(1,))):
        w.grad, r.grad = g, None if g is None else g.float()
    flat.step()
    ref.step()
    ours, theirs = flat.state_dict(), ref.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]       # every option, same values
    assert ours["state"].keys() == theirs["state"].keys()       # param 1: no state yet
    for k in ours["state"]:
        assert list(ours["state"][k]) == list(theirs["state"][k])
        for key, v in ours["state"][k].items():
            t = theirs["state"][k][key]
            assert (v.dtype, v.shape) == (t.dtype, t.shape)
            _assert_same(v, t, f"state {k} {key}")

    # torch's state into a fresh FlatAdamW and ours into a fresh torch AdamW: both go on equal
    flat2, ref2, masters2, work2, refs2 = _make()
    with torch.no_grad():
        for m, m2, r2 in zip(masters, masters2, refs2):
            m2.copy_(m)
            r2.copy_(m)
        flat2._work.copy_(flat2._master)
    flat2.load_state_dict(theirs)
    ref2.load_state_dict(ours)
    for opt in (flat, ref, flat2, ref2):
        for g in opt.param_groups:
            g["lr"] = 1e-3
    grads = _grads(1.0)
    for ws, rs in ((work, refs), (work2, refs2)):
        for w, r, g in zip(ws, rs, grads):
            w.grad, r.grad = g, g.float()
    for opt in (flat, ref, flat2, ref2):
        opt.step()
    _assert_same_state(flat2, ref, masters2, refs, work2)
    _assert_same_state(flat, ref2, masters, refs2, work)
    ours["state"][0]["exp_avg"].fill_(7.0)                       # a snapshot, not a view
    assert not (flat.state_dict()["state"][0]["exp_avg"] == 7.0).any()


def test_load_state_dict_checks_before_changing_anything():
    flat, ref, *_ = _make()
    before = flat.state_dict()
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="1 parameter groups; this optimizer has 2"):
        flat.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})
    bad = {"state": {}, "param_groups": [dict(sd["param_groups"][0]), sd["param_groups"][1]]}
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="group 0 has 3 parameters; this optimizer's has 4"):
        flat.load_state_dict(bad)
    amsgrad = {"state": {}, "param_groups": [{**g, "amsgrad": True} for g in sd["param_groups"]]}
    with pytest.raises(ValueError, match="amsgrad is not implemented"):
        flat.load_state_dict(amsgrad)
    wrong = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                           "exp_avg_sq": torch.zeros(3)}}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"exp_avg .* shape \(65, 33\)"):
        flat.load_state_dict(wrong)
    assert flat.state_dict()["param_groups"] == before["param_groups"]


def test_bad_inputs_raise_clear_errors():
    masters, work, _, groups = _pair()
    with pytest.raises(ValueError, match="amsgrad is not implemented"):
        FlatAdamW([{**g, "amsgrad": True} for g in groups(masters)], zip(masters, work))
    with pytest.raises(ValueError, match="lr must be a float >= 0; got -1"):
        FlatAdamW(groups(masters), zip(masters, work), lr=-1)
    with pytest.raises(ValueError, match="parameter 0 .* has no working copy"):
        FlatAdamW(groups(masters), zip(masters[1:], work[1:]))
    with pytest.raises(ValueError, match="working copy of parameter 0 must be a bfloat16"):
        FlatAdamW(groups(masters), zip(masters, [w.float() for w in work]))
    with pytest.raises(ValueError, match="must be a float32 CPU tensor; got a torch.float16"):
        FlatAdamW([m.half() for m in masters], zip([m.half() for m in masters], work))
    with pytest.raises(ValueError, match="appear more than once"):
        FlatAdamW([masters[0], masters[0]], zip(masters, work))

    # the op itself (torch already refuses such .grad assignments)
    flat = FlatAdamW(groups(masters), zip(masters, work))
    op = torch.ops.fastgpt.flat_adamw_step_
    grads = _grads(1.0)
    with pytest.raises(ValueError, match=r"grad 0 has 3 elements but its tensor has 2145"):
        op(*_op_args(flat, [torch.zeros(3, dtype=torch.bfloat16)] + grads[1:], 1.0))
    with pytest.raises(ValueError, match="grads must be bfloat16 or float32; grad 0 is Half"):
        op(*_op_args(flat, [grads[0].half()] + grads[1:], 1.0))
    args = list(_op_args(flat, grads, 1.0))
    args[2] = flat._exp_avg_sq[1:]
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous with 26816 elements"):
        op(*args)
    args = list(_op_args(flat, grads, 1.0))
    args[9] = [0.1]
    with pytest.raises(ValueError, match="need one value per group; got 2, 1, 2, 2 and 2"):
        op(*args)
    assert not flat._steps.any()   # a failed call counts no step


def test_opcheck():
    flat, *_ = _make()
    torch.library.opcheck(torch.ops.fastgpt.flat_adamw_step_.default,
                          _op_args(flat, _grads(1.0, missing=(3,)), 1.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_fallback_when_the_extension_is_missing(monkeypatch, caplog):
    masters, work, _, groups = _pair()
    monkeypatch.setattr(optim, "unavailable", lambda: "not built (test)")
    with caplog.at_level(logging.WARNING, logger="fastgpt"):
        for _ in range(2):
            assert optim.flat_adamw_or_none(groups(masters), zip(masters, work), 1e-3, BETAS,
                                            1.0) is None
    assert [r.message for r in caplog.records].count(
        "fastgpt: the CPU optimizer step runs torch.optim.AdamW (not built (test))") == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_does_not_import_dynamo_or_fsdp(dtype):
    """Nor torch.distributed's checkpoint and FSDP modules (~1.7 s to import) when unsharded."""
    code = ("import sys, tempfile; from fastgpt.train import RunOptions, train; "
            f"train(RunOptions(out_dir=tempfile.mkdtemp(), dtype='{dtype}', device='cpu', "
            "progress=False, sample_chars=0, overrides=dict(max_iters=2, eval_interval=2, "
            "eval_iters=1, n_layer=1, n_embd=16, n_head=2, block_size=8, batch_size=2))); "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', "
            "'torch.distributed.checkpoint', 'torch.distributed.fsdp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=600)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
