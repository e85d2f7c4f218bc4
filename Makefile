# The two Quickstart commands (README) and what CI runs. Each target installs what it needs.
# torch is pinned to the CPU build on this path; the extension is built against the torch
# already installed (--no-build-isolation), never a second downloaded one.
PY ?= python3
TORCH_SPEC ?= torch==2.13.0

# lmms-eval for the `lvlm_fast` plugin tests: --no-deps, its declared dependencies would pull
# torchvision (replacing the CPU torch), av<16, wandb, ...; the `eval` extra has what it imports.
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

.PHONY: install install-test demo test lint bench

# One build of the C++ extension per target: the extras ride along in the same install.
install:
	$(PY) -m pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".$(EXTRAS)"

install-test:
	$(MAKE) install EXTRAS="[test,eval]"
	$(PY) -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"
	@$(PY) -c 'import sys, torch; v = torch.__version__; want = "$(TORCH_SPEC)".split("==")[-1]; print("torch", v); sys.exit(0 if v.split("+")[0] == want else f"torch {v} is not $(TORCH_SPEC): an install replaced it")'

demo: install
	lvlm-fast bench --quick

test: install-test
	$(PY) tests/run_all.py

lint:
	ruff check .

bench: install
	$(PY) benchmarks/run.py --device cpu --json benchmarks/results/cpu.json --csv benchmarks/results/cpu.csv
