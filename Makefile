# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs into .venv and runs the gap-filling job on the demo cube
#   make test   installs into .venv and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) --quiet torch==2.13.0
	$(PIP) --quiet -e .

install-test: $(BIN)/python
	$(PIP) --quiet torch==2.13.0
	$(PIP) --quiet -e '.[test,bench]'   # bench: the peers the benchmarks compare against

demo: install
	$(BIN)/cube-engine run jobs/gapfill.yaml

test: install-test
	$(BIN)/python -m pytest

bench: install-test
	$(BIN)/python -m benchmarks

clean:
	rm -rf runs .pytest_cache
