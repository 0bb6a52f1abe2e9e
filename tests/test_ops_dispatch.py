"""The naive attention ladder agrees in float64, and the dispatch rules hold."""

import os
import subprocess
import sys

import pytest
import torch

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.ops import registry

NAIVE = ["loop", "tril", "sdpa", "torch"]


@pytest.fixture(autouse=True)
def _restore_registry():
    """Tests here register throwaway backends; put the registry back afterwards."""
    backends = {op: dict(b) for op, b in registry._BACKENDS.items()}
    orders = {op: {d: list(o) for d, o in by_dev.items()} for op, by_dev in registry._DEFAULT_ORDER.items()}
    yield
    registry._BACKENDS.clear()
    registry._BACKENDS.update(backends)
    registry._DEFAULT_ORDER.clear()
    registry._DEFAULT_ORDER.update(orders)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 7, 16), (1, 2, 97, 48)])
@pytest.mark.parametrize("backend", NAIVE)
def test_naive_attention_agrees_in_float64(backend, shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=torch.float64)
    ref = ops.causal_attention(q, k, v, backend="torch")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = ops.causal_attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_attention_is_causal():
    q, k, v = torch.randn(3, 1, 2, 9, 16, dtype=torch.float64)
    out = ops.causal_attention(q, k, v, backend="tril")
    v2 = v.clone()
    v2[:, :, 5:] += 100.0   # the future must not leak into rows 0..4
    out2 = ops.causal_attention(q, k, v2, backend="tril")
    torch.testing.assert_close(out[:, :, :5], out2[:, :, :5])


def test_attention_scale_and_noncontiguous_views():
    qkv = torch.randn(2, 11, 3, 4, 16, dtype=torch.float64)       # (B, T, 3, H, D)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))           # strided (B, H, T, D)
    assert not q.is_contiguous()
    for backend in NAIVE:
        torch.testing.assert_close(
            ops.causal_attention(q, k, v, scale=0.3, backend=backend),
            ops.causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3,
                                 backend="torch"))


def test_precedence_argument_context_config_env(monkeypatch):
    q = k = v = torch.randn(1, 1, 4, 8)
    calls = []
    for name in ("p_arg", "p_ctx", "p_cfg", "p_env"):
        registry.register("attention", name,
                          lambda q, k, v, name=name, **kw: calls.append(name) or q)
    monkeypatch.setenv("FASTGPT_BACKENDS", "attention=p_env")
    with ops.use_backends(attention="p_ctx"):
        ops.causal_attention(q, k, v, backend="p_arg", preferred="p_cfg")
        ops.causal_attention(q, k, v, preferred="p_cfg")
    ops.causal_attention(q, k, v, preferred="p_cfg")
    ops.causal_attention(q, k, v)
    monkeypatch.delenv("FASTGPT_BACKENDS")
    assert calls == ["p_arg", "p_ctx", "p_cfg", "p_env"]


def test_explicit_backend_that_cannot_run_raises_with_reason():
    registry.register("attention", "never", lambda *a, **k: None,
                      available=lambda: "it is a test backend that is never available")
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(FastGPTError, match="never available"):
        ops.causal_attention(q, k, v, backend="never")
    with pytest.raises(FastGPTError, match="unknown attention backend 'nope'"):
        ops.causal_attention(q, k, v, backend="nope")


def test_automatic_choice_falls_back_quietly(caplog):
    registry.register("attention", "picky", lambda *a, **k: None,
                      supports=lambda q, k, v, **kw: "only supports float16")
    registry.set_default_order("attention", "cpu", ["picky", "sdpa"])
    q = k = v = torch.randn(1, 1, 4, 8)
    out = ops.causal_attention(q, k, v)
    torch.testing.assert_close(out, ops.causal_attention(q, k, v, backend="torch"))
    assert "only supports float16" in caplog.text


def test_bad_env_spec_and_bad_inputs(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    monkeypatch.setenv("FASTGPT_BACKENDS", "attention")
    with pytest.raises(FastGPTError, match="expected op=backend"):
        ops.causal_attention(q, q, q)
    monkeypatch.delenv("FASTGPT_BACKENDS")
    with pytest.raises(FastGPTError, match="shape"):
        ops.causal_attention(q[0], q[0], q[0])
    with pytest.raises(FastGPTError, match="dropout_p"):
        ops.causal_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(FastGPTError, match="unknown op"):
        ops.available_backends("convolution")


def test_available_backends_lists_the_reference_ones():
    assert set(NAIVE) <= set(ops.available_backends("attention"))
    for op in ("cross_entropy", "linear_cross_entropy", "embedding"):
        assert "torch" in ops.available_backends(op)


def test_dispatch_traces_under_compile_fullgraph():
    q, k, v = torch.randn(3, 2, 2, 7, 16)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v):
        with ops.use_backends(attention="tril"):
            return ops.causal_attention(q, k, v)

    torch.testing.assert_close(f(q, k, v), ops.causal_attention(q, k, v, backend="torch"))


def test_reference_cross_entropy_and_embedding():
    logits = torch.randn(10, 65, dtype=torch.float64)
    targets = torch.randint(0, 65, (10,))
    targets[:3] = -100
    expected = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(ops.cross_entropy(logits, targets), expected)
    weight = torch.randn(65, 8, dtype=torch.float64)
    hidden = torch.randn(10, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets),
                               torch.nn.functional.cross_entropy(hidden @ weight.T, targets))
    all_ignored = torch.full((10,), -100)
    assert ops.cross_entropy(logits, all_ignored).item() == 0.0
    idx = torch.randint(0, 65, (2, 5))
    torch.testing.assert_close(ops.embedding(idx, weight), weight[idx])


def test_constant_under_compile_sets_the_marker_torch_sets():
    # registry.constant_under_compile stands in for torch.compiler.assume_constant_result so that
    # importing fastgpt does not import torch._dynamo; it must mark functions the same way
    import torch._dynamo

    marked = torch._dynamo.assume_constant_result(lambda: None)
    ours = registry.constant_under_compile(lambda: None)
    assert {k: v for k, v in vars(marked).items()} == {k: v for k, v in vars(ours).items()}
    assert vars(ours) == {"_dynamo_marked_constant": True}


def test_importing_fastgpt_does_not_import_dynamo_or_inductor():
    # nor triton (~0.2 s): its backends import it on their first availability check
    import subprocess
    import sys
    code = ("import sys, fastgpt.ops, fastgpt.train, fastgpt.cli; print(sorted(m for m in "
            "('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=600)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_on_load_runs_at_once_when_the_extension_is_already_loaded(monkeypatch):
    from fastgpt.ops import extension
    ran = []
    monkeypatch.setattr(extension, "_on_load", [])
    monkeypatch.setitem(extension._state, "reason", extension._UNTRIED)
    extension.on_load(lambda: ran.append("before"))
    assert ran == []                       # waits for the first availability check
    monkeypatch.setitem(extension._state, "reason", None)   # loaded
    extension.on_load(lambda: ran.append("after"))
    assert ran == ["after"]                # a module imported later still registers its fakes


def test_extension_tests_fail_without_the_extension():
    # the README install builds fastgpt._C; its tests fail loudly when it is missing, never skip
    import subprocess
    import sys
    files = ["tests/test_attention_ext.py", "tests/test_embedding_ext.py", "tests/test_optim.py",
             "tests/test_transformer_block.py"]
    code = ("import sys, pytest; sys.modules['fastgpt._C'] = None; "   # `import fastgpt._C` fails
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', *{files!r}]))")
    root = __file__.rsplit("/tests/", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert done.returncode != 0, done.stdout
    for f in files:
        assert f"ERROR {f} - AssertionError" in done.stdout, done.stdout
    assert done.stdout.count("E   AssertionError: fastgpt._C is not built") == len(files)
    assert "skipped" not in done.stdout


def test_triton_availability_loads_no_kernels():
    # the kernels are defined when a module loads, for the GPU or the interpreter as
    # TRITON_INTERPRET says then: an availability check (a help text, a bench run with the
    # variable unset) must not fix that choice for the rest of the process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from fastgpt.ops import registry; "
            "print([registry.get(op, 'triton').available() for op in "
            "('attention', 'cross_entropy', 'linear_cross_entropy')], "
            "[m for m in sys.modules if m.startswith('fastgpt.kernels.')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[None,", "None,", "None]", "[]"]
