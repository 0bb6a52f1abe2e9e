"""fastgpt.peaks: data-sheet figures found by the names torch.cuda.get_device_name() gives."""

import re

import pytest
import torch

from fastgpt.peaks import (
    PEAKS,
    lookup,
    matmul_peak_tflops,
    peak_bandwidth_gbs,
    peak_tflops,
)

# name as torch reports it -> (table entry, bf16 dense TFLOP/s, GB/s)
REAL_NAMES = {
    "Tesla V100-SXM2-16GB": ("V100 SXM2", None, 900.0),
    "Tesla V100-SXM2-32GB": ("V100 SXM2", None, 900.0),
    "NVIDIA A10": ("A10", 125.0, 600.0),
    "NVIDIA A100-SXM4-40GB": ("A100 SXM 40GB", 312.0, 1555.0),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM 80GB", 312.0, 2039.0),
    "NVIDIA A100-PCIE-40GB": ("A100 PCIe 40GB", 312.0, 1555.0),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe 80GB", 312.0, 1935.0),
    "NVIDIA L4": ("L4", 121.0, 300.0),
    "NVIDIA L40S": ("L40S", 362.05, 864.0),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.5, 3350.0),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756.5, 2000.0),
    "NVIDIA H200": ("H200 SXM", 989.5, 4800.0),
    "NVIDIA B200": ("B200", 2250.0, 7700.0),
    "NVIDIA GeForce RTX 3090": ("GeForce RTX 3090", 71.0, 936.0),
    "NVIDIA GeForce RTX 4090": ("GeForce RTX 4090", 165.2, 1008.0),
}

# other parts whose names contain a known one: their figures differ, so they are unknown
LOOKALIKES = ["NVIDIA A10G", "NVIDIA A100X", "NVIDIA L40", "NVIDIA H100 NVL", "NVIDIA H200 NVL",
              "NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA GeForce RTX 3090 Ti",
              "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
              "Tesla V100-PCIE-16GB", "Tesla T4", "AMD EPYC 7B13", "cpu", ""]


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_names_find_their_data_sheet(name):
    gpu, bf16, gbs = REAL_NAMES[name]
    assert lookup(name).gpu == gpu
    assert peak_tflops(name, torch.bfloat16) == bf16
    assert peak_bandwidth_gbs(name) == gbs


@pytest.mark.parametrize("name", REAL_NAMES)
def test_each_real_name_matches_one_entry_only(name):
    # the table is first-match; disjoint patterns keep its order from mattering
    assert sum(bool(re.search(pattern, name)) for pattern, _ in PEAKS) == 1


@pytest.mark.parametrize("name", LOOKALIKES)
def test_unknown_devices_give_none_never_a_guess(name):
    assert lookup(name) is None
    assert peak_tflops(name, torch.bfloat16) is None
    assert peak_tflops(name, "tf32") is None
    assert peak_bandwidth_gbs(name) is None
    assert matmul_peak_tflops(name, torch.float32) is None


def test_sparse_only_sheets_are_halved():
    # the H100 data sheet prints TF32 989 and BF16/FP16 1,979 with sparsity; dense is half
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float16) == 989.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 67.0


def test_geforce_uses_the_fp32_accumulate_rate():
    # the GA102 / Ada whitepapers lead with fp16 accumulate (142 / 330.3): PyTorch accumulates
    # in fp32, at half that
    assert peak_tflops("NVIDIA GeForce RTX 3090", torch.float16) == 71.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", torch.float16) == 165.2


def test_dtype_spellings_agree():
    name = "NVIDIA A100-SXM4-80GB"
    for dtype, text, short in [(torch.float32, "float32", "fp32"),
                               (torch.bfloat16, "bfloat16", "bf16"),
                               (torch.float16, "float16", "fp16")]:
        assert peak_tflops(name, dtype) == peak_tflops(name, text) == peak_tflops(name, short)
    assert peak_tflops(name, torch.float32) == 19.5 and peak_tflops(name, "tf32") == 156.0


def test_a_dtype_without_a_rate_is_none_and_an_unknown_dtype_an_error():
    assert peak_tflops("Tesla V100-SXM2-16GB", torch.bfloat16) is None   # Volta has no bf16
    assert peak_tflops("Tesla V100-SXM2-16GB", "tf32") is None
    with pytest.raises(ValueError, match="float64"):
        peak_tflops("NVIDIA H100 80GB HBM3", torch.float64)


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_float32_matmuls_count_as_tf32_when_torch_allows_it(matmul_precision):
    matmul_precision("highest")
    assert matmul_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 67.0
    matmul_precision("high")
    assert matmul_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 494.5
    assert matmul_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5
    # no TF32 on Volta: float32 matmuls run on the CUDA cores
    assert matmul_peak_tflops("Tesla V100-SXM2-16GB", torch.float32) == 15.7


def test_every_entry_names_its_source_and_is_consistent():
    for _, p in PEAKS:
        assert p.source.startswith("NVIDIA"), p
        assert p.fp32 > 0 and p.bandwidth_gbs > 0 and p.fp16 > p.fp32, p
        assert p.tf32 is None or p.fp32 <= p.tf32 <= p.fp16, p
        assert p.bf16 is None or p.bf16 == p.fp16, p
