"""Tier 2: why qformer_cross_attention's launchers route fp64 to the chunked torch paths.
Triton rejects the forward and backward kernels' fp64 dots at compile time (they promote
the loop-carried fp32 accumulators); the routing itself (no kernel launched, results equal
the reference) is tested in tests/tier1/test_qformer_cross_attention_interp.py."""

from __future__ import annotations

import pytest
import torch
from compile_check import compile_spec
from lvlm_fast.kernels.qformer_cross_attention import _specs

FP64 = [s for s in _specs((torch.float64,)) if s["name"] in ("fwd_fp64_m32_d64",
                                                              "bwd_fp64_m32_d64")]


@pytest.mark.parametrize("spec", FP64, ids=[s["name"] for s in FP64])
def test_fp64_is_rejected_by_triton(spec):
    assert len(FP64) == 2
    r = compile_spec("qformer_cross_attention", spec, 80)
    assert "CompilationError" in r.error, (
        f"{spec['name']} now compiles: add fp64 to COMPILE_SPECS, drop the routing")
