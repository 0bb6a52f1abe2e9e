# Quick start:  make train   (set up .venv, train the default model on tiny Shakespeare, sample)
#               make test    (set up .venv, run the test suite, then bench/ untimed)
# CPU machines get the pinned CPU torch; on a GPU machine pass a CUDA torch instead, e.g.
#   make train TORCH_SPEC="torch==2.14.1 triton==3.8.0"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0 triton==3.8.0
TRAIN_ARGS ?=
PYTEST_ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD_MINUTES := 5

STAMP := $(VENV)/.fastgpt-installed
BIN := $(VENV)/bin

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet "setuptools>=64" wheel ninja numpy tqdm matplotlib pytest pytest-benchmark
	@echo "make setup: compiling the C++ extension fastgpt._C ($(words $(wildcard csrc/*.cpp)) C++ files, $(JOBS) at a time with ninja; about $(BUILD_MINUTES) minutes on 2 cores); the compiler's progress follows"
	# torch C++ extensions build against the installed torch: no build isolation. torch uses
	# ninja when one is on PATH (the venv's) and compiles MAX_JOBS files at once; -v shows its
	# [n/N] progress lines
	PATH="$(abspath $(BIN)):$$PATH" MAX_JOBS=$(JOBS) $(BIN)/pip install -v --no-build-isolation -e .
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

clean:
	rm -rf $(VENV) build *.egg-info out out-*
