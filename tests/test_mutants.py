"""The accuracy rule bites: deliberately wrong backends fail it, the real ones pass it.

A mutant (fastgpt.tools.accuracy) is a real fast backend whose output or one input gradient is
scaled by 1.01, or has its last element moved by 5% of the tensor's largest magnitude. For every
op with a fast backend and every dtype, each mutant runs through `fastgpt check`'s full grid (odd T,
head dims 16-128, vocabularies 65-50257, ignored targets, padding rows, strided inputs) and must
FAIL: the element mutants on every case, the 1% scale mutants on at least one case (a 1% scale
in bfloat16 is 1-3 units in the last place; where plain PyTorch's own bf16 error is half as large,
2x plain hides it: the catch counts are printed with -s). On the same cases every real fast
backend must PASS.
"""

import pytest
import torch

from fastgpt import cli
from fastgpt.tools.check import check_case, grid
from fastgpt.ops import BlockWeights, registry
from fastgpt.tools.accuracy import mutant_name, mutants_registered

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the backend whose mutants are run, and the tensors they perturb ("out" or an input's gradient)
MUTATED = {
    "attention": ("ext", ["out", "q", "k", "v"]),
    "cross_entropy": ("triton", ["out", "logits"]),
    "linear_cross_entropy": ("chunked", ["out", "hidden", "weight"]),
    "embedding": ("ext", ["out", "weight"]),
    "transformer_block": ("ext", ["out", "x", *BlockWeights._fields]),
}
# real fast backends checked on the same cases (torch.compile ones are left to `fastgpt check`:
# minutes of compiling)
REAL = {"attention": ["ext", "triton"], "cross_entropy": ["triton"],
        "linear_cross_entropy": ["chunked", "triton"], "embedding": ["ext"],
        "transformer_block": ["ext"]}


CAUGHT = {}   # (op, dtype) -> {mutant: (cases that caught it, cases)}, printed at the end


def _all_zero(memo, target) -> bool:
    """True when the reference of ``target`` is identically zero in the case just run (dq and dk
    at T=1): scaling or offsetting it relative to its own size changes nothing."""
    (case,) = memo.values()
    ref_out, ref_grads = case["ref"]
    t = ref_out if target == "out" else ref_grads.get(target)
    return t is None or not t.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(MUTATED))
def test_every_mutant_fails_and_every_real_backend_passes(op, dtype):
    backend, targets = MUTATED[op]
    real_failures, escaped, caught = [], {}, {}
    with mutants_registered(op, backend, targets) as mutants:
        for label, make in grid(op, quick=False):
            memo = {}
            for name in REAL[op]:
                for row in check_case(op, name, label, make, dtype, "cpu", memo=memo):
                    if row.result != "PASS":
                        real_failures.append(f"{name} {label} {row.part}: {row.result} {row.note}")
            for target in targets:
                for kind in ("scale", "element"):
                    name = mutant_name(backend, target, kind)
                    rows = check_case(op, name, label, make, dtype, "cpu", memo=memo)
                    assert all(r.result != "SKIP" for r in rows), rows
                    if _all_zero(memo, target):
                        continue
                    hit = any(r.result == "FAIL" for r in rows)
                    caught.setdefault(name, []).append(hit)
                    if not hit:
                        escaped.setdefault(name, []).append(label)
    assert not real_failures, "real backends failed:\n" + "\n".join(real_failures)
    assert sorted(caught) == sorted(mutants)
    for name, hits in caught.items():
        if name.endswith("+5%"):   # one element 5% off is never hidden
            assert all(hits), f"{name} passed on {escaped[name]}"
        else:                      # x1.01: caught on at least one case
            assert any(hits), f"{name} passed on every case: {escaped[name]}"
    CAUGHT[(op, dtype)] = {name: (sum(hits), len(hits)) for name, hits in caught.items()}


def test_mutants_make_the_check_command_fail(capsys):
    """Registered as backends, mutants are FAIL rows of `fastgpt check` and exit status 1."""
    with mutants_registered("embedding", "ext", ["out", "weight"]) as mutants:
        rc = cli.main(["check", "--op", "embedding", "--backend", ",".join(["ext", *mutants]),
                       "--quick", "--device", "cpu", "--dtype", "bfloat16,float32"])
    out = capsys.readouterr().out
    assert rc == 1
    rows = [line.split() for line in out.splitlines() if line.startswith("embedding ")]
    for name in mutants:
        assert any(r[1] == name and "FAIL" in r for r in rows), f"{name} not FAIL:\n{out}"
    assert all("PASS" in r for r in rows if r[1] == "ext"), out
    assert not any(name in registry.backend_names("embedding") for name in mutants)


def test_check_help_states_the_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2x plain PyTorch" in text and "eps" in text and "scale error" in text


def test_floor_scales_with_the_reference():
    """The issue's case: a bf16 cross-entropy-sized gradient (~0.01) that is 3% wrong fails;
    the old fixed floor (8e-3) let it through."""
    from fastgpt.tools.accuracy import compare
    ref = torch.randn(7, 65, dtype=torch.float64).softmax(-1) * 0.1
    plain = ref.to(torch.bfloat16)
    assert compare(plain, plain, ref).passed
    assert not compare((ref * 1.03).to(torch.bfloat16), plain, ref).passed
    zero = torch.zeros(3, dtype=torch.float64)
    assert compare(zero.float(), zero.float(), zero).passed
    assert not compare(torch.full((3,), 1e-6), zero.float(), zero).passed
    assert compare(torch.full((3,), 1e-7), zero.float(), zero, zero_ref_magnitude=1.0).passed


@pytest.fixture(scope="module", autouse=True)
def _print_catch_counts():
    yield
    for (op, dtype), counts in sorted(CAUGHT.items(), key=str):
        print(f"\n{op} {dtype}: " + ", ".join(f"{n} {c}/{t}" for n, (c, t) in counts.items()))
