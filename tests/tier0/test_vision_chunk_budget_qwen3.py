"""Tier 0: Qwen3-VL's (and so Qwen3.5's) CUDA vision chunk budget assumes flash attention in
the vision tower, like Qwen2.5-VL's (issue 14 item 5): on CUDA with SDPA the fp32 score
matrix of a temporal patch is not counted; CPU / meta / eager keep the worst case."""

from __future__ import annotations

import pytest
from test_vision_chunk_budget import _with_device  # tests/tier0 is on sys.path

from lvlm_fast.models.families import family_for
from lvlm_fast.profile.memory import build_model


@pytest.mark.parametrize("name", ["qwen3-vl-8b", "qwen3.5-9b"])
def test_qwen3_cuda_budget_has_no_score_matrix(name):
    model = build_model(name, simulate=True)
    fam = family_for(model)
    meta = fam.vision_bytes_per_frame()
    cuda = _with_device(fam, "cuda").vision_bytes_per_frame()
    vc = model.config.vision_config
    n = (448 // vc.patch_size) ** 2  # patches of one temporal patch at the nominal frame
    # per frame: one temporal patch (2 frames) holds the n x n scores of every head
    assert meta - cuda in {vc.num_heads * n * n * 4 // 2, vc.num_heads * n * n * 4 // 2 + 1}
    assert cuda < meta
    old = getattr(vc, "_attn_implementation", None)
    vc._attn_implementation = "eager"  # eager on CUDA materialises the scores
    try:
        assert _with_device(fam, "cuda").vision_bytes_per_frame() == meta
    finally:
        vc._attn_implementation = old
