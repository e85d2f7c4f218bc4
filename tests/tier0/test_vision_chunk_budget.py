"""Tier 0: the CUDA vision chunk budget assumes flash attention in the vision tower
(issue 14.2.5): no fp32 P^2 score matrix on CUDA with SDPA, so the 7B LLaVA-OneVision
default chunk grows from 17 frames; CPU / meta / eager keep the worst case."""

from __future__ import annotations

import copy
import types

import torch

from lvlm_fast.models.families import family_for
from lvlm_fast.models.wrapper import DEFAULT_MEMORY_BUDGET
from lvlm_fast.profile.memory import build_model


class _OnDevice(torch.nn.Module):
    """The model with its lm_head weight reporting another device (no CUDA needed)."""

    def __init__(self, model, device: str) -> None:
        super().__init__()
        self.inner = model
        w = model.lm_head.weight
        self.lm_head = types.SimpleNamespace(
            weight=types.SimpleNamespace(dtype=w.dtype, device=torch.device(device)))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _with_device(family, device: str):
    f = copy.copy(family)
    f.model = _OnDevice(family.model, device)
    return f


def test_llava_onevision_7b_cuda_budget_has_no_score_matrix():
    model = build_model("llava-onevision-qwen2-7b", simulate=True)
    fam = family_for(model)
    meta = fam.vision_bytes_per_frame()
    cuda = _with_device(fam, "cuda").vision_bytes_per_frame()
    vc = model.config.vision_config
    n = 729
    assert meta - cuda == vc.num_attention_heads * n * n * 4
    assert DEFAULT_MEMORY_BUDGET // meta == 17  # the old default chunk
    assert DEFAULT_MEMORY_BUDGET // cuda > 2 * 17
    # eager attention on CUDA materialises the scores: the worst case is kept
    vc._attn_implementation = "eager"
    try:
        assert _with_device(fam, "cuda").vision_bytes_per_frame() == meta
    finally:
        vc._attn_implementation = "sdpa"


def test_qwen2_5_vl_cuda_budget_has_no_score_matrix():
    model = build_model("qwen2.5-vl-7b", simulate=True)
    fam = family_for(model)
    meta = fam.vision_bytes_per_frame()
    cuda = _with_device(fam, "cuda").vision_bytes_per_frame()
    assert cuda < meta
