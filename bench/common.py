"""What every benchmark shares: the environment record and robust summary statistics.

This machine is shared and noisy, so benchmarks report medians with a p20-p80 spread and compare
providers as ratios measured side by side in one run, never single absolute times.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()
    return {"device": dev, "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "git_sha": git_sha(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def summarize(samples: list[float]) -> dict:
    """Median and the 20th/80th percentiles."""
    xs = sorted(samples)
    if len(xs) == 1:
        return {"median": xs[0], "p20": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median": statistics.median(xs), "p20": q[1], "p80": q[7]}


def format_env(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())
