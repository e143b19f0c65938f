# voiceloop — the two commands of the README:
#   make demo   set up everything, then run the loop end to end (voiceloop demo, quick profile)
#   make test   set up everything, then run the test suite
# Both work on a fresh Debian machine as root: system packages, uv, the Python environment.

SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

SYSTEM_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k sox libsndfile1 git chromium chromium-driver
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PROFILE ?= quick
# The suite runs in one pytest-xdist worker per core (tests/conftest.py: one thread per
# worker, one group per test module); PYTEST_ARGS= (empty) runs it in one process.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: demo pipeline test setup system-packages uv venv lint clean-workspace

demo: setup
	uv run voiceloop demo --profile $(PROFILE)

pipeline: setup   # the DVC training pipeline (corpus -> teacher -> evaluate -> student) on PROFILE
	uv run dvc repro
	uv run dvc push -q || echo "dvc push failed: outputs are still in the local cache"

test: setup
	uv run pytest $(PYTEST_ARGS)

setup: system-packages venv

system-packages:
	@if ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
		echo "installing system packages: $(SYSTEM_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	fi

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv

# Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set (as in our dev image)
# Python would otherwise compile every imported module from source in every process —
# half of a 30-s CLI stage, and of each server and subprocess the tests start.
venv: uv
	uv sync --frozen --compile-bytecode
	uv run python -m compileall -q -j 0 model serving monitoring flows voiceloop benchmarks tests

lint: venv
	uv run ruff check .

clean-workspace:
	rm -rf workspace
