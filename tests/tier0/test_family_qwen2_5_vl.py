"""Qwen2.5-VL through the family layer: chunked vision == transformers' all-frames vision,
M-RoPE positions == ``get_rope_index``, ``full`` == ``generate`` token for token (fp32
logits within 1e-5), loading, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 is on sys.path
    check_full_equals_generate,
    hf_generate,
    random_prompt,
)
from transformers import Qwen2_5_VLForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.families import TokenBlocks, family_for
from lvlm_fast.models.families.qwen2_5_vl import MRopePlan, smart_resize
from lvlm_fast.models.strategies.base import VideoPrompt

VIDEO, START, END = 251, 252, 253
H, W = 112, 168  # 8 x 12 patches -> 4 x 6 merged tokens, 2 x 3 windows of 56 px


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(get_config("tiny-qwen2.5-vl")).eval()


def _prompt(t: int, p: int = 3, q: int = 4, seed: int = 0, fps: float | None = None,
            hw: tuple[int, int] = (H, W)) -> VideoPrompt:
    return random_prompt(t, hw, p, q, seed, fps)


def _hf_inputs(vlm: LongVideoVLM, pr: VideoPrompt) -> dict:
    """What the Qwen2.5-VL processor would give for this prompt."""
    fam = vlm.family
    flat, thw = fam.patchify(pr.pixel_values)
    n = int(thw.prod()) // 4
    ids = torch.cat([pr.prefix_ids, torch.full((1, n), VIDEO), pr.question_ids], dim=1)
    kw = dict(input_ids=ids, pixel_values_videos=flat, video_grid_thw=thw,
              mm_token_type_ids=(ids == VIDEO).int() * 2)
    if pr.fps is not None:
        kw["second_per_grid_ts"] = torch.tensor([2 / pr.fps])
    return kw


def test_family_registry(qwen):
    fam = family_for(qwen)
    assert fam.name == "qwen2_5_vl" and fam.frames_per_unit == 2
    assert fam.units(5) == 3 and fam.token_grid((H, W)) == (4, 6)
    with pytest.raises(TypeError, match=r"Linear; supported: .*Qwen2_5_VLForConditional"):
        family_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("frames,chunk", [(6, 2), (10, 4), (5, 4), (4, 3)])
def test_vision_chunks_equal_get_video_features(qwen, frames, chunk):
    """Chunks of temporal patches == the vision tower on every frame at once (full blocks
    attend within a temporal patch, windows within a frame); odd frame counts repeat the
    last frame; a chunk size that is not a multiple of 2 frames rounds up."""
    vlm = LongVideoVLM(qwen, vision_chunk_frames=chunk)
    pr = _prompt(frames)
    flat, thw = vlm.family.patchify(pr.pixel_values)
    with torch.no_grad():
        want = qwen.model.get_video_features(flat, thw).pooler_output[0]
    got, starts = [], []
    for s, f in vlm.iter_patch_features(pr.pixel_values):
        starts.append(s)
        got.append(f)
    got = torch.cat(got)
    assert got.shape == (thw[0, 0], 4, 6, 128)
    step = -(-chunk // 2)
    assert starts == list(range(0, -(-frames // 2), step))
    torch.testing.assert_close(got.reshape(-1, 128), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fps", [None, 2.0, 0.5])
@pytest.mark.parametrize("frames", [2, 6])
def test_positions_equal_get_rope_index(qwen, frames, fps):
    vlm = LongVideoVLM(qwen)
    pr = _prompt(frames, p=4, q=5, fps=fps)
    kw = _hf_inputs(vlm, pr)
    want, delta = qwen.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw.get("second_per_grid_ts"))
    units = frames // 2
    blocks = TokenBlocks.grid(units, 4, 6, frame_hw=(H, W), fps=fps)
    plan = vlm.family.position_plan(4, blocks, units * 24, 5)
    total = plan.total
    assert total == kw["input_ids"].shape[1]
    torch.testing.assert_close(plan.chunk(0, total), want, rtol=0, atol=0)
    for lo, hi in [(0, 3), (3, 17), (17, total), (total - 1, total)]:  # any chunk alone
        torch.testing.assert_close(plan.chunk(lo, hi), want[:, :, lo:hi], rtol=0, atol=0)
    # generated tokens: transformers' rope_deltas (position = cache length + delta)
    assert int(plan.decode(0)[0, 0, 0]) == total + int(delta)
    assert int(plan.decode(3)[1, 0, 0]) == total + 3 + int(delta)


def test_positions_temporal_axis_past_the_text(qwen):
    """A long video at a low fps: the temporal positions run past the question's, and the
    first generated token continues after the largest (transformers' rope_deltas)."""
    vlm = LongVideoVLM(qwen)
    pr = _prompt(10, fps=0.25)  # interval = 2 * (2 / 0.25) = 16 per temporal patch
    kw = _hf_inputs(vlm, pr)
    want, delta = qwen.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw["second_per_grid_ts"])
    plan = vlm.family.position_plan(3, TokenBlocks.grid(5, 4, 6, frame_hw=(H, W), fps=0.25),
                                    120, 4)
    torch.testing.assert_close(plan.chunk(0, plan.total), want, rtol=0, atol=0)
    assert int(want.max()) == 3 + 4 * 16
    assert int(plan.decode(0)[0, 0, 0]) == plan.total + int(delta) == 3 + 4 * 16 + 1


@pytest.mark.parametrize("frames", [2, 4, 6, 10])
@pytest.mark.parametrize("attention,chunk", [("auto", 7), ("model", 11)])
def test_full_equals_generate(qwen, frames, attention, chunk):
    """``full`` == ``Qwen2_5_VLForConditionalGeneration.generate``: greedy tokens equal,
    first-token logits within 1e-5 (fp32), prefill chunks that do not divide the prompt,
    fused attention (head dim 64: ``auto``) and the model's own (SDPA)."""
    vlm = LongVideoVLM(qwen, "full", vision_chunk_frames=4, prefill_chunk_tokens=chunk,
                       attention=attention)
    assert vlm.fused_attention == (attention == "auto")
    pr = _prompt(frames, seed=frames, fps=1.0 if frames == 10 else None)
    res = check_full_equals_generate(vlm, qwen, pr, _hf_inputs(vlm, pr))
    assert isinstance(res.positions, MRopePlan)
    assert res.visual_tokens == frames // 2 * 24 and res.frames_encoded == frames


def test_full_odd_frame_count_repeats_last_frame(qwen):
    """5 frames = 3 temporal patches, the last one (frame 4, frame 4): as the processor."""
    vlm = LongVideoVLM(qwen, vision_chunk_frames=2, prefill_chunk_tokens=9)
    pr = _prompt(5, seed=3)
    padded = VideoPrompt(torch.cat([pr.pixel_values, pr.pixel_values[-1:]]), pr.prefix_ids,
                         pr.question_ids)
    want_tokens, _ = hf_generate(qwen, _hf_inputs(vlm, padded), 4)
    assert torch.equal(vlm.generate(pr, max_new_tokens=4), want_tokens)


def test_uniform_equals_generate_on_sampled_frames(qwen):
    vlm = LongVideoVLM(qwen, "uniform", num_frames=4, prefill_chunk_tokens=16)
    pr = _prompt(9, seed=5, fps=3.0)
    idx = torch.linspace(0, 8, 4, dtype=torch.float64).round().long()
    sampled = VideoPrompt(pr.pixel_values[idx], pr.prefix_ids, pr.question_ids,
                          fps=3.0 * 4 / 9)
    want_tokens, _ = hf_generate(qwen, _hf_inputs(vlm, sampled), 4)
    assert torch.equal(vlm.generate(pr, max_new_tokens=4), want_tokens)
    assert vlm.last_prefill.frames_encoded == 4


def test_from_config_and_from_pretrained(qwen, tmp_path):
    vlm = LongVideoVLM.from_config("tiny-qwen2.5-vl", "full")
    assert type(vlm.model) is Qwen2_5_VLForConditionalGeneration
    assert vlm.family.name == "qwen2_5_vl"
    qwen.save_pretrained(tmp_path)
    loaded = LongVideoVLM.from_pretrained(tmp_path, "full", prefill_chunk_tokens=5)
    pr = _prompt(4, seed=1)
    torch.testing.assert_close(loaded.first_token(pr), LongVideoVLM(qwen).first_token(pr),
                               rtol=0, atol=1e-6)
    meta = LongVideoVLM.from_config("qwen2.5-vl-7b", device="meta", dtype=torch.bfloat16)
    assert meta.family.token_grid((448, 448)) == (16, 16)
    assert meta.vision_chunk_frames >= 2


def test_bad_input(qwen):
    vlm = LongVideoVLM(qwen)
    with pytest.raises(ValueError, match=r"pixel_values must be \(T, 3, H, W\).*multiples of 28"):
        vlm.first_token(_prompt(2, hw=(112, 100)))
    with pytest.raises(ValueError, match="fps"):
        vlm.first_token(_prompt(2, fps=0.0))
    with pytest.raises(ValueError, match="TokenBlocks"):
        vlm.prefill_embeds(torch.tensor([[5]]), torch.zeros(1, 3, 128), torch.tensor([[6]]),
                           frames_encoded=0)
    with pytest.raises(AttributeError, match="no fixed frame size"):
        _ = vlm.tokens_per_frame


def test_non_default_rope_is_an_error(qwen):
    """A scaled RoPE (yarn, dynamic, ...) is refused up front, never run as plain M-RoPE."""
    tc = qwen.config.text_config
    old = tc.rope_parameters
    tc.rope_parameters = {**old, "rope_type": "yarn", "factor": 2.0}
    try:
        with pytest.raises(ValueError, match="rope_type 'yarn'"):
            LongVideoVLM(qwen)
    finally:
        tc.rope_parameters = old


def test_smart_resize_matches_transformers():
    # the PIL image processor's copy (the video processor's module needs torchvision)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    for h, w in [(480, 640), (1080, 1920), (100, 90), (2000, 30)]:
        assert smart_resize(h, w, 28, 128 * 784, 768 * 784) == \
            hf_smart_resize(h, w, 28, 128 * 784, 768 * 784)
