"""Data-sheet peaks of NVIDIA GPUs: dense TFLOP/s per dtype and memory bandwidth in GB/s.

What "% of peak" (fastgpt report) and MFU measure against. Looked up by the name
``torch.cuda.get_device_name()`` gives ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100
PCIe" the PCIe card); a name not in the table gives None, never a guess (a CPU always does).

Every figure is NVIDIA's own, from the data sheet (or architecture whitepaper) named beside it,
for dense math (no 2:4 sparsity). Where a sheet prints only the sparse figure (marked "*"), the
entry writes ``sparse(x)``: its footnote says dense is half of it. ``fp32`` is the CUDA cores'
non-tensor rate, ``tf32`` float32 matmuls on tensor cores, ``bf16``/``fp16`` tensor-core matmuls
with fp32 accumulation (what PyTorch's matmuls use): on GeForce cards that is half the fp16-
accumulate figure their whitepapers lead with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


def sparse(tflops: float) -> float:
    """The dense rate of a figure printed with sparsity (the data sheets' "*": one half)."""
    return tflops / 2


@dataclass(frozen=True)
class DevicePeaks:
    gpu: str                        # what the table calls it, e.g. "H100 SXM"
    fp32: float                     # TFLOP/s, CUDA cores (non-tensor)
    tf32: float | None              # TFLOP/s, tensor cores; None: the GPU has no TF32
    bf16: float | None              # TFLOP/s, tensor cores, fp32 accumulate; None: no bf16
    fp16: float                     # TFLOP/s, tensor cores, fp32 accumulate
    bandwidth_gbs: float            # GB/s (10^9 bytes), device memory
    source: str                     # the document the figures come from


# (pattern searched in the device name, peaks). The patterns are disjoint: "A10" is not "A100"
# or "A10G" (a different AWS part), "H200" is not "H200 NVL", "RTX 4090" is not "RTX 4090 D".
PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    # Tesla V100 data sheet (SXM2): "Tensor Performance 125 TFLOPS" (fp16, fp32 accumulate)
    (r"V100-SXM2", DevicePeaks("V100 SXM2", fp32=15.7, tf32=None, bf16=None, fp16=125.0,
                               bandwidth_gbs=900.0, source="NVIDIA Tesla V100 data sheet")),
    # NVIDIA A10 data sheet: TF32 62.5 | 125*, BF16/FP16 125 | 250*
    (r"\bA10\b", DevicePeaks("A10", fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0,
                             bandwidth_gbs=600.0, source="NVIDIA A10 data sheet")),
    # NVIDIA A100 data sheet: FP32 19.5, TF32 156, BF16/FP16 312; bandwidth per variant
    (r"A100-SXM4?-40GB", DevicePeaks("A100 SXM 40GB", fp32=19.5, tf32=156.0, bf16=312.0,
                                     fp16=312.0, bandwidth_gbs=1555.0,
                                     source="NVIDIA A100 data sheet")),
    (r"A100-SXM4?-80GB", DevicePeaks("A100 SXM 80GB", fp32=19.5, tf32=156.0, bf16=312.0,
                                     fp16=312.0, bandwidth_gbs=2039.0,
                                     source="NVIDIA A100 data sheet")),
    (r"A100-PCIE-40GB", DevicePeaks("A100 PCIe 40GB", fp32=19.5, tf32=156.0, bf16=312.0,
                                    fp16=312.0, bandwidth_gbs=1555.0,
                                    source="NVIDIA A100 data sheet")),
    (r"A100 80GB PCIe|A100-PCIE-80GB", DevicePeaks("A100 PCIe 80GB", fp32=19.5, tf32=156.0,
                                                   bf16=312.0, fp16=312.0, bandwidth_gbs=1935.0,
                                                   source="NVIDIA A100 data sheet")),
    # NVIDIA L4 data sheet: TF32 120*, BF16/FP16 242* (sparse only), 300 GB/s
    (r"\bL4\b", DevicePeaks("L4", fp32=30.3, tf32=sparse(120.0), bf16=sparse(242.0),
                            fp16=sparse(242.0), bandwidth_gbs=300.0,
                            source="NVIDIA L4 data sheet")),
    # NVIDIA L40S data sheet: TF32 183 | 366*, BF16/FP16 362.05 | 733*
    (r"\bL40S\b", DevicePeaks("L40S", fp32=91.6, tf32=183.0, bf16=362.05, fp16=362.05,
                              bandwidth_gbs=864.0, source="NVIDIA L40S data sheet")),
    # NVIDIA H100 data sheet (SXM / PCIe columns): TF32 989* / 756*, BF16/FP16 1,979* / 1,513*
    (r"H100 80GB HBM3|H100 SXM", DevicePeaks("H100 SXM", fp32=67.0, tf32=sparse(989.0),
                                             bf16=sparse(1979.0), fp16=sparse(1979.0),
                                             bandwidth_gbs=3350.0,
                                             source="NVIDIA H100 data sheet")),
    (r"H100 PCIe", DevicePeaks("H100 PCIe", fp32=51.0, tf32=sparse(756.0), bf16=sparse(1513.0),
                               fp16=sparse(1513.0), bandwidth_gbs=2000.0,
                               source="NVIDIA H100 data sheet")),
    # NVIDIA H200 data sheet (SXM column): TF32 989*, BF16/FP16 1,979*, 4.8 TB/s
    (r"\bH200\b(?! NVL)", DevicePeaks("H200 SXM", fp32=67.0, tf32=sparse(989.0),
                                      bf16=sparse(1979.0), fp16=sparse(1979.0),
                                      bandwidth_gbs=4800.0, source="NVIDIA H200 data sheet")),
    # NVIDIA HGX platform specifications, HGX B200 per GPU: TF32 2.2 PF*, FP16/BF16 4.5 PF*,
    # FP32 75 TF, 7.7 TB/s (the DGX B200 data sheet's 64 TB/s for 8 GPUs would be 8 TB/s each)
    (r"\bB200\b", DevicePeaks("B200", fp32=75.0, tf32=sparse(2200.0), bf16=sparse(4500.0),
                              fp16=sparse(4500.0), bandwidth_gbs=7700.0,
                              source="NVIDIA HGX B200 specifications")),
    # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: FP16/BF16 tensor with FP32 accumulate
    # 71 (142 with FP16 accumulate), TF32 35.6, 936 GB/s
    (r"RTX 3090$", DevicePeaks("GeForce RTX 3090", fp32=35.6, tf32=35.6, bf16=71.0, fp16=71.0,
                               bandwidth_gbs=936.0, source="NVIDIA Ampere GA102 whitepaper")),
    # NVIDIA Ada Lovelace whitepaper, GeForce RTX 4090: FP16/BF16 tensor with FP32 accumulate
    # 165.2 (330.3 with FP16 accumulate), TF32 82.6, 1008 GB/s
    (r"RTX 4090$", DevicePeaks("GeForce RTX 4090", fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2,
                               bandwidth_gbs=1008.0, source="NVIDIA Ada Lovelace whitepaper")),
)

# dtype spellings -> DevicePeaks field: a torch dtype, its name, or "tf32" (float32 matmuls on
# tensor cores, which no torch dtype names)
_FIELDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "tf32": "tf32",
           "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def lookup(device_name: str) -> DevicePeaks | None:
    """The data-sheet peaks of the GPU ``torch.cuda.get_device_name()`` called ``device_name``;
    None for any other name."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name):
            return peaks
    return None


def peak_tflops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` in ``dtype``: torch.float32 (CUDA cores),
    "tf32", torch.bfloat16 or torch.float16 (tensor cores; names as strings work too).
    None for an unknown device or a dtype the GPU has no rate for."""
    if dtype not in _FIELDS:
        raise ValueError(f"peak_tflops: dtype {dtype!r}; use float32, tf32, bfloat16 or float16")
    peaks = lookup(device_name)
    return None if peaks is None else getattr(peaks, _FIELDS[dtype])


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """Data-sheet memory bandwidth of ``device_name`` in GB/s; None for an unknown device."""
    peaks = lookup(device_name)
    return None if peaks is None else peaks.bandwidth_gbs


def matmul_peak_tflops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """The peak PyTorch's matmuls in ``dtype`` can reach here: float32 counts as TF32 when
    ``torch.get_float32_matmul_precision()`` lets matmuls use it and the GPU has it."""
    if dtype in (torch.float32, "float32") and torch.get_float32_matmul_precision() != "highest":
        tf32 = peak_tflops(device_name, "tf32")
        if tf32 is not None:
            return tf32
    return peak_tflops(device_name, dtype)
