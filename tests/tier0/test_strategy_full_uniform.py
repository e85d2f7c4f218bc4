"""`full` = plain transformers generate on the same frames and prompt (exact tokens);
`uniform` = `full` on the uniformly sampled frames."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlavaOnevisionForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config, get_strategy
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.models.strategies.uniform import UniformConfig, uniform_index
from lvlm_fast.video import sample_indices

MAX_NEW = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision")).eval()


def _prompt(t: int, seed: int = 0) -> VideoPrompt:
    g = torch.Generator().manual_seed(seed)
    return VideoPrompt(torch.randn(t, 3, 56, 56, generator=g),
                       torch.randint(0, 250, (1, 3), generator=g),
                       torch.randint(0, 250, (1, 5), generator=g))


def _hf(model, pr: VideoPrompt, frames: torch.Tensor):
    """Plain transformers: video token repeated T*4+1 times between prefix and question."""
    vid = model.config.video_token_index
    t = frames.shape[0]
    ids = torch.cat([pr.prefix_ids, torch.full((1, t * 4 + 1), vid), pr.question_ids], 1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values_videos=frames[None],
                             max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
        logits = model(input_ids=ids, pixel_values_videos=frames[None]).logits[:, -1].float()
    return out[:, ids.shape[1]:], logits


@pytest.mark.parametrize("t,vchunk,pchunk", [(1, 1, 7), (5, 2, 11), (4, 3, 4096)])
def test_full_equals_hf_generate(model, t, vchunk, pchunk):
    pr = _prompt(t, seed=t)
    ref_tokens, ref_logits = _hf(model, pr, pr.pixel_values)
    assert ref_tokens.shape == (1, MAX_NEW)  # no EOS in this config: HF ran every step
    vlm = LongVideoVLM(model, "full", vision_chunk_frames=vchunk, prefill_chunk_tokens=pchunk)
    total = 3 + t * 4 + 1 + 5
    assert pchunk >= total or total % pchunk != 0  # chunks that do not divide the sequence
    torch.testing.assert_close(vlm.first_token(pr), ref_logits, rtol=1e-5, atol=1e-5)
    assert vlm.last_prefill.llm_tokens == total
    assert vlm.last_prefill.visual_tokens == t * 4 + 1
    assert vlm.last_prefill.frames_encoded == t
    assert torch.equal(vlm.generate(pr, MAX_NEW), ref_tokens)


@pytest.mark.parametrize("attention", ["fused", "model"])
def test_full_equals_hf_generate_head_dim_64(attention):
    # head dim 64: prefill chunks and decode steps run on the fused bottom-right causal
    # summary_attention op ("fused", the default for such models) or on SDPA ("model").
    cfg = get_config("tiny-llava-onevision")
    tc = cfg.text_config
    tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads = 128, 2, 1
    torch.manual_seed(3)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    pr = _prompt(3, seed=3)
    ref_tokens, ref_logits = _hf(model, pr, pr.pixel_values)
    vlm = LongVideoVLM(model, "full", vision_chunk_frames=2, prefill_chunk_tokens=5,
                       attention=attention)
    assert vlm.fused_attention == (attention == "fused")
    torch.testing.assert_close(vlm.first_token(pr), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(vlm.generate(pr, MAX_NEW), ref_tokens)
    assert model.config.text_config._attn_implementation != "lvlm_summary"  # restored


def test_uniform_equals_hf_on_sampled_frames(model):
    pr = _prompt(7, seed=11)
    keep = [0, 3, 6]
    ref_tokens, ref_logits = _hf(model, pr, pr.pixel_values[keep])
    vlm = LongVideoVLM(model, "uniform", num_frames=3, vision_chunk_frames=2,
                       prefill_chunk_tokens=6)
    torch.testing.assert_close(vlm.first_token(pr), ref_logits, rtol=1e-5, atol=1e-5)
    assert vlm.last_prefill.frames_encoded == 3
    assert vlm.last_prefill.visual_tokens == 13
    assert torch.equal(vlm.generate(pr, MAX_NEW), ref_tokens)


def test_uniform_short_video_is_full(model):
    pr = _prompt(3, seed=5)
    full = LongVideoVLM(model, "full").first_token(pr)
    uni = LongVideoVLM(model, "uniform").first_token(pr)  # default 32 > 3 frames
    torch.testing.assert_close(uni, full, rtol=0, atol=0)


@pytest.mark.parametrize("t,n", [(10, 4), (6, 4), (4, 3), (100, 32), (33, 32), (2, 2)])
def test_uniform_index_matches_video_sampling(t, n):
    assert uniform_index(t, n, "cpu").tolist() == sample_indices(t, "uniform", count=n)


def test_uniform_config_and_meta():
    assert get_strategy("uniform").config.num_frames == 32
    with pytest.raises(ValueError, match="num_frames"):
        UniformConfig(num_frames=0)
    vlm = LongVideoVLM.from_config("tiny-llava-onevision", "uniform", device="meta",
                                   num_frames=5)
    meta = dict(device="meta")
    pr = VideoPrompt(torch.empty(40, 3, 56, 56, **meta),
                     torch.empty(1, 2, dtype=torch.long, **meta),
                     torch.empty(1, 2, dtype=torch.long, **meta))
    assert vlm.first_token(pr).shape == (1, 256)
    assert vlm.last_prefill.frames_encoded == 5 and vlm.last_prefill.visual_tokens == 21


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py
