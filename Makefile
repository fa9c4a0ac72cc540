# Quick start: `make serve` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= switchboard-data

.PHONY: serve serve-cluster test build debug bench bench-density bench-throughput bench-compare clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev,bench,cluster]'
	touch $(STAMP)

# Re-cythonize whatever .pyx/.pxd changed since the last build, and byte-compile the
# sources: where PYTHONDONTWRITEBYTECODE is set (many containers) every process start,
# each worker and CLI call, compiled them again (0.14 s of a gateway's 0.39 s start).
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace -j 2
	$(BIN)/python -m compileall -q -j 2 _core router gateway bench tests examples

# Debug build: annotate, linetrace, -O0 -g, SWITCHBOARD_DEBUG invariant checks.
debug: $(STAMP)
	SWITCHBOARD_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force

serve: build
	$(BIN)/switchboard serve --data-dir $(DATA)

# Three NATS servers and three gateway nodes (127.0.0.11-13:7400) under ./switchboard-cluster.
serve-cluster: build
	$(BIN)/python -m gateway.cluster.devcluster

test: build
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python -m pytest bench/ --benchmark-only -q

# The numbers in docs/benchmarks.md come from these (see there for the exact flags).
bench-density: build
	$(BIN)/switchboard bench density --sessions 1M --step 100k --workers 64 --concurrency 64 --ping-interval 60 \
		--json docs/results/density-1m.json --plot docs/density-1m.png

bench-throughput: build
	$(BIN)/switchboard bench throughput --against switchboard,nats,websockets --size 32,1024,4096

bench-compare: build
	$(BIN)/switchboard bench compare --json docs/results/compare.json --plot docs/density-compare.png

clean:
	rm -rf build $(VENV) _core/*.c _core/*.so _core/*.html bench/*.c bench/*.so *.egg-info
