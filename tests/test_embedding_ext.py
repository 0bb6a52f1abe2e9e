"""fastgpt._C's embedding ops (the ``ext`` backend) against F.embedding and a float64 reference.

Forward must be bitwise equal to F.embedding; backward must meet the accuracy rule against a
float64 reference and be bitwise reproducible across runs and thread counts.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.ops import embedding_ext, extension, registry
from fastgpt.tools.accuracy import assert_matches_reference

# the README install builds fastgpt._C: a missing extension is a failure, not a skip
assert embedding_ext.available() is None, embedding_ext.available()

fwd = torch.ops.fastgpt.embedding_forward
bwd = torch.ops.fastgpt.embedding_backward
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the only skip allowed (tests/conftest.py fails the run on any skip without the cuda mark)
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or not extension.has_kernel("fastgpt::embedding_forward", "CUDA"),
    reason="needs a CUDA GPU and fastgpt._C built with CUDA")]
# The kernels the op-level tests run: the CPU ones, the CUDA ones run thread by thread on CPU
# tensors (csrc/embedding_cuda_emulated.cpp: the same kernel and host code, so CI tests it
# without a GPU), and the CUDA ones on a GPU: name -> (device, forward op, backward op)
KERNELS = {"cpu": ("cpu", fwd, bwd),
           "cuda-emulated": ("cpu", torch.ops.fastgpt._embedding_forward_emulated,
                             torch.ops.fastgpt._embedding_backward_emulated),
           "cuda": ("cuda", fwd, bwd)}
CUDA_KERNELS = ["cuda-emulated", pytest.param("cuda", marks=needs_cuda)]
ALL_KERNELS = ["cpu"] + CUDA_KERNELS


def _weight(V, C, dtype, requires_grad=False):
    return torch.randn(V, C, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def _reference_grad(indices, grad_out, V, padding_idx=None):
    """float64 sum of grad_out rows per index; the padding row stays zero."""
    C = grad_out.shape[-1]
    ref = torch.zeros(V, C, dtype=torch.float64)
    ref.index_add_(0, indices.reshape(-1).long(), grad_out.reshape(-1, C).double())
    if padding_idx is not None:
        ref[padding_idx] = 0
    return ref


def _torch_grad(indices, weight, grad_out, padding_idx=None):
    w = weight.detach().clone().requires_grad_(True)
    F.embedding(indices, w, padding_idx=padding_idx).backward(grad_out)
    return w.grad


def _ext_grad(indices, weight, grad_out, padding_idx=None):
    w = weight.detach().clone().requires_grad_(True)
    ops.embedding(indices, w, padding_idx=padding_idx, backend="ext").backward(grad_out)
    return w.grad


# ------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("V,C,shape", [(65, 64, (4, 97)), (1000, 7, (13,)), (3, 130, (2, 3, 5)),
                                       (50, 1, (1, 1)), (8, 16, (0, 4)), (4, 0, (3,)),
                                       (65, 512, (16384,)),   # 32-64 MiB: huge-page advice
                                       (50304, 768, (8, 1024))])
def test_forward_bitwise_equal(kernel, dtype, index_dtype, V, C, shape):
    device, forward, _ = KERNELS[kernel]
    weight = _weight(V, C, dtype).to(device)
    indices = torch.randint(0, V, shape, dtype=index_dtype).to(device)
    out = forward(weight, indices, -1)
    assert out.shape == (*shape, C) and out.dtype == dtype and out.device == weight.device
    assert torch.equal(out, F.embedding(indices, weight))


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype,C,offset", [   # row bytes and alignment pick 16/8/4/2-byte copies
    (torch.float32, 8, 0), (torch.float32, 2, 0), (torch.float32, 8, 2), (torch.float32, 8, 1),
    (torch.float32, 3, 0), (torch.bfloat16, 8, 1), (torch.bfloat16, 3, 0), (torch.float16, 4, 0)])
def test_gpu_forward_every_copy_width(kernel, dtype, C, offset):
    device, forward, _ = KERNELS[kernel]
    V = 37
    weight = _weight(1, V * C + offset, dtype).view(-1)[offset:].view(V, C).to(device)
    indices = torch.randint(0, V, (5, 41)).to(device)
    assert torch.equal(forward(weight, indices, -1), F.embedding(indices, weight))


def test_forward_non_contiguous_inputs():
    base = _weight(40, 24, torch.float32)
    weight = base[:, ::2]                                  # strided rows
    indices = torch.randint(0, 40, (9, 5)).t()             # transposed indices
    assert torch.equal(fwd(weight, indices, -1), F.embedding(indices, weight))


# ----------------------------------------------------------------------------------- backward

# (V, tokens, C): many repeats (a character vocabulary), every index distinct, odd widths, and
# tables over 2 MiB (grouped algorithm) with many tokens per row and with few
CASES = [(65, 8192, 32), (4096, 4096, 24), (97, 300, 300), (5, 7, 3), (20000, 8192, 40),
         (50000, 1000, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N,C", CASES)
def test_backward_matches_reference(dtype, V, N, C):
    weight = _weight(V, C, dtype)
    indices = torch.randperm(V)[:N] if N == V else torch.randint(0, V, (N,))
    indices = indices.view(-1, N // 4 if N % 4 == 0 else N)
    grad_out = torch.randn(*indices.shape, C).to(dtype)
    got = _ext_grad(indices, weight, grad_out)
    plain = _torch_grad(indices, weight, grad_out)
    ref = _reference_grad(indices, grad_out, V)
    assert got.dtype == dtype
    assert_matches_reference(got, plain, ref, f"grad_weight {dtype} V={V} N={N} C={C}")
    if dtype == torch.float32:  # same as aten's gradient up to fp32 summation order
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * N ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [65, 40000, 100000])   # streaming; counting / comparison sort
def test_backward_deterministic_across_runs_and_threads(dtype, V):
    N, C = 8192, 96
    indices = torch.randint(0, V, (8, N // 8))
    grad_out = torch.randn(8, N // 8, C).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = bwd(grad_out, indices, V, -1, True)
        again = bwd(grad_out, indices, V, -1, True)
        torch.set_num_threads(1)
        single = bwd(grad_out, indices, V, -1, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, again) and torch.equal(first, single)
    # the flag only changes the CUDA algorithm; on CPU both are the deterministic one
    assert torch.equal(first, bwd(grad_out, indices, V, -1, False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [16, 300])   # rows of one and of two column blocks
@pytest.mark.parametrize("N", [8192, 512])   # large table: counting sort / comparison sort
def test_backward_algorithms_agree_bitwise(dtype, C, N):
    """A small table takes the streaming algorithm, a large one the grouped one: same bits.
    The large table is mostly rows without tokens (zeroed in runs) around a padding row."""
    indices = torch.randint(0, 65, (4, N // 4))
    grad_out = torch.randn(4, N // 4, C).to(dtype)
    small = bwd(grad_out, indices, 65, 3, True)          # 65 x C fp32 accumulators: streaming
    large = bwd(grad_out, indices, 40000, 3, True)       # 40000 x C x 4 B > 2 MiB: sorted
    assert torch.equal(small, large[:65]) and not large[65:].any()


def _tensor_allocations(fn, tmp_path) -> list[int]:
    """Sizes of the tensors torch allocates while fn runs (the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return [e["args"]["Bytes"] for e in events
            if e.get("name") == "[memory]" and e["args"]["Bytes"] > 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [65, 40000])   # the small-table and the sorted algorithm
def test_backward_allocates_only_its_result(dtype, V, tmp_path):
    """No second (V, C) tensor: fp32 gradients are summed in the output itself, fp16/bf16 ones in
    per-thread fp32 scratch (a 1 KiB block, or a V x column-slice buffer for small tables)."""
    N, C = 1024, 64
    indices = torch.randint(0, V, (N,))
    grad_out = torch.randn(N, C).to(dtype)
    bwd(grad_out, indices, V, -1, True)
    sizes = _tensor_allocations(lambda: bwd(grad_out, indices, V, -1, True), tmp_path)
    assert sizes == [V * C * grad_out.element_size()]


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_non_contiguous_grad_and_int32(kernel, deterministic):
    device, _, backward = KERNELS[kernel]
    V, C = 33, 20
    indices = torch.randint(0, V, (6, 11), dtype=torch.int32)
    grad_out = torch.randn(C, 11, 6).permute(2, 1, 0)      # (6, 11, C), not contiguous
    got = backward(grad_out.to(device), indices.to(device), V, -1, deterministic)
    torch.testing.assert_close(got.cpu(), _reference_grad(indices, grad_out, V).float())


def test_nondeterministic_backend_path_matches():
    weight = _weight(65, 16, torch.float32, requires_grad=True)
    indices = torch.randint(0, 65, (4, 50))
    grad_out = torch.randn(4, 50, 16)
    embedding_ext.embedding_ext(indices, weight, deterministic=False).backward(grad_out)
    torch.testing.assert_close(weight.grad, _torch_grad(indices, weight, grad_out))


# -------------------------------------------------------------------------------- padding_idx

@pytest.mark.parametrize("padding_idx", [0, 7, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_idx_like_nn_embedding(padding_idx, dtype):
    V, C = 12, 10
    weight = _weight(V, C, dtype)
    indices = torch.randint(0, V, (5, 40))
    indices[0, :3] = padding_idx % V
    grad_out = torch.randn(5, 40, C).to(dtype)
    w = weight.clone().requires_grad_(True)
    out = ops.embedding(indices, w, padding_idx=padding_idx, backend="ext")
    assert torch.equal(out, F.embedding(indices, weight, padding_idx=padding_idx))
    out.backward(grad_out)
    assert not w.grad[padding_idx].any()
    ref = _reference_grad(indices, grad_out, V, padding_idx % V)
    plain = _torch_grad(indices, weight, grad_out, padding_idx)
    assert_matches_reference(w.grad, plain, ref, f"grad_weight padding_idx={padding_idx}")


def test_padding_idx_out_of_range():
    weight, indices = _weight(10, 4, torch.float32), torch.tensor([1, 2])
    with pytest.raises(FastGPTError, match=r"padding_idx must be in \[-10, 10\).*got 10"):
        ops.embedding(indices, weight, padding_idx=10, backend="ext")
    with pytest.raises(ValueError, match=r"padding_idx must be -1 \(none\) or in \[0, 10\); got 10"):
        fwd(weight, indices, 10)
    with pytest.raises(ValueError, match=r"padding_idx must be -1 \(none\) or in \[0, 10\); got -2"):
        bwd(torch.randn(2, 4), indices, 10, -2, True)


# --------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [-1, 65, 1000])
def test_out_of_range_index_names_value_and_size(kernel, index_dtype, bad):
    device, forward, backward = KERNELS[kernel]
    weight = _weight(65, 8, torch.float32).to(device)
    indices = torch.randint(0, 65, (3, 50), dtype=index_dtype).to(device)
    indices[2, 17] = bad
    msg = rf"index {bad} is out of range for an embedding table of 65 rows"
    with pytest.raises(IndexError, match=msg):
        forward(weight, indices, -1)
    for deterministic in (True, False):
        with pytest.raises(IndexError, match=msg):
            backward(torch.randn(3, 50, 8, device=device), indices, 65, -1, deterministic)
    if forward is fwd:
        with pytest.raises(IndexError, match=msg):
            ops.embedding(indices, weight, backend="ext")
    # nothing was poisoned (on CUDA: no device-side assert)
    good = indices.clamp(0, 64)
    assert torch.equal(forward(weight, good, -1), F.embedding(good, weight))


def test_bad_dtypes_shapes_and_devices():
    weight, indices = _weight(10, 4, torch.float32), torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="weight must be float32, float16 or bfloat16; got Double"):
        fwd(weight.double(), indices, -1)
    with pytest.raises(ValueError, match="indices must be int64 or int32; got Float"):
        fwd(weight, indices.float(), -1)
    with pytest.raises(ValueError, match="indices must be int64 or int32; got Short"):
        bwd(torch.randn(1, 2, 4), indices.short(), 10, -1, True)
    with pytest.raises(ValueError, match=r"weight must be 2-D; got shape \[10, 4, 1\]"):
        fwd(weight.unsqueeze(-1), indices, -1)
    with pytest.raises(ValueError, match=r"weight must be 2-D; got shape \[40\]"):
        fwd(weight.flatten(), indices, -1)
    with pytest.raises(ValueError, match=r"grad_out must have shape indices.shape \+ \(dim,\)"):
        bwd(torch.randn(2, 2, 4), indices, 10, -1, True)
    with pytest.raises(ValueError, match="grad_out must be float32, float16 or bfloat16"):
        bwd(torch.randn(1, 2, 4).double(), indices, 10, -1, True)
    with pytest.raises(ValueError, match="num_weights must be >= 0; got -3"):
        bwd(torch.randn(1, 2, 4), indices, -3, -1, True)
    # the public entry point rejects mixed devices before any kernel runs
    with pytest.raises(FastGPTError, match="indices are on meta but weight is on cpu"):
        ops.embedding(indices.to("meta"), weight, backend="ext")
    with pytest.raises(FastGPTError, match="must be int64 or int32"):
        ops.embedding(indices.float(), weight, backend="ext")


# --------------------------------------------------------------------------------- autograd

def test_autograd_graph_like_aten():
    """The C++ autograd node: one edge to weight, saved indices freed after backward, saved-tensor
    hooks see the indices."""
    weight = _weight(65, 16, torch.float32, requires_grad=True)
    indices = torch.randint(0, 65, (4, 8))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = ops.embedding(indices, weight, backend="ext")
    assert len(packed) == 1 and packed[0] is indices
    assert out.grad_fn.name() == "fastgpt::EmbeddingBackward"
    (edge,) = out.grad_fn.next_functions
    assert edge[0].variable is weight   # weight's AccumulateGrad
    grad_out = torch.randn(4, 8, 16)
    out.backward(grad_out)
    torch.testing.assert_close(weight.grad, _torch_grad(indices, weight, grad_out))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(grad_out)
    with torch.no_grad():
        assert ops.embedding(indices, weight, backend="ext").grad_fn is None


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_forward_mode_ad_like_f_embedding(padding_idx):
    weight, tangent = _weight(11, 6, torch.float32), torch.randn(11, 6)
    indices = torch.randint(0, 11, (3, 5))
    out, out_tangent = torch.func.jvp(
        lambda w: ops.embedding(indices, w, padding_idx=padding_idx, backend="ext"),
        (weight,), (tangent,))
    assert torch.equal(out, F.embedding(indices, weight))
    assert torch.equal(out_tangent, F.embedding(indices, tangent, padding_idx=padding_idx))


# ------------------------------------------- CUDA kernels (emulated on the CPU, and on a GPU)

@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N,C", CASES + [(65, 65536, 128), (1, 5000, 16)])   # + long runs
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_backward_matches_reference(kernel, dtype, V, N, C, deterministic):
    device, _, backward = KERNELS[kernel]
    indices = torch.randint(0, V, (N,))
    grad_out = torch.randn(N, C).to(dtype)
    pad = 3 if V > 3 else None
    run = lambda: backward(grad_out.to(device), indices.to(device), V,  # noqa: E731
                           -1 if pad is None else pad, deterministic)
    got = run()
    assert got.dtype == dtype and got.shape == (V, C) and got.device.type == device
    plain = _torch_grad(indices.to(device), _weight(V, C, dtype).to(device), grad_out.to(device), pad)
    ref = _reference_grad(indices, grad_out, V, pad)
    assert_matches_reference(got.cpu(), plain.cpu(), ref, f"{kernel} grad_weight {dtype} V={V} N={N}")
    if deterministic:   # bitwise reproducible
        assert torch.equal(got, run())


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_backward_runs_around_the_chunk_size(kernel, dtype, deterministic):
    """The deterministic kernel cuts runs of equal indices longer than 32 positions into chunks
    of 32: runs of every length around those edges, in shuffled token order, one of them padding.
    The offset grad (not 16-byte aligned) takes the one-element path."""
    device, _, backward = KERNELS[kernel]
    lengths = torch.tensor([1, 31, 32, 33, 64, 65, 95, 96, 97, 160, 2])
    indices = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    indices = indices[torch.randperm(len(indices))].view(2, -1)
    C, pad = 24, 5
    for offset in (0, 1):
        grad_out = torch.randn(indices.numel() * C + offset).to(dtype)[offset:].view(*indices.shape, C)
        got = backward(grad_out.to(device), indices.to(device), 12, pad, deterministic).cpu()
        ref = _reference_grad(indices, grad_out, 12, pad)
        plain = _torch_grad(indices, _weight(12, C, dtype), grad_out, pad)
        assert_matches_reference(got, plain, ref, f"{kernel} {dtype} offset={offset}")
        assert not got[pad].any() and not got[11].any()


# ------------------------------------------------------------------ registration and dispatch

@pytest.mark.parametrize("dtype,index_dtype,padding_idx", [
    (torch.float32, torch.int64, -1), (torch.bfloat16, torch.int32, 3), (torch.float16, torch.int64, 0)])
def test_opcheck(dtype, index_dtype, padding_idx):
    weight = _weight(17, 12, dtype, requires_grad=True)
    indices = torch.randint(0, 17, (3, 9), dtype=index_dtype)
    torch.library.opcheck(fwd, (weight, indices, padding_idx))
    torch.library.opcheck(bwd, (torch.randn(3, 9, 12).to(dtype), indices, 17, padding_idx, True))


def test_ext_is_the_cpu_default():
    weight, indices = _weight(10, 4, torch.float32), torch.tensor([1])
    assert registry.choose("embedding", "cpu", (indices, weight), {}).name == "ext"
    assert "ext" in ops.available_backends("embedding")


def test_falls_back_to_torch_when_not_built(monkeypatch):
    reason = "fastgpt._C is not built (FASTGPT_SKIP_EXT=1 or no compiler at install time)"
    monkeypatch.setitem(extension._state, "reason", reason)
    weight, indices = _weight(10, 4, torch.float32), torch.tensor([1, 9])
    assert registry.choose("embedding", "cpu", (indices, weight), {}).name == "torch"
    assert torch.equal(ops.embedding(indices, weight), F.embedding(indices, weight))
    with pytest.raises(FastGPTError, match="fastgpt._C is not built"):
        ops.embedding(indices, weight, backend="ext")


def _graph_ops(fn, *args):
    """Compile ``fn`` with fullgraph=True; return its result and the ops in the traced graph."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True)(*args), seen


def test_compile_fullgraph_uses_ext():
    weight = _weight(65, 32, torch.float32, requires_grad=True)
    indices = torch.randint(0, 65, (4, 16))
    out, seen = _graph_ops(lambda i, w: ops.embedding(i, w) * 2, indices, weight)
    assert any("fastgpt.embedding_forward" in s for s in seen), seen
    assert torch.equal(out, F.embedding(indices, weight) * 2)


def test_compile_gpt_model_uses_ext():
    from fastgpt.config import GPTConfig
    from fastgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=32))
    idx = torch.randint(0, 65, (2, 16))
    targets = torch.randint(0, 65, (2, 16))
    _, loss = model(idx, targets)
    loss.backward()
    eager_grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad()

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, closs = compiled(idx, targets)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    torch.testing.assert_close(model.transformer.wte.weight.grad, eager_grad)
    _, seen = _graph_ops(lambda i: ops.embedding(i, model.transformer.wte.weight), idx)
    assert any("fastgpt.embedding_forward" in s for s in seen), seen


@pytest.mark.parametrize("order", ["extension_first", "python_first"])
def test_namespace_shared_with_python_ops(order):
    """The C++ TORCH_LIBRARY(fastgpt) block and Python torch.library ops (custom_op,
    triton_op: both FRAGMENT libraries) can both live in the ``fastgpt`` namespace."""
    load = "import fastgpt._C"
    define = textwrap.dedent("""
        @torch.library.custom_op("fastgpt::_probe", mutates_args=())
        def _probe(x: torch.Tensor) -> torch.Tensor:
            return x + 1
    """)
    body = (load + "\n" + define) if order == "extension_first" else (define + "\n" + load)
    code = "import torch\n" + body + textwrap.dedent("""
        x = torch.ones(2)
        assert torch.equal(torch.ops.fastgpt._probe(x), x + 1)
        w = torch.arange(6.0).view(3, 2)
        assert torch.equal(torch.ops.fastgpt.embedding_forward(w, torch.tensor([2, 0]), -1), w[[2, 0]])
        import fastgpt.ops  # registers the Triton attention ops in the same namespace
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
