# Quick start:  make train       (set up .venv, train the default model on tiny Shakespeare, sample)
#               make test        (set up .venv, run the test suite, then bench/ untimed)
#               make gpu-report  (NVIDIA GPU only: set up .venv, write gpu-report.md)
# The setup picks torch by itself: a CUDA build when `nvidia-smi -L` lists a GPU, else the
# pinned CPU build; `make train TORCH_SPEC="..."` (or TORCH_SPEC in the environment) overrides.
# `make -n train` shows the choice without installing anything.
PYTHON ?= python3
VENV ?= .venv
TRAIN_ARGS ?=
PYTEST_ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD_MINUTES := 5

# torch 2.13.0+cpu lies in /opt/wheels here; an unpinned torch would pull a 5 GB CUDA build.
TORCH_SPEC_CPU := torch==2.13.0 triton==3.8.0
# torch 2.14.1's Linux wheel is 2.14.1+cu130 (CUDA 13.0) and requires triton~=3.8.0; both wheels
# are in the local indexes (/opt/pypi-more, /opt/pypi), but its dependency cuda-bindings is not,
# so it comes from PyPI.
TORCH_SPEC_CUDA := torch==2.14.1 triton==3.8.0

# Evaluated by make itself (not in a recipe), so that `make -n` prints the real choice.
# A GPU is a line "GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)" from an nvidia-smi that succeeded
# (a broken driver exits non-zero); GPU_NAMES reads "NVIDIA H100 80GB HBM3" or "8 x NVIDIA ...".
# (the awk program sits in a variable: make would count its unbalanced "(" inside $(shell ...))
GPU_AWK := /^GPU / { sub(/^GPU [0-9]+: /, ""); sub(/ \(UUID:.*/, ""); if (!($$0 in n)) order[++k] = $$0; n[$$0]++ } \
  END { for (i = 1; i <= k; i++) printf "%s%s%s", (i > 1 ? ", " : ""), (n[order[i]] > 1 ? n[order[i]] " x " : ""), order[i] }
GPU_NAMES := $(shell out=$$(nvidia-smi -L 2>/dev/null) && printf '%s\n' "$$out" | awk '$(GPU_AWK)')

ifneq ($(GPU_NAMES),)
  GPU_WHY := nvidia-smi lists $(GPU_NAMES)
  # build fastgpt._C for the GPUs here plus sm_80 and sm_90 (what CI compiles); compute_cap
  # gives "9.0", one line per GPU; anything else (an old driver's error) is dropped
  GPU_CAPS := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sed 's/[[:space:]]//g' | grep -E '^[0-9]+[.][0-9]+$$')
  GPU_ARCH_LIST := $(shell printf '%s\n' 8.0 9.0 $(GPU_CAPS) | LC_ALL=C sort -t. -k1,1n -k2,2n -u | paste -sd';' -)
else ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
  GPU_WHY := no NVIDIA GPU found (no nvidia-smi on PATH)
else
  GPU_WHY := no NVIDIA GPU found (nvidia-smi -L failed or lists no GPU)
endif

# an empty TORCH_SPEC counts as unset (override: `make TORCH_SPEC=` would keep it empty)
ifeq ($(strip $(TORCH_SPEC)),)
  override TORCH_SPEC := $(if $(GPU_NAMES),$(TORCH_SPEC_CUDA),$(TORCH_SPEC_CPU))
  TORCH_WHY := $(GPU_WHY)
else
  TORCH_WHY := TORCH_SPEC given ($(origin TORCH_SPEC)); $(GPU_WHY)
endif

# a TORCH_CUDA_ARCH_LIST the user set (environment or command line) reaches pip as it is;
# without a GPU, setup.py's default (8.0;9.0) applies when it builds CUDA code at all
ARCH_ENV :=
ARCH_WHY :=
ifneq ($(GPU_NAMES),)
  ifeq ($(origin TORCH_CUDA_ARCH_LIST),undefined)
    ARCH_ENV := TORCH_CUDA_ARCH_LIST="$(GPU_ARCH_LIST)"
    ARCH_WHY := ; with a CUDA torch and nvcc, CUDA code for $(GPU_ARCH_LIST) (sm_80, sm_90 and the GPUs here)
  else
    ARCH_WHY := ; with a CUDA torch and nvcc, CUDA code for TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) as given
  endif
endif

STAMP := $(VENV)/.fastgpt-installed
BIN := $(VENV)/bin

.PHONY: setup train test gpu-report clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "make setup: installing $(TORCH_SPEC): $(TORCH_WHY)"
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet "setuptools>=64" wheel ninja numpy tqdm matplotlib tiktoken tokenizers safetensors huggingface_hub tensorboard transformers pytest pytest-benchmark
	@echo "make setup: compiling the C++ extension fastgpt._C ($(words $(wildcard csrc/*.cpp)) C++ files, $(JOBS) at a time with ninja; about $(BUILD_MINUTES) minutes on 2 cores$(ARCH_WHY)); the compiler's progress follows"
	# torch C++ extensions build against the installed torch: no build isolation. torch uses
	# ninja when one is on PATH (the venv's) and compiles MAX_JOBS files at once; -v shows its
	# [n/N] progress lines
	$(ARCH_ENV) PATH="$(abspath $(BIN)):$$PATH" MAX_JOBS=$(JOBS) $(BIN)/pip install -v --no-build-isolation -e .
	touch $@

# each run keeps the ones before: out/, then out-2/, out-3/, ... (an --out-dir in TRAIN_ARGS wins)
train: $(STAMP)
	@out=out; n=1; while [ -e "$$out/ckpt.pt" ]; do n=$$((n + 1)); out=out-$$n; done; \
	echo "make train: training into $$out/ (earlier runs are kept)"; \
	$(BIN)/fastgpt train --out-dir $$out $(TRAIN_ARGS)

# then every benchmark case and bench/ script once, untimed, so they cannot rot; pytest's
# exit 5 (no tests collected) fails the target like any other non-zero exit
test: $(STAMP)
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)
	$(BIN)/python -m pytest bench -q --benchmark-disable $(PYTEST_ARGS)

# without a GPU it stops before any setup (also under make -n): a CPU venv cannot report on CUDA
ifneq ($(GPU_NAMES),)
gpu-report: $(STAMP)
	$(BIN)/fastgpt report --device cuda --out gpu-report.md
else
gpu-report:
	$(error make gpu-report: $(GPU_WHY); the CPU variant is `fastgpt report --device cpu --quick`)
endif

clean:
	rm -rf $(VENV) build *.egg-info out out-* gpu-report.md gpu-report
