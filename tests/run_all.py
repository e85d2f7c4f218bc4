#!/usr/bin/env python3
"""Run every test tier, each in its own process (README's test command runs this).

tier 0  CPU: reference vs C++ kernels, opcheck, gradcheck, meta, torch.compile, bad input
tier 1  Triton kernels in the interpreter (TRITON_INTERPRET=1 must be set before import)
tier 2  Triton kernels compiled ahead of time for sm_80 and sm_90; spills fail
tier 3  CUDA numerics and speed (skip cleanly without a GPU)
Also: ruff. Exit code is non-zero if any tier fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name: str, cmd: list[str], env: dict[str, str] | None = None) -> bool:
    full_env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1", **(env or {})}
    if env is None:
        full_env.pop("TRITON_INTERPRET", None)
    print(f"\n===== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    ok = subprocess.call(cmd, cwd=ROOT, env=full_env) == 0
    print(f"===== {name}: {'PASS' if ok else 'FAIL'} in {time.time() - t0:.0f}s", flush=True)
    return ok


def main() -> int:
    py = sys.executable
    extra = sys.argv[1:]
    pytest = [py, "-m", "pytest", "-q"]
    results = {
        "ruff": _run("ruff", [py, "-m", "ruff", "check", "."]),
        "tier0": _run("tier0 (CPU)", [*pytest, "tests/tier0", *extra]),
        "tier1": _run("tier1 (Triton interpreter)", [*pytest, "tests/tier1", *extra],
                      env={"TRITON_INTERPRET": "1"}),
        "tier2": _run("tier2 (sm_80/sm_90 compile)", [*pytest, "tests/tier2", *extra]),
        "tier3": _run("tier3 (CUDA)", [*pytest, "tests/tier3", *extra]),
    }
    print("\nsummary: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
