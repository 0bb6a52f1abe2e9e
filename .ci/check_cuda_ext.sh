#!/usr/bin/env bash
# Prove that fastgpt._C's CUDA code compiles and links, without a GPU.
#
# A separate venv (FASTGPT_CUDA_VENV, default /work/.venv-cuda-ext, outside the checkout so it
# survives between CI runs on one machine) holds the CUDA 13.0 build of torch==2.14.1, installed
# from the machine's local package files; it is created when missing or broken (~2.5 min, 5.5 GB).
# The extension is built from this checkout for sm_80 and sm_90 with -Xptxas -v into a
# temporary folder (the checkout's own CPU build is left alone; FASTGPT_PTXAS_LOG=FILE keeps the
# ptxas log there), `fastgpt compile-report --ext-only` (run by the checkout's venv,
# FASTGPT_PYTHON) prints registers and spills per kernel, and the script fails on a build error,
# a load error or any spilled byte.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTGPT_CUDA_VENV:-/work/.venv-cuda-ext}"
PY="${FASTGPT_PYTHON:-$ROOT/.venv/bin/python}"     # the checkout's venv (make setup): reads the log
TORCH_PIN="2.14.1"
start=$(date +%s)

command -v nvcc >/dev/null || { echo "check_cuda_ext: nvcc not found on PATH" >&2; exit 1; }
"$PY" -c "import fastgpt.tools.compile_report" || {
  echo "check_cuda_ext: $PY cannot import fastgpt (make setup, or set FASTGPT_PYTHON)" >&2; exit 1; }
# nvcc may be a wrapper script: ask it where its toolkit is
if [ -z "${CUDA_HOME:-}" ]; then
  top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  CUDA_HOME="$(cd "${top:-$(dirname "$(command -v nvcc)")/..}" && pwd)"
fi
export CUDA_HOME
echo "check_cuda_ext: CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -1))"

venv_ok() {
  "$VENV/bin/python" - "$TORCH_PIN" <<'EOF' 2>/dev/null
import sys, torch, setuptools, ninja  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
EOF
}
if ! venv_ok; then
  echo "check_cuda_ext: creating $VENV (torch==$TORCH_PIN, CUDA build)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_PIN" setuptools ninja numpy
  venv_ok || { echo "check_cuda_ext: $VENV has no CUDA torch==$TORCH_PIN" >&2; exit 1; }
fi
echo "check_cuda_ext: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/build.log"
cd "$ROOT"
if ! TORCH_CUDA_ARCH_LIST="8.0;9.0" FASTGPT_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-2}" \
     "$VENV/bin/python" setup.py -q build_ext --build-temp "$work/temp" --build-lib "$work/lib" \
     >"$log" 2>&1; then
  tail -40 "$log" >&2
  echo "check_cuda_ext: FAILED: the CUDA extension did not build" >&2
  exit 1
fi
so=$(find "$work/lib" -name '_C*.so' | head -1)
[ -n "$so" ] || { echo "check_cuda_ext: FAILED: no _C*.so was built" >&2; exit 1; }

# Linking: the library loads into the CUDA torch and registers CUDA kernels for both ops.
"$VENV/bin/python" - "$so" <<'EOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
for op in ("embedding_forward", "embedding_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", key), (op, key)
print("check_cuda_ext: loaded", sys.argv[1].rsplit("/", 1)[-1], "with CPU and CUDA kernels")
EOF

# Registers and spills per kernel and arch: fastgpt compile-report reads the ptxas log (one
# parser, fastgpt.tools.aot's, for Triton and nvcc alike) and --strict fails on any spill.
if [ -n "${FASTGPT_PTXAS_LOG:-}" ]; then   # keep it where `fastgpt compile-report` looks
  cp "$log" "$FASTGPT_PTXAS_LOG" && echo "check_cuda_ext: ptxas log kept in $FASTGPT_PTXAS_LOG"
fi
if ! "$PY" -m fastgpt compile-report --ext-only --ext-log "$log" --arch sm_80,sm_90 --strict; then
  echo "check_cuda_ext: FAILED: the extension's kernels spill or their ptxas log is unreadable" >&2
  exit 1
fi
echo "check_cuda_ext: OK in $(( $(date +%s) - start )) s"
