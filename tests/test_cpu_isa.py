"""The CPU kernels' instruction-set copies (csrc/cpu_isa.h): each one this CPU can run, forced
with FASTGPT_CPU_ISA, passes the same float64-reference checks as the default.

The default copy already runs through every other test file; here attention (fused path: both
dtypes, every padded head size, tails), the C++ block (LayerNorm, GELU, dropout), the flat AdamW
step and the embedding gather run once per copy. A copy this CPU lacks (AVX-512 on an AVX2-only machine)
cannot run: forcing it is a clear error, tested instead, and its ids are not collected.
"""

import pytest
import torch

import fastgpt.ops as ops
from fastgpt.device import cpu_flags
from fastgpt.ops.extension import available

import test_attention_ext
import test_block_dropout
import test_embedding_ext
import test_optim
import test_transformer_block

assert available() is None, available()

NAMES = ["avx512", "avx2", "baseline"]


def runnable() -> list[str]:
    """The copies this CPU can run, best first (what cpuid tells the extension)."""
    flags = cpu_flags()
    has_avx2 = {"avx2", "fma"} <= flags
    return [name for name, ok in [("avx512", has_avx2 and "avx512f" in flags),
                                  ("avx2", has_avx2), ("baseline", True)] if ok]


def cpu_isa() -> str:
    return torch.ops.fastgpt.cpu_isa()


# only the copies this CPU runs (an AVX2 machine has no AVX-512 ids; skipping them would fail
# the session, see conftest): the others are covered by the error test below
@pytest.fixture(params=runnable())
def isa(request, monkeypatch):
    monkeypatch.setenv("FASTGPT_CPU_ISA", request.param)
    assert cpu_isa() == request.param
    return request.param


def test_default_is_the_best_copy_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("FASTGPT_CPU_ISA", raising=False)
    assert cpu_isa() == runnable()[0]
    monkeypatch.setenv("FASTGPT_CPU_ISA", "")
    assert cpu_isa() == runnable()[0]


@pytest.mark.parametrize("name", NAMES)
def test_forcing_a_copy_the_cpu_lacks_is_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("FASTGPT_CPU_ISA", name)
    if name in runnable():
        assert cpu_isa() == name
        return
    allowed = ", ".join(runnable())
    with pytest.raises(ValueError, match=f"FASTGPT_CPU_ISA={name} asks for instructions this "
                                         f"CPU lacks .*; allowed on this CPU: {allowed}$"):
        cpu_isa()
    # and the kernels refuse it too, before computing anything
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="lacks"):
        ops.causal_attention(q, q, q, backend="ext")


def test_an_unknown_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTGPT_CPU_ISA", "sse4")
    with pytest.raises(ValueError, match="FASTGPT_CPU_ISA must be one of avx512, avx2, baseline "
                                         r"\(or unset: the best this CPU has\); got 'sse4'"):
        cpu_isa()


# the fused attention path: fp32 and bf16, every padded head size (16, 32, 64, 128), column
# tiles past D (24, 48), T of 1, 4k+1 and 97 (row-block and vector tails)
ATTENTION = [c for c in test_attention_ext.CASES if c[3] <= 128 and c[4] != torch.float16]


@pytest.mark.parametrize("B,H,T,D,dtype", ATTENTION,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}" for c in ATTENTION])
def test_attention_matches_reference(isa, B, H, T, D, dtype):
    test_attention_ext.test_forward_backward_match_reference(B, H, T, D, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,C,H,bias", [(2, 7, 48, 3, False), (1, 97, 64, 4, False),
                                          (2, 50, 24, 2, True)])
def test_transformer_block_matches_reference(isa, dtype, B, T, C, H, bias):
    test_transformer_block.test_matches_float64_reference(dtype, B, T, C, H, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_dropout_matches_reference(isa, dtype):
    test_block_dropout.test_matches_float64_reference_with_the_same_masks(
        dtype, 1, 97, 64, 4, True, 0.5)
    test_block_dropout.test_matches_float64_reference_with_the_same_masks(
        dtype, 2, 70, 40, 5, False, 0.2)


def test_the_copies_agree(monkeypatch):
    """Every runnable copy computes the block to within rounding of the others (FMA or not)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 64, generator=gen)
    w = test_transformer_block._weights(64, True, gen)
    w = test_transformer_block._map(lambda t: t.float(), w)
    outs = {}
    for name in runnable():
        monkeypatch.setenv("FASTGPT_CPU_ISA", name)
        outs[name] = ops.transformer_block(x, w, 4, backend="ext")
    base = outs[runnable()[0]]
    for name, out in outs.items():
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("max_norm", [0.0, 0.5], ids=["no-clip", "clip"])
def test_flat_adamw_matches_torch(isa, max_norm):
    test_optim.test_steps_match_torch_fused_adamw(max_norm)


def test_embedding_gather_is_exact(isa):
    test_embedding_ext.test_forward_bitwise_equal("cpu", torch.float32, torch.int64, 65, 64,
                                                  (4, 97))
    test_embedding_ext.test_forward_bitwise_equal("cpu", torch.bfloat16, torch.int32, 3, 130,
                                                  (2, 3, 5))
