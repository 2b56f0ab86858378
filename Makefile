# actsparse — quick start: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
BUILD ?= build
JOBS ?= 2
CMAKE_FLAGS ?=
VENV := .venv
VPY := $(VENV)/bin/python
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# Targets of the pinned llama.cpp plus our own tools.
LLAMA_TARGETS := llama-cli llama-completion llama-server llama-bench llama-perplexity llama-quantize \
                 actsparse-calibrate actsparse-bench-kernels actsparse-bench-reads actsparse-test-kernels actsparse-test-kernels-asan
ifneq ($(filter x86_64 amd64,$(shell uname -m)),)
LLAMA_TARGETS += actsparse-test-kernels-avx512bw actsparse-test-kernels-avx2 actsparse-test-kernels-scalar  # narrower SIMD builds of the tests
endif
WORKTREE := work/llama.cpp
# The same pinned llama.cpp without patches/: dense outputs are compared with it bit for bit.
UPSTREAM_BUILD := build-upstream
UPSTREAM_TARGETS := llama-completion llama-perplexity
# ccache: hash paths relative to the checkout, so a fresh clone elsewhere reuses the cache
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

.PHONY: all build build-upstream venv demo test test-neon results lint format llama-src patches clean help
all: build venv

help:
	@echo "make demo       build, fetch the default model and run the main job"
	@echo "make test       build and run the whole test suite"
	@echo "make test-neon  cross-compile the kernel tests for aarch64 (NEON) and run them under qemu-user"
	@echo "make results    measure quality and speed on both models and write docs/results.md (hours)"
	@echo "make build      configure and build llama.cpp + native/ into $(BUILD)/bin"
	@echo "make build-upstream  the pinned llama.cpp without patches, in $(UPSTREAM_BUILD) (tests compare with it)"
	@echo "make venv       project virtual environment in $(VENV)"
	@echo "make llama-src  lay out the pinned llama.cpp as a git work tree in $(WORKTREE) with patches/ applied"
	@echo "make patches    regenerate patches/ from the commits in $(WORKTREE)"
	@echo "make lint       ruff check + format check"

$(BUILD)/build.ninja: CMakeLists.txt cmake/PinnedLlamaCpp.cmake
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: $(BUILD)/build.ninja
	cmake --build $(BUILD) -j$(JOBS) --target $(LLAMA_TARGETS)

$(UPSTREAM_BUILD)/build.ninja: CMakeLists.txt cmake/PinnedLlamaCpp.cmake
	cmake -S . -B $(UPSTREAM_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DACTSPARSE_UPSTREAM=ON $(CMAKE_FLAGS)

build-upstream: $(UPSTREAM_BUILD)/build.ninja
	cmake --build $(UPSTREAM_BUILD) -j$(JOBS) --target $(UPSTREAM_TARGETS)

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check --upgrade pip
	# pure-Python binding: it loads our libllama (see actsparse/engine.py), so it compiles nothing
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(VPY) -m pip install -q --disable-pip-version-check --no-cache-dir $(LLAMA_CPP_PYTHON)
	# reference: transformers + CPU torch, the scorer's and the runtime's independent check
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev,reference]'
	touch $@

venv: $(VENV)/.stamp

demo: build venv
	$(VPY) -m actsparse.cli demo

test: build build-upstream venv
	$(VPY) -m pytest -ra --durations=40 tests

test-neon:
	JOBS=$(JOBS) scripts/test-neon.sh

results: build venv
	$(VPY) -m actsparse.cli report

lint: venv
	$(VENV)/bin/ruff check python tests
	$(VENV)/bin/ruff format --check python tests

format: venv
	$(VENV)/bin/ruff format python tests
	$(VENV)/bin/ruff check --fix python tests

# A git work tree of the pinned source: commit "pristine", then one commit per patch.
llama-src: $(BUILD)/build.ninja
	scripts/llama-src.sh init $(BUILD) $(WORKTREE)

patches:
	scripts/llama-src.sh export $(BUILD) $(WORKTREE)

clean:
	rm -rf $(BUILD)
