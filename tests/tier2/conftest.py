"""Tier 2 (compile check) runs with real triton.jit functions: never under the interpreter."""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError(
        "tests/tier2 compiles kernels for sm_80/sm_90 and must not run with TRITON_INTERPRET=1 "
        "(run it in its own pytest process, as tests/run_all.py does)"
    )
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton's fp-fusion warning
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compile_check helper
