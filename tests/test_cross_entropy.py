"""fastgpt.ops.cross_entropy: the torch reference's options and the Triton backend (interpreted).

Every case compares against the float64 ``torch`` backend, forward and backward with a random
grad_output, under the 2x-same-dtype-error rule (fastgpt.tools.accuracy).
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastgpt.ops as ops
from fastgpt.errors import FastGPTError
from fastgpt.kernels import cross_entropy as ce
from fastgpt.ops.cross_entropy import cross_entropy_torch
from fastgpt.ops.cross_entropy_triton import cross_entropy_triton, triton_unavailable
from fastgpt.tools.accuracy import assert_matches_reference

assert triton_unavailable() is None, triton_unavailable()   # also defines the ops

ALL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
OPTIONS = {"plain": {}, "smooth": dict(label_smoothing=0.2), "zloss": dict(z_loss=1e-2),
           "softcap": dict(softcap=5.0), "all": ALL}


def make(N, V, dtype, scale=3.0, ignore=(), ignore_index=-100):
    logits = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (N,))
    for i in ignore:
        targets[i] = ignore_index
    return logits, targets


def run(fn, logits, targets, g, **opts):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, targets, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), x)
    return out, grad


def check(logits, targets, name="", fn=cross_entropy_triton, **opts):
    """A backend (Triton's unless named) vs plain PyTorch in the same dtype, both against
    float64."""
    reduction = opts.get("reduction", "mean")
    # fp32, the losses' dtype: the float64 reference sees the same grad_output (a float64 one,
    # rounded for the fp32 runs only, would scale their gradients alike by up to half an ulp)
    g = torch.randn(targets.shape if reduction == "none" else ())
    out, grad = run(fn, logits, targets, g, **opts)
    base, base_grad = run(cross_entropy_torch, logits, targets, g, **opts)
    ref, ref_grad = run(cross_entropy_torch, logits.double(), targets, g, **opts)
    if opts.get("return_z_loss"):
        assert_matches_reference(out[1], base[1], ref[1], f"{name} z_loss")
        out, base, ref = out[0], base[0], ref[0]
    assert out.dtype == base.dtype == LOSS_DTYPES[logits.dtype]
    assert_matches_reference(out, base, ref, f"{name} loss")
    assert_matches_reference(grad, base_grad, ref_grad, f"{name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [65, 123])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_matches_reference(dtype, V, option):
    logits, targets = make(7, V, dtype, ignore=(2,))
    check(logits, targets, f"{dtype} V={V} {option}", **OPTIONS[option])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("N", [1, 33])
def test_triton_reductions(reduction, option, N):
    logits, targets = make(N, 65, torch.float32, ignore=(0,) if N > 1 else ())
    check(logits, targets, f"{reduction} {option} N={N}", reduction=reduction, **OPTIONS[option])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpt2_vocab(dtype):
    # V=50257 spans several blocks of the online log-sum-exp; N small for the interpreter
    logits, targets = make(3, 50257, dtype, ignore=(1,))
    check(logits, targets, "V=50257", **ALL)
    check(logits, targets, "V=50257 none", reduction="none")


def test_triton_return_z_loss_and_ignore_index():
    logits, targets = make(9, 65, torch.float32, ignore=(1, 4), ignore_index=7)
    check(logits, targets, "z", ignore_index=7, z_loss=1e-2, return_z_loss=True)
    loss, z = cross_entropy_triton(logits.requires_grad_(), targets, ignore_index=7,
                                   z_loss=1e-2, return_z_loss=True)
    assert not z.requires_grad and loss.requires_grad
    lse = torch.logsumexp(logits.detach().double(), -1)
    keep = targets != 7
    torch.testing.assert_close(z.double(), 1e-2 * lse[keep].square().mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_with_zero_grads(backend, reduction):
    logits = torch.randn(5, 65, requires_grad=True)
    targets = torch.full((5,), -100)
    loss = ops.cross_entropy(logits, targets, reduction=reduction, label_smoothing=0.1,
                             softcap=5.0, backend=backend)
    assert torch.all(loss == 0)
    (loss * torch.randn(loss.shape)).sum().backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("option", ["plain", "all"])
def test_extreme_logits(option):
    logits, targets = make(6, 123, torch.float32, scale=1.0, ignore=(5,))
    logits[:, ::3] = 1e4
    logits[:, 1::3] = -1e4
    logits[0] = -1e4
    logits[1, targets[1]] = 1e4
    check(logits, targets, f"extreme {option}", **OPTIONS[option])


@pytest.mark.parametrize("option", ["plain", "smooth", "zloss"])
def test_triton_large_logits_gradient(option):
    # logits near 300: the softmax in backward is exp(z - m) / s, not exp(z - lse) with lse
    # rounded to fp32 (off by up to 1.5e-5 there, which scaled the row's whole gradient)
    logits, targets = make(6, 123, torch.float32, ignore=(1,))
    check(logits + 300.0, targets, f"offset 300 {option}", **OPTIONS[option])


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, ce._tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 2.0), (torch.float64, 4.0)])
def test_kernel_tanh_relative_precision(dtype, ulps):
    # the softcap's tanh keeps relative precision near 0 (2 * sigmoid(2y) - 1 lost all of it
    # below |y| ~ 1e-7 in fp32) and saturates without overflow for large |y|
    mags = torch.cat([torch.logspace(-30, 1.5, 1500, dtype=torch.float64),
                      torch.linspace(0.01, 3.0, 500, dtype=torch.float64),
                      torch.tensor([0.0, 1e4, 1e30], dtype=torch.float64)])
    x = torch.cat([mags, -mags]).to(dtype)
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.tanh(x.double())
    r = ref.abs().to(dtype)
    ulp = (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()
    err = (y.double() - ref).abs() / ulp
    assert err.max() <= ulps, (err.max(), x[err.argmax()])


@pytest.mark.parametrize("scale", [1e-2, 1e-5])
def test_triton_softcap_small_logits(scale):
    # logits / softcap -> 0: z = cap * tanh(x / cap) must stay as precise as x itself
    logits, targets = make(9, 65, torch.float32, scale=scale, ignore=(3,))
    check(logits, targets, f"softcap, logits ~{scale}", softcap=30.0)
    check(logits, targets, f"softcap, logits ~{scale}, none", softcap=30.0, z_loss=1e-2,
          reduction="none")


@pytest.mark.parametrize("option", ["plain", "all"])
def test_triton_bf16_gradient_rounds_to_nearest(option):
    # the interpreter truncates fp32 -> bf16 conversions; GPUs round to nearest, and so must the
    # gradient that CPU validation sees: the bf16 run equals the fp32 run rounded to nearest
    logits, targets = make(7, 123, torch.bfloat16, ignore=(2,))
    g = torch.randn(())
    _, grad = run(cross_entropy_triton, logits, targets, g, **OPTIONS[option])
    _, grad32 = run(cross_entropy_triton, logits.float(), targets, g, **OPTIONS[option])
    assert torch.equal(grad, grad32.to(torch.bfloat16))


def test_non_contiguous_logits():
    base, targets = make(11, 130, torch.float32)
    targets = targets % 65
    check(base[:, ::2], targets, "strided columns", **ALL)        # (11, 65), column stride 2
    wide, _ = make(65, 11, torch.float32)
    check(wide.t(), targets, "transposed")                       # (11, 65), column-major


def test_float64_gradcheck():
    # fast_mode checks random projections of the Jacobian: the interpreter is slow
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 8, 0])
    for opts in ({}, dict(reduction="none", z_loss=0.1, softcap=3.0, label_smoothing=0.2)):
        assert torch.autograd.gradcheck(lambda x: cross_entropy_triton(x, t, **opts), (x,),
                                        fast_mode=True)
    # rows and lse are differentiable (lse carries the z-loss gradient); row max and sum are not
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.fastgpt.cross_entropy_fwd(x, t, -100, 0.2, 3.0)[:2], (x,),
        fast_mode=True)
    _, _, row_max, row_sum = torch.ops.fastgpt.cross_entropy_fwd(x, t, -100, 0.2, 3.0)
    assert not row_max.requires_grad and not row_sum.requires_grad


def test_opcheck():
    x = torch.randn(7, 65, requires_grad=True)
    t = torch.randint(0, 65, (7,))
    t[3] = -100
    torch.library.opcheck(torch.ops.fastgpt.cross_entropy_fwd.default, (x, t, -100, 0.1, 5.0))
    torch.library.opcheck(torch.ops.fastgpt.cross_entropy_fwd.default, (x, t, -100, 0.0, 0.0))
    row_max, row_sum, a, b = torch.randn(7), torch.rand(7) + 1, torch.randn(7), torch.randn(7)
    torch.library.opcheck(torch.ops.fastgpt.cross_entropy_bwd.default,
                          (x.detach(), t, row_max, row_sum, a, b, 0.1, 5.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    logits, targets = make(7, 65, torch.float32, ignore=(3,))
    g = torch.randn(())
    fn = torch.compile(lambda x, t: ops.cross_entropy(x, t, backend=backend, **ALL),
                       fullgraph=True)
    out, grad = run(fn, logits, targets, g)
    ref, ref_grad = run(lambda x, t: ops.cross_entropy(x, t, backend=backend, **ALL),
                        logits, targets, g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype,option", [(torch.bfloat16, "all"), (torch.float32, "plain")])
def test_compile_backend(dtype, option):
    # torch.compile of the torch reference, built on first use; each case compiles (seconds).
    # Per-row losses: a compiled sum of rows rounds in its own order, so a scalar fp32 mean is
    # only as close to float64 as one ulp, whatever plain PyTorch's luck
    def fn(x, t, **opts):
        return ops.cross_entropy(x, t, backend="compile", **opts)
    logits, targets = make(7, 65, dtype, ignore=(3,))
    check(logits, targets, f"compile {dtype} {option}", fn=fn, reduction="none",
          return_z_loss=True, **OPTIONS[option])


def test_torch_reference_options_agree_with_functional():
    # the explicit formula (taken whenever z-loss/softcap/return_z_loss is on) and
    # F.cross_entropy's label smoothing are the same function
    logits, targets = make(9, 65, torch.float64, ignore=(2,))
    for reduction in ("mean", "sum", "none"):
        explicit, _ = cross_entropy_torch(logits, targets, reduction=reduction,
                                          label_smoothing=0.3, return_z_loss=True)
        fused = F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=0.3)
        torch.testing.assert_close(explicit, fused)


def test_out_of_range_targets():
    logits = torch.randn(4, 65)
    for bad in (65, -1, 1000):
        targets = torch.tensor([0, bad, 3, -100])
        for backend in ("torch", "triton"):
            with pytest.raises(FastGPTError, match=f"target {bad} at position 1"):
                ops.cross_entropy(logits, targets, backend=backend)
    # the kernel itself never silently uses a bad target: that row's loss is NaN
    rows = torch.ops.fastgpt.cross_entropy_fwd(logits, torch.tensor([0, 65, 3, -100]),
                                               -100, 0.0, 0.0)[0]
    assert rows[1].isnan() and rows[[0, 2]].isfinite().all() and rows[3] == 0


def test_bad_options_raise():
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    for kwargs in (dict(label_smoothing=1.5), dict(z_loss=-1.0), dict(softcap=0.0),
                   dict(reduction="avg")):
        with pytest.raises(FastGPTError):
            ops.cross_entropy(logits, targets, **kwargs)


def test_default_backend_on_cpu_is_torch():
    from fastgpt.ops import registry
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert registry.choose("cross_entropy", "cpu", (logits, targets), {}).name == "torch"


def half_ulp(ref64, dtype):
    """Half a unit in the last place of ``dtype`` at each element of ``ref64`` (the larger one
    at a power of two)."""
    r = ref64.abs().to(dtype)
    return (torch.nextafter(r, torch.full_like(r, float("inf"))).double() - r.double()) / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_low_precision_computes_in_fp32(dtype, option, reduction):
    # the reference computes in fp32 and rounds the gradient once to the logits' dtype: the same
    # numbers as an fp32 run, and every gradient element within half a unit in the last place of
    # float64's (plus fp32's error, ~1e-6 of the largest), so no near-zero gradient flips sign
    logits, targets = make(7, 123, dtype, ignore=(2,))
    opts = dict(reduction=reduction, **OPTIONS[option])
    g = torch.randn(targets.shape if reduction == "none" else ())
    out, grad = run(cross_entropy_torch, logits, targets, g, **opts)
    out32, grad32 = run(cross_entropy_torch, logits.float(), targets, g, **opts)
    _, ref_grad = run(cross_entropy_torch, logits.double(), targets, g, **opts)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(out, out32)
    assert torch.equal(grad, grad32.to(dtype))
    err = (grad.double() - ref_grad).abs()
    assert (err <= half_ulp(ref_grad, dtype) + 1e-6 * ref_grad.abs().max()).all(), err.max()


LOSS_DTYPES = {torch.bfloat16: torch.float32, torch.float16: torch.float32,
               torch.float32: torch.float32, torch.float64: torch.float64}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(LOSS_DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_dtype(backend, dtype, reduction):
    # fp32 losses for fp16/bf16 logits (as Liger-Kernel and ml-cross-entropy return), float64
    # for float64; the z-loss part likewise; both the fused and the explicit torch path
    logits, targets = make(5, 65, dtype, ignore=(1,))
    want = LOSS_DTYPES[dtype]
    loss = ops.cross_entropy(logits, targets, reduction=reduction, backend=backend)
    assert loss.dtype == want
    loss, z = ops.cross_entropy(logits, targets, reduction=reduction, z_loss=1e-3,
                                return_z_loss=True, backend=backend)
    assert loss.dtype == want and z.dtype == want
