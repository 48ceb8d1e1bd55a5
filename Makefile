# diffseg: the two commands of the README, and the developer targets.
#   make demo   set up .venv with what the demo runs, then run it: planted
#               synthetic attention through the C core (no model, no torch);
#               with IMAGE=photo.jpg, segment that photo with Stable Diffusion
#               (installs torch and diffusers first)
#   make test   set up .venv with everything and run the test suite (CI runs
#               it first, then test-reliability, test-aoti, test-asan and the release checks)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
SOURCES := $(wildcard csrc/*/*.c csrc/*/*.h csrc/*/*.cpp csrc/*/*.py) setup.py pyproject.toml
# torch is pinned (the shim is compiled against its libtorch) and taken from the
# CPU index: on Linux, PyPI's default torch wheel is a multi-GB CUDA build.
# `make test TORCH_INDEX=` takes PyPI's (CUDA) build instead.
TORCH := torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_INDEX),)
TORCH_INSTALL = $(PIP) install "$(TORCH)"
else
# A CPU build the configured indexes already offer (a local wheel, a mirror) first, else the CPU index.
TORCH_INSTALL = $(PIP) install "$(TORCH)+cpu" 2>/dev/null || $(PIP) install "$(TORCH)" --index-url $(TORCH_INDEX)
endif
CORE_STAMP := $(VENV)/.diffseg-core
TORCH_STAMP := $(VENV)/.diffseg-torch
DEV_STAMP := $(VENV)/.diffseg-dev

.PHONY: demo test test-reliability test-aoti bench test-asan clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel

# The C core and its run-time dependencies only (NumPy, SciPy, Pillow, tqdm).
$(CORE_STAMP): $(SOURCES) | $(PY)
	$(PIP) install numpy
	DIFFSEG_NO_TORCH=1 $(PIP) install --no-build-isolation -e .
	touch $@

# torch first, then the package built against it (the libtorch shim needs
# torch at build time, hence --no-build-isolation).
$(TORCH_STAMP): $(SOURCES) | $(PY)
	$(TORCH_INSTALL)
	$(PIP) install numpy
	$(PIP) install --no-build-isolation -e ".[torch]"
	touch $@ $(CORE_STAMP)

$(DEV_STAMP): $(TORCH_STAMP)
	$(PIP) install --no-build-isolation -e ".[torch,plots,dev]"
	touch $@

ifdef IMAGE
demo: $(TORCH_STAMP)
	$(VENV)/bin/diffseg segment $(IMAGE) -o out/segment $(if $(MODEL),--model $(MODEL))
else
demo: $(CORE_STAMP)
	$(VENV)/bin/diffseg demo -o out/demo
endif

test: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not reliability and not aoti"

# Slow fuzzing, concurrency, leak, damaged-bundle and build-from-C tests.
test-reliability: $(DEV_STAMP)
	$(PY) -m pytest -q -m reliability

# The AOTInductor backend: compiles a tiny package once (minutes).
test-aoti: $(DEV_STAMP)
	$(PY) -m pytest -q -m aoti

bench: $(DEV_STAMP)
	$(PY) benchmarks/bench_core.py

test-asan: $(DEV_STAMP)
	bash tools/asan.sh

clean:
	rm -rf build $(VENV) diffseg/*.so *.egg-info
