# kdfast: `make demo` runs the main job, `make test` the whole test suite; both set everything up.
# Set-up: a .venv with the CPU build of torch where no NVIDIA driver answers (torch==2.13.0,
# installed from local disk on the CI machines) and the CUDA build otherwise, then kdfast in
# editable mode with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
DEPS := "triton>=3.2" "transformers>=4.45" datasets safetensors tqdm pyyaml ninja numpy pytest pytest-benchmark

.PHONY: setup build test test-gpu demo bench aot clean

setup: $(VENV)/.deps-installed

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing CUDA torch"; $(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA driver: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q $(DEPS)
	touch $@

# (Re)builds kdfast._C incrementally (ninja) and installs the package in editable mode.
build: setup
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps
	$(PY) -m kdfast.cli backends

test: build
	$(PY) -m pytest -q tests

# On a GPU machine: the same suite with real Triton/CUDA kernels (tests/test_gpu.py included).
test-gpu: build
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests

demo: build
	$(PY) -m kdfast.cli bench --quick

bench: build
	$(PY) -m kdfast.cli bench
	$(PY) -m pytest -q benchmarks --benchmark-only

# Compile every Triton kernel configuration for sm_90 and sm_80 without a GPU (also a test).
aot: build
	env -u TRITON_INTERPRET $(PY) -m kdfast.kernels.triton.aot --arch 90 80

clean:
	rm -rf build kdfast/_C*.so *.egg-info
