# The two Quickstart commands (README) and what CI runs. Each target installs what it needs.
# torch is pinned to the CPU build on this path; the extension is built against the torch
# already installed (--no-build-isolation), never a second downloaded one.
PY ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test demo test lint bench

# One build of the C++ extension per target: the extras ride along in the same install.
install:
	$(PY) -m pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".$(EXTRAS)"

install-test:
	$(MAKE) install EXTRAS="[test]"

demo: install
	lvlm-fast bench --quick

test: install-test
	$(PY) tests/run_all.py

lint:
	ruff check .

bench: install
	$(PY) benchmarks/run.py --device cpu --json benchmarks/results/cpu.json --csv benchmarks/results/cpu.csv
