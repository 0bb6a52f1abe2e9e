"""The Makefile picks torch and the CUDA archs from the GPU it finds (issue 18).

Only `make -n` runs here (nothing is installed): VENV points at a folder that does not exist, so
the setup recipe is printed with the pip commands it would run. A fake `nvidia-smi` first on PATH
plays the GPU; without one, PATH holds only links to the few tools the Makefile's $(shell ...)
calls, so the test does not depend on whether this machine has a real nvidia-smi.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
CPU_SPEC = "torch==2.13.0 triton==3.8.0"
CUDA_SPEC = "torch==2.14.1 triton==3.8.0"
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5bd0a4b9-6a39-1f7e-2cd6-0f9d5e7e61a1)"
FAILED_SMI = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.")
# what the Makefile's $(shell ...) calls use, linked into the PATH of the no-nvidia-smi case
TOOLS = ("sh", "awk", "grep", "sed", "sort", "paste", "printf", "nproc")
# an outer make (`make test` runs pytest) passes its variables down through MAKEFLAGS
SCRUB = ("TORCH_SPEC", "TORCH_CUDA_ARCH_LIST", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
         "MAKEOVERRIDES")

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _fake_smi(folder: Path, lines: list[str], caps: list[str], rc: int = 0) -> None:
    """An executable nvidia-smi: -L prints lines, the compute_cap query caps; both exit rc."""
    listing = "".join(line + "\n" for line in lines)
    cap_text = "".join(c + "\n" for c in caps)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        "case \"$*\" in\n"
        f"  -L) printf '%s' '{listing}' ;;\n"
        f"  *compute_cap*) printf '%s' '{cap_text}' ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
        f"exit {rc}\n")
    script.chmod(0o755)


def _tools_only(folder: Path) -> str:
    """A PATH of links to TOOLS alone: no nvidia-smi, whatever this machine has."""
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return str(folder)


def _make(tmp_path: Path, target: str, *, path: str, env: dict | None = None,
          args: tuple = ()) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SCRUB}
    base["PATH"] = path
    base.update(env or {})
    cmd = [MAKE, "-n", "--no-print-directory", target, f"VENV={tmp_path / 'no-venv'}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True, timeout=60,
                          check=False)


def _with_gpu(tmp_path: Path, caps: list[str], **kw) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_smi(bin_dir, [H100], caps)
    return _make(tmp_path, kw.pop("target", "train"),
                 path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **kw)


def _torch_line(out: str) -> str:
    """The pip command that installs torch (the first pip install naming torch==)."""
    lines = [ln for ln in out.splitlines() if "pip install" in ln and "torch==" in ln]
    assert lines, f"no pip install of torch in make -n's output:\n{out}"
    return lines[0]


def _ext_line(out: str) -> str:
    """The pip command that builds fastgpt._C (pip install ... -e .)."""
    lines = [ln for ln in out.splitlines() if "pip install" in ln and ln.rstrip().endswith("-e .")]
    assert lines, f"no pip install -e . in make -n's output:\n{out}"
    return lines[0]


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"make failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("target", ["train", "test"])
def test_a_gpu_gets_the_cuda_torch_and_its_arch(tmp_path, target):
    out = _ok(_with_gpu(tmp_path, ["9.0"], target=target))
    assert _torch_line(out).endswith(f"install --quiet {CUDA_SPEC}")
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0" ' in _ext_line(out)
    assert "nvidia-smi lists NVIDIA H100 80GB HBM3" in out       # the why, printed at setup


@pytest.mark.parametrize("caps, arch", [
    (["8.6"], "8.0;8.6;9.0"),
    (["12.0", "8.6", "8.6"], "8.0;8.6;9.0;12.0"),   # several GPUs: deduplicated, sorted by number
    (["[N/A]"], "8.0;9.0"),                         # an unreadable capability adds nothing
])
def test_the_arch_list_adds_the_gpus_here_to_sm80_and_sm90(tmp_path, caps, arch):
    out = _ok(_with_gpu(tmp_path, caps))
    assert f'TORCH_CUDA_ARCH_LIST="{arch}" ' in _ext_line(out)


def test_a_user_s_arch_list_is_left_alone(tmp_path):
    out = _ok(_with_gpu(tmp_path, ["9.0"], env={"TORCH_CUDA_ARCH_LIST": "8.9"}))
    assert "TORCH_CUDA_ARCH_LIST" not in _ext_line(out)          # the environment's reaches pip
    assert "TORCH_CUDA_ARCH_LIST=8.9 as given" in out


@pytest.mark.parametrize("target", ["train", "test"])
@pytest.mark.parametrize("lines", [[FAILED_SMI], [H100]], ids=["driver-message", "gpu-listed"])
def test_a_failing_nvidia_smi_gets_the_cpu_torch(tmp_path, target, lines):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_smi(bin_dir, lines, ["9.0"], rc=9)     # a GPU listed by a failing nvidia-smi counts not
    out = _ok(_make(tmp_path, target, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"))
    assert _torch_line(out).endswith(f"install --quiet {CPU_SPEC}")
    assert "TORCH_CUDA_ARCH_LIST" not in _ext_line(out)
    assert "no NVIDIA GPU found (nvidia-smi -L failed or lists no GPU)" in out


@pytest.mark.parametrize("target", ["train", "test"])
def test_no_nvidia_smi_gets_the_cpu_torch(tmp_path, target):
    tools = tmp_path / "tools"
    tools.mkdir()
    out = _ok(_make(tmp_path, target, path=_tools_only(tools)))
    assert _torch_line(out).endswith(f"install --quiet {CPU_SPEC}")
    assert "TORCH_CUDA_ARCH_LIST" not in _ext_line(out)
    assert "no NVIDIA GPU found (no nvidia-smi on PATH)" in out


@pytest.mark.parametrize("how", ["command line", "environment"])
def test_torch_spec_overrides_the_gpu(tmp_path, how):
    spec = "torch==2.13.0 triton==3.6.0"
    given = {"args": (f"TORCH_SPEC={spec}",)} if how == "command line" else \
        {"env": {"TORCH_SPEC": spec}}
    out = _ok(_with_gpu(tmp_path, ["9.0"], **given))
    assert _torch_line(out).endswith(f"install --quiet {spec}")
    assert f"TORCH_SPEC given ({how})" in out


def test_gpu_report_runs_the_report_on_a_gpu(tmp_path):
    out = _ok(_with_gpu(tmp_path, ["9.0"], target="gpu-report"))
    assert _torch_line(out).endswith(CUDA_SPEC)
    assert out.rstrip().splitlines()[-1].endswith("/fastgpt report --device cuda --out gpu-report.md")


def test_gpu_report_without_a_gpu_stops_before_setup(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    proc = _make(tmp_path, "gpu-report", path=_tools_only(tools))
    assert proc.returncode != 0
    assert "pip install" not in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    assert "no NVIDIA GPU found" in errors[0]
    assert "fastgpt report --device cpu --quick" in errors[0]
