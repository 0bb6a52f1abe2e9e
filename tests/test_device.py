"""fastgpt.device: the --device names every command accepts, and what /proc/cpuinfo says."""

import pytest
import torch

from fastgpt import device
from fastgpt.errors import FastGPTError


def test_auto_and_named_devices():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.resolve_device("auto").type == want
    assert device.resolve_device(None).type == want
    assert device.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:", "CPU", ""])
def test_unknown_devices_are_named_in_the_error(name):
    with pytest.raises(FastGPTError, match=f"unknown device {name!r}; devices are: auto, cpu"):
        device.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_says_what_to_use(name):
    with pytest.raises(FastGPTError, match="sees no CUDA device.*use --device cpu"):
        device.resolve_device(name)


def test_cpuinfo_is_read_from_the_first_processor(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: avx512_bf16\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(info if path == "/proc/cpuinfo" else path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", fake_open)
    device._cpuinfo.cache_clear()
    try:
        assert device.cpu_model() == "Test CPU 9000"
        assert device.cpu_flags() == {"fpu", "avx2", "fma"}
        assert not device.cpu_has_native_bf16()
    finally:
        device._cpuinfo.cache_clear()
