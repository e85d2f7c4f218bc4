# The two Quickstart commands (README) and what CI runs. Each target installs what it needs.
# torch is pinned to the CPU build on this path; the extension is built against the torch
# already installed (--no-build-isolation), never a second downloaded one.
PY ?= python3
TORCH_SPEC ?= torch==2.13.0
# The supported transformers range has one home, pyproject.toml ("transformers>=LOW,<HIGH").
TF_SPEC := $(shell sed -n 's/^models = \["\(transformers[^"]*\)"\]/\1/p' pyproject.toml)
TF_LOW := $(shell echo '$(TF_SPEC)' | sed -n 's/.*>=\([0-9.]*\).*/\1/p')
# The model tests also run against the OLDEST supported transformers, in a second venv
# (cached: built once per version, reused by every later CI run).
COMPAT_VENV ?= $(HOME)/.cache/lvlm-fast/venv-tf-$(TF_LOW)
COMPAT_TEST_DEPS = numpy ninja pytest pytest-benchmark hypothesis safetensors "av>=12" tqdm \
	"matplotlib>=3.7"

# lmms-eval for the `lvlm_fast` plugin tests: --no-deps, its declared dependencies would pull
# torchvision (replacing the CPU torch), av<16, wandb, ...; the `eval` extra has what it imports.
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

.PHONY: install install-test demo test lint bench compat-venv gpu-check

# One build of the C++ extension per target: the extras ride along in the same install.
install:
	$(PY) -m pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".$(EXTRAS)"

# -U on transformers alone: the tests run against the NEWEST release the range allows, not
# whatever happened to be installed already (torch stays at its pin).
install-test:
	$(MAKE) install EXTRAS="[test,eval]"
	$(PY) -m pip install -q -U "$(TF_SPEC)"
	$(PY) -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"
	@$(PY) -c 'import sys, torch; v = torch.__version__; want = "$(TORCH_SPEC)".split("==")[-1]; print("torch", v); sys.exit(0 if v.split("+")[0] == want else f"torch {v} is not $(TORCH_SPEC): an install replaced it")'

demo: install
	lvlm-fast bench --quick

test: install-test
	$(PY) tests/run_all.py

# Prints (only) the venv's python; pip's output goes to stderr. The venv holds no install of
# this package: tests/run_all.py puts the source tree (and its prebuilt extension, built
# against the same TORCH_SPEC) on PYTHONPATH. A half-built venv lacks .ok and is rebuilt.
compat-venv:
	@test -f "$(COMPAT_VENV)/.ok" || { rm -rf "$(COMPAT_VENV)" && \
		$(PY) -m venv "$(COMPAT_VENV)" && \
		"$(COMPAT_VENV)/bin/python" -m pip install -q "$(TORCH_SPEC)" $(COMPAT_TEST_DEPS) \
			"transformers==$(TF_LOW)" && \
		touch "$(COMPAT_VENV)/.ok"; } >&2
	@echo "$(COMPAT_VENV)/bin/python"

# Everything that needs a CUDA GPU (tier 3, GPU benchmarks, measured vs simulated memory).
# No torch pin: the script keeps the machine's CUDA torch. Without CUDA: one line, exit 0.
gpu-check:
	$(PY) benchmarks/gpu_check.py

lint:
	ruff check .

bench: install
	$(PY) benchmarks/run.py --device cpu --json benchmarks/results/cpu.json --csv benchmarks/results/cpu.csv
