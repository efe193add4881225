# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and install the package into it. `make docs` builds the documentation into site/.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint pytest docs venv bench-ingest gpu-check clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is needed (python3.11 or python3 on PATH)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on the CPU-only development machines this version resolves to the CPU build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m workflows.demo

test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline workflows tests benchmarks
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# the documentation site (mkdocs.yml, docs/) into site/; warnings are errors. The test suite
# builds it too (tests/docs/test_docs.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py

# the tests marked gpu and the GPU benchmark into gpu-check/ (benchmarks/gpu_check.sh). Needs no
# venv and no network (on a bare GPU image it installs the wheels in .whl/, see docs/cluster.md);
# STAND_IN=1 (or no GPU found) runs it on the CPU with a stand-in cupy (not GPU figures).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHON="$(GPU_PYTHON)" bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output site
