"""`fastgpt check`: a small grid passes, a deliberately broken backend fails with exit status 1."""

import dataclasses
import json

import pytest
import torch

from fastgpt import cli
from fastgpt.ops import registry


def test_quick_grid_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = cli.main(["check", "--op", "embedding,cross-entropy", "--quick", "--device", "cpu",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "Triton interpreter" in text
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["interpreter"] and data["quick"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"embedding", "cross_entropy"}
    assert {r["backend"] for r in rows} >= {"torch", "ext", "triton"}
    assert {r["dtype"] for r in rows if r["result"] != "SKIP"} == {"float32", "bfloat16"}
    assert all(r["result"] in ("PASS", "SKIP") for r in rows)
    assert any(r["part"] == "fwd" for r in rows) and any(r["part"].startswith("bwd") for r in rows)
    for r in rows:
        if r["result"] == "PASS":
            assert r["max_abs_err"] is not None and r["ratio"] is not None
            assert r["max_abs_err"] <= 2 * r["plain_err"] + 1e-2


def _patch(monkeypatch, op, name, fn):
    b = registry.get(op, name)
    monkeypatch.setitem(registry._BACKENDS[op], name, dataclasses.replace(b, fn=fn))
    return b


def test_broken_kernel_fails(monkeypatch, capsys):
    good = registry.get("cross_entropy", "triton").fn
    _patch(monkeypatch, "cross_entropy", "triton", lambda *a, **k: good(*a, **k) + 1e-2)
    rc = cli.main(["check", "--op", "cross_entropy", "--backend", "triton", "--quick",
                   "--dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 1
    fails = [line for line in text.splitlines() if " FAIL " in line]
    assert fails and all(line.split()[1] == "triton" for line in fails)
    assert any(" fwd " in line for line in fails)
    assert "failed" in text.splitlines()[-1]


class GradientOffByOnePercent(torch.autograd.Function):   # right forward, gradient off by 1%
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def test_broken_gradient_fails(monkeypatch, capsys):
    good = registry.get("embedding", "ext").fn
    _patch(monkeypatch, "embedding", "ext",
           lambda i, w, padding_idx=None: good(i, GradientOffByOnePercent.apply(w),
                                               padding_idx=padding_idx))
    rc = cli.main(["check", "--op", "embedding", "--backend", "ext", "--quick", "--dtype",
                   "float32"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert any(" bwd dweight " in line and " FAIL " in line for line in lines)
    assert not any(" fwd " in line and " FAIL " in line for line in lines)


def test_crashing_backend_is_a_failure_not_a_crash(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launch failed")
    _patch(monkeypatch, "embedding", "ext", boom)
    rc = cli.main(["check", "--op", "embedding", "--quick", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "RuntimeError: kernel launch failed" in text
    assert any(" torch " in line and " PASS " in line for line in text.splitlines())


def test_attention_triton_quick(capsys):
    rc = cli.main(["check", "--op", "attention", "--backend", "triton,tril", "--quick",
                   "--dtype", "float32"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    # 2 shapes x (fwd, bwd)
    assert sum(" triton " in line and " PASS " in line for line in lines) == 4


def test_transformer_block_quick(capsys):
    rc = cli.main(["check", "--op", "transformer-block", "--quick", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0, "\n".join(lines)
    rows = [line.split() for line in lines if line.startswith("transformer_block ")]
    # torch and ext x float32, bfloat16 x 2 shapes x (fwd, bwd)
    assert len(rows) == 16 and all("PASS" in r for r in rows)
    assert {r[1] for r in rows} == {"torch", "ext"}
    assert {r[2] for r in rows} == {"float32", "bfloat16"}


def test_broken_transformer_block_fails(monkeypatch, capsys):
    good = registry.get("transformer_block", "ext").fn
    _patch(monkeypatch, "transformer_block", "ext", lambda x, w, nh, **k: good(
        x, w._replace(c_fc_weight=GradientOffByOnePercent.apply(w.c_fc_weight)), nh, **k))
    argv = ["check", "--op", "transformer_block", "--backend", "ext", "--quick", "--dtype",
            "float32"]
    assert cli.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(" bwd dc_fc_weight " in line and " FAIL " in line for line in lines) == 2
    assert not any(" fwd " in line and " FAIL " in line for line in lines)

    _patch(monkeypatch, "transformer_block", "ext",
           lambda x, w, nh, **k: good(x, w, nh, **k) + 1e-3)     # forward off
    assert cli.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(" fwd " in line and " FAIL " in line for line in lines) == 2


@pytest.mark.parametrize("argv, message", [
    (["--op", "softmax"], "--op 'softmax'"),
    (["--dtype", "int8"], "--dtype 'int8'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--op", "embedding", "--backend", "nonesuch"], "--backend 'nonesuch' is not a backend"),
])
def test_bad_arguments(argv, message, capsys):
    assert cli.main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
