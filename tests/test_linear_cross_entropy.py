"""fastgpt.ops.linear_cross_entropy: chunked, compile and triton (interpreted) backends.

Each is compared with the float64 ``torch`` backend (it materialises the logits), forward and
gradients of hidden, weight and bias with a random grad_output, under the 2x-same-dtype-error
rule. ``chunk_rows``, or a small logits budget ``chunk_elements``, makes small shapes run
several chunks (with a ragged last one).
"""

import pytest
import torch

import fastgpt.ops as ops
from fastgpt.errors import FastGPTError
from fastgpt.ops import linear_cross_entropy_chunked as lce
from fastgpt.ops import registry
from fastgpt.ops.cross_entropy import cross_entropy_torch
from fastgpt.ops.linear_cross_entropy import linear_cross_entropy_torch
from fastgpt.tools.accuracy import assert_matches_reference

ALL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
OPTIONS = {"plain": {}, "smooth": dict(label_smoothing=0.2), "zloss": dict(z_loss=1e-2),
           "softcap": dict(softcap=5.0), "all": ALL}
BACKENDS = {"chunked": lce.linear_cross_entropy_chunked,
            "compile": lce.linear_cross_entropy_compile,
            "triton": lce.linear_cross_entropy_triton}
LOSS_DTYPES = {torch.bfloat16: torch.float32, torch.float16: torch.float32,
               torch.float32: torch.float32, torch.float64: torch.float64}


def make(N, C, V, dtype, bias=False, ignore=(), ignore_index=-100):
    hidden = torch.randn(N, C, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, C, dtype=torch.float64) / C ** 0.5 * 2).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    for i in ignore:
        targets[i] = ignore_index
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, g, **opts):
    """(loss, [dhidden, dweight, dbias]) with grad_output g."""
    inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fn(inputs[0], inputs[1], targets, bias=inputs[2] if bias is not None else None, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), inputs)
    return out, grads


def check(backend, hidden, weight, bias, targets, name="", **opts):
    reduction = opts.get("reduction", "mean")
    # fp32, the losses' dtype: the float64 reference sees the same grad_output (a float64 one,
    # rounded for the fp32 runs only, would scale their gradients alike by up to half an ulp)
    g = torch.randn(targets.shape if reduction == "none" else ())
    out, grads = run(BACKENDS[backend], hidden, weight, bias, targets, g, **opts)
    opts.pop("chunk_rows", None)
    opts.pop("chunk_elements", None)
    base, base_grads = run(linear_cross_entropy_torch, hidden, weight, bias, targets, g, **opts)
    to64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    ref, ref_grads = run(linear_cross_entropy_torch, *to64, targets, g, **opts)
    if opts.get("return_z_loss"):
        assert not out[1].requires_grad
        assert_matches_reference(out[1], base[1], ref[1], f"{name} z_loss")
        out, base, ref = out[0], base[0], ref[0]
    assert out.dtype == base.dtype == LOSS_DTYPES[hidden.dtype]
    assert_matches_reference(out, base, ref, f"{backend} {name} loss")
    for what, a, b, r in zip(("dhidden", "dweight", "dbias"), grads, base_grads, ref_grads):
        assert a.dtype == b.dtype
        assert_matches_reference(a, b, r, f"{backend} {name} {what}")


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(backend, dtype, option):
    hidden, weight, bias, targets = make(13, 16, 123, dtype, bias=True, ignore=(4,))
    check(backend, hidden, weight, bias, targets, f"{dtype} {option}", chunk_rows=5,
          **OPTIONS[option])


CHUNKINGS = {"auto": dict(chunk_elements=3 * 65 + 1),   # automatic R = 3: 3 + 3 + 3 + 2 rows
             "rows4": dict(chunk_rows=4),               # 4 + 4 + 3
             "one": dict(chunk_rows=100)}               # one chunk, forced


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_reductions_and_chunking(backend, reduction, option, chunking):
    hidden, weight, bias, targets = make(11, 8, 65, torch.float32, ignore=(0, 7))
    check(backend, hidden, weight, bias, targets, f"{reduction} {option} {chunking}",
          reduction=reduction, **CHUNKINGS[chunking], **OPTIONS[option])


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("budget,sizes", [(1, [1] * 11), (4 * 65, [4, 4, 3]),
                                          (6 * 65 + 10, [6, 5])])
def test_automatic_chunks_match_reference(backend, bias, budget, sizes, monkeypatch):
    # N * V above the logits budget: the automatic chunk loop (not the one-chunk torch graph),
    # forward and the hidden, weight and bias gradients against float64
    seen = []
    step = lce._STEP_FNS[backend]

    def spy(x, *args):
        seen.append(x.shape[0])
        return step(x, *args)
    monkeypatch.setitem(lce._STEP_FNS, backend, spy)
    hidden, weight, b, targets = make(11, 8, 65, torch.bfloat16, bias=bias, ignore=(2,))
    for reduction in ("mean", "none"):
        seen.clear()
        check(backend, hidden, weight, b, targets, f"budget {budget} {reduction}",
              reduction=reduction, chunk_elements=budget, **ALL)
        assert seen[:len(sizes)] == sizes


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_gpt2_vocab(backend):
    # chunks of 4 rows: torch's CPU fp32 matmul of 1-3 rows sums the 50257 products of
    # dlogits @ W with ~5x the scale error of its many-row path (the reference's), whatever the
    # logits gradient; real chunks have hundreds of rows
    hidden, weight, bias, targets = make(8, 16, 50257, torch.float32, ignore=(2,))
    check(backend, hidden, weight, bias, targets, "V=50257", chunk_rows=4, **ALL)


@pytest.mark.parametrize("step", ["chunked", "triton", "compile"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_step_gradient_precision_at_gpt2_vocab(step, option):
    # each row of an fp32 logits gradient within a few units in the last place of float64 (at
    # the row's largest element): softmax is exp(z - m) / s with an accurate row sum; torch's
    # CPU log_softmax / logsumexp over 50257 columns are off by up to ~1e-5 of the row, and the
    # plain-PyTorch yardstick with them, so the accuracy rule alone cannot see this
    x = torch.randn(4, 50257) * 4
    t = torch.randint(0, 50257, (4,))
    coef = torch.randn(4)
    smoothing, z_loss, softcap = (0.1, 1e-3, 30.0) if option == "all" else (0.0, 0.0, None)
    x64 = x.double().requires_grad_()
    rows = cross_entropy_torch(x64, t, reduction="none", label_smoothing=smoothing, z_loss=z_loss,
                               softcap=softcap)
    (ref,) = torch.autograd.grad((rows * coef.double()).sum(), x64)
    _, _, d = lce._STEP_FNS[step](x.clone(), t, -100, coef, smoothing, z_loss, softcap or 0.0)
    err = (d.double() - ref).abs().amax(1) / ref.abs().amax(1)
    assert (err <= 4 * torch.finfo(torch.float32).eps).all(), err


def test_gpt2_vocab_bf16_chunked():
    hidden, weight, bias, targets = make(7, 16, 50257, torch.bfloat16, bias=True)
    check("chunked", hidden, weight, bias, targets, "V=50257 bf16", chunk_rows=3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_backend(reduction):
    # torch.compile of the step costs seconds per variant: few cases
    hidden, weight, bias, targets = make(11, 8, 65, torch.float32, bias=True, ignore=(3,))
    check("compile", hidden, weight, bias, targets, reduction, reduction=reduction,
          chunk_rows=4, **ALL)


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_return_z_loss(backend):
    hidden, weight, bias, targets = make(9, 8, 65, torch.float32, ignore=(1,))
    fn = BACKENDS.get(backend, linear_cross_entropy_torch)
    opts = dict(chunk_rows=4) if backend != "torch" else {}
    (loss, z), _ = run(fn, hidden, weight, bias, targets, torch.randn(()), z_loss=1e-2,
                       return_z_loss=True, **opts)
    lse = torch.logsumexp((hidden @ weight.t()).double(), -1)
    keep = targets != -100
    torch.testing.assert_close(z.double(), 1e-2 * lse[keep].square().mean(), rtol=1e-5,
                               atol=1e-6)
    assert not z.requires_grad


@pytest.mark.parametrize("backend", ["chunked", "triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_with_zero_grads(backend, reduction):
    hidden, weight, bias, targets = make(6, 8, 65, torch.float32, bias=True)
    targets[:] = -100
    fn = BACKENDS.get(backend, linear_cross_entropy_torch)
    opts = dict(chunk_rows=4) if backend != "torch" else {}
    out, grads = run(fn, hidden, weight, bias, targets,
                     torch.randn(6 if reduction == "none" else ()), reduction=reduction,
                     **ALL, **opts)
    assert torch.all(out == 0)
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_extreme_logits_finite(backend):
    hidden, weight, bias, targets = make(6, 8, 65, torch.float32, ignore=(5,))
    hidden = hidden * 3e3    # logits of order 1e4
    check(backend, hidden, weight, bias, targets, "extreme", chunk_rows=4)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_grad_and_partial_grads(backend):
    hidden, weight, bias, targets = make(9, 8, 65, torch.float32, bias=True)
    fn = BACKENDS[backend]
    ref = linear_cross_entropy_torch(hidden, weight, targets, bias=bias)
    with torch.no_grad():
        torch.testing.assert_close(fn(hidden, weight, targets, bias=bias, chunk_rows=4), ref)
    g = torch.randn(())
    w = weight.clone().requires_grad_()    # only the weight asks for a gradient
    (fn(hidden, w, targets, bias=bias, chunk_rows=4) * g).backward()
    w_ref = weight.clone().requires_grad_()
    (linear_cross_entropy_torch(hidden, w_ref, targets, bias=bias) * g).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("backend,dtype,chunk_rows",
                         [(b, d, r) for b in ("torch", "chunked", "triton") for d in LOSS_DTYPES
                          for r in (0, 4)] + [("compile", torch.bfloat16, 4)])
def test_loss_dtype(backend, dtype, chunk_rows):
    # fp32 losses and z-loss parts for fp16/bf16 inputs, float64 for float64, every reduction;
    # chunk_rows 0 takes the one-chunk path (for "chunked": the torch graph), 4 the chunk loop;
    # "compile" once (each option compiles anew)
    hidden, weight, bias, targets = make(9, 8, 65, dtype, bias=True, ignore=(1,))
    fn = BACKENDS.get(backend, linear_cross_entropy_torch)
    opts = dict(chunk_rows=chunk_rows) if backend != "torch" else {}
    want = LOSS_DTYPES[dtype]
    for reduction in ("none",) if backend == "compile" else ("mean", "sum", "none"):
        if backend != "compile":
            assert fn(hidden, weight, targets, bias=bias, reduction=reduction, **opts).dtype == want
        loss, z = fn(hidden, weight, targets, bias=bias, reduction=reduction, z_loss=1e-3,
                     return_z_loss=True, **opts)
        assert loss.dtype == want and z.dtype == want


def test_opcheck():
    hidden, weight, bias, targets = make(9, 8, 65, torch.float32, bias=True, ignore=(2,))
    hidden.requires_grad_()
    weight.requires_grad_()
    for reduction in ("mean", "none"):
        args = (hidden, weight, bias, targets, -100, reduction, 0.1, 1e-3, 5.0, "chunked", 4,
                True, True, False)
        torch.library.opcheck(torch.ops.fastgpt.linear_cross_entropy_chunked.default, args)
    torch.library.opcheck(torch.ops.fastgpt.linear_cross_entropy_chunked_bwd.default,
                          (hidden.detach(), weight.detach(), bias, targets, torch.randn(9), -100,
                           0.1, 1e-3, 5.0, "chunked", 4, True, True, True))


@pytest.mark.parametrize("backend,chunked", [("chunked", True), ("chunked", False),
                                             ("triton", True)])
def test_compile_fullgraph(backend, chunked):
    # "chunked" with one chunk runs the plain graph; with several, the custom op
    hidden, weight, bias, targets = make(9, 8, 65, torch.float32, ignore=(3,))
    if backend == "chunked" and chunked:   # N*V big enough for two automatic chunks
        hidden, weight, bias, targets = make(300, 8, 65537, torch.float32, ignore=(3,))
    g = torch.randn(())

    def fn(h, w, t, bias=None):
        return ops.linear_cross_entropy(h, w, t, bias=bias, backend=backend, **ALL)
    out, grads = run(torch.compile(fn, fullgraph=True), hidden, weight, bias, targets, g)
    ref, ref_grads = run(fn, hidden, weight, bias, targets, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_auto_chunks():
    assert lce.auto_chunk_rows(65) >= 16384        # baby, shakespeare-char: one chunk
    assert lce.auto_chunk_rows(50304) == 333       # GPT-2 small: 25 chunks of 8192 tokens


def test_default_backends():
    hidden, weight, bias, targets = make(3, 4, 5, torch.float32)
    assert registry.choose("linear_cross_entropy", "cpu", (hidden, weight, targets), {}).name \
        == "chunked"
    assert ops.linear_cross_entropy(hidden, weight, targets).isfinite()


def test_errors():
    hidden, weight, bias, targets = make(3, 4, 5, torch.float32)
    with pytest.raises(FastGPTError, match="target 5 at position 2"):
        ops.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 5]))
    with pytest.raises(FastGPTError, match="label_smoothing"):
        ops.linear_cross_entropy(hidden, weight, targets, label_smoothing=-0.1)
    with pytest.raises(FastGPTError, match="one dtype"):
        ops.linear_cross_entropy(hidden, weight.double(), targets, backend="chunked")
