# Quick start: `make serve` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= switchboard-data

.PHONY: serve test build debug bench bench-e2e clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

# Re-cythonize whatever .pyx/.pxd changed since the last build.
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace -j 2

# Debug build: annotate, linetrace, -O0 -g, SWITCHBOARD_DEBUG invariant checks.
debug: $(STAMP)
	SWITCHBOARD_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force

serve: build
	$(BIN)/switchboard serve --data-dir $(DATA)

test: build
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python -m pytest bench/ --benchmark-only -q

bench-e2e: build
	$(BIN)/python bench/e2e_throughput.py

clean:
	rm -rf build $(VENV) _core/*.c _core/*.so _core/*.html *.egg-info
