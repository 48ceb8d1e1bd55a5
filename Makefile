# diffseg: the two commands of the README, and the developer targets.
#   make demo   set up .venv and run the main job (segment an image with a
#               Stable Diffusion bundle when IMAGE=... is given, else planted
#               synthetic attention, no weights needed)
#   make test   set up .venv and run the test suite (CI runs it first, then
#               test-reliability, test-aoti, test-asan and the release checks)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffseg-installed
SOURCES := $(wildcard csrc/*/*.c csrc/*/*.h csrc/*/*.cpp csrc/*/*.py) setup.py pyproject.toml
# The torch wheel is pinned: a plain "torch" requirement pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-reliability test-aoti bench test-asan clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then the package built against it (the libtorch shim needs
# torch at build time, hence --no-build-isolation).
$(STAMP): $(SOURCES) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)" numpy
	$(PY) -m pip install --quiet --no-build-isolation -e ".[torch,plots,dev]"
	touch $(STAMP)

demo: $(STAMP)
ifdef IMAGE
	$(VENV)/bin/diffseg segment $(IMAGE) -o out/segment $(if $(MODEL),--model $(MODEL))
else
	$(VENV)/bin/diffseg demo -o out/demo
endif

test: $(STAMP)
	$(PY) -m pytest -q -m "not reliability and not aoti"

# Slow fuzzing, concurrency, leak, damaged-bundle and build-from-C tests.
test-reliability: $(STAMP)
	$(PY) -m pytest -q -m reliability

# The AOTInductor backend: compiles a tiny package once (minutes).
test-aoti: $(STAMP)
	$(PY) -m pytest -q -m aoti

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

test-asan: $(STAMP)
	bash tools/asan.sh

clean:
	rm -rf build $(VENV) diffseg/*.so *.egg-info
