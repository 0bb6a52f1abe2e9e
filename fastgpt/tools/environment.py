"""What a reader needs to reproduce or compare a measurement: device, CPU and its vector
features, threads, library versions, git commit, date. Every benchmark and check prints it."""

from __future__ import annotations

import datetime
import os
import subprocess

import torch

from fastgpt.device import cpu_model, speed_flags


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()
    return {"device": dev, "cpu": cpu_model(), "cpu_flags": speed_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "git_sha": git_sha(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def format_env(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())
