"""Qwen3.5 (hybrid Gated DeltaNet + full attention, Qwen3-VL's vision side) through the
family layer: chunked vision == transformers' all-frames vision, positions ==
``Qwen3_5Model.get_rope_index`` on the processor's timestamped prompt, ``full`` ==
``Qwen3_5ForConditionalGeneration.generate`` token for token (fp32 first-token logits
within 1e-5) with the hybrid preallocated cache and non-dividing prefill chunks, configs,
loading, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 is on sys.path
    check_from_pretrained,
    check_full_equals_generate,
    random_prompt,
    text_ids,
)
from transformers import Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from lvlm_fast.cache import PreallocatedLayer, PreallocatedStateLayer
from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.families import TokenBlocks, family_for
from lvlm_fast.models.families.qwen3_vl import Qwen3VLFamily, SequentialPlan
from lvlm_fast.models.strategies.base import VideoPrompt

VIDEO, START, END = 251, 252, 253
H, W = 128, 96  # 8 x 6 patches of 16 -> 4 x 3 merged tokens per frame

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def qwen35():
    torch.manual_seed(0)
    return Qwen3_5ForConditionalGeneration(get_config("tiny-qwen3.5")).eval()


def _prompt(t: int, p: int = 3, q: int = 4, seed: int = 0, fps: float | None = None,
            hw: tuple[int, int] = (H, W)) -> VideoPrompt:
    return random_prompt(t, hw, p, q, seed, fps, text_ids=text_ids)


def hf_inputs(vlm: LongVideoVLM, pr: VideoPrompt) -> dict:
    """What the processor (transformers maps qwen3_5 to Qwen3VLProcessor) gives for this
    prompt: ``<t seconds><vs> pads <ve>`` per temporal unit, transformers' timestamps."""
    flat, thw = vlm.family.patchify(pr.pixel_values)
    t, per = int(thw[0, 0]), int(thw[0, 1] * thw[0, 2]) // 4
    ts = Qwen3VLProcessor._calculate_timestamps(
        None, list(range(pr.pixel_values.shape[0])), 24 if pr.fps is None else pr.fps, 2)
    ids = pr.prefix_ids[0].tolist()
    for u in range(t):
        ids += text_ids(f"<{ts[u]:.1f} seconds>") + [START] + [VIDEO] * per + [END]
    ids = torch.tensor([ids + pr.question_ids[0].tolist()])
    return dict(input_ids=ids, pixel_values_videos=flat, video_grid_thw=thw,
                mm_token_type_ids=(ids == VIDEO).int() * 2)


def test_family_registry_and_configs(qwen35):
    fam = family_for(qwen35)
    assert fam.name == "qwen3_5" and isinstance(fam, Qwen3VLFamily)
    assert fam.frames_per_unit == 2 and fam.token_grid((H, W)) == (4, 3)
    assert fam.deepstack_levels() == 0 and fam.feature_size() == 128
    assert (fam.num_kv_layers(), fam.num_state_layers()) == (2, 2)
    big = get_config("qwen3.5-9b")
    tc, vc = big.text_config, big.vision_config
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads,
            tc.num_key_value_heads, tc.head_dim, tc.vocab_size) == (32, 4096, 16, 4, 256, 248320)
    assert tc.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 8
    assert tc.rope_parameters["mrope_section"] == [11, 11, 10]
    assert tc.rope_parameters["partial_rotary_factor"] == 0.25
    assert (tc.linear_num_key_heads, tc.linear_num_value_heads, tc.linear_key_head_dim,
            tc.linear_conv_kernel_dim) == (16, 32, 128, 4)
    assert vc.out_hidden_size == tc.hidden_size and vc.patch_size == 16
    meta = LongVideoVLM.from_config("qwen3.5-9b", device="meta", dtype=torch.bfloat16)
    assert meta.family.name == "qwen3_5" and meta.family.token_grid((448, 448)) == (14, 14)
    assert not meta.fused_attention  # head dim 256: the model's own attention
    cache = meta.make_cache(100)
    assert len(cache.kv_layers) == 8 and len(cache.state_layers) == 24


@pytest.mark.parametrize("frames,chunk", [(6, 2), (5, 4)])
def test_vision_chunks_equal_get_video_features(qwen35, frames, chunk):
    vlm = LongVideoVLM(qwen35, vision_chunk_frames=chunk)
    pr = _prompt(frames)
    flat, thw = vlm.family.patchify(pr.pixel_values)
    with torch.no_grad():
        want = qwen35.model.get_video_features(flat, thw, return_dict=True).pooler_output[0]
    got = torch.cat([f for _, f in vlm.iter_patch_features(pr.pixel_values)])
    assert got.shape == (thw[0, 0], 4, 3, 128)
    torch.testing.assert_close(got.reshape(-1, 128), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vlm.family.encode_all_at_once(pr.pixel_values), got,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames,fps", [(2, None), (5, 2.0), (8, 0.5)])
def test_positions_equal_get_rope_index(qwen35, frames, fps):
    vlm = LongVideoVLM(qwen35)
    pr = _prompt(frames, p=4, q=5, fps=fps)
    kw = hf_inputs(vlm, pr)
    want, delta = qwen35.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"],
                                              video_grid_thw=kw["video_grid_thw"])
    units = -(-frames // 2)
    fam = vlm.family
    blocks = TokenBlocks.grid(units, 4, 3, frame_hw=(H, W), fps=fps, num_frames=frames)
    layout = fam.visual_layout(blocks, units * 12, text_ids=text_ids)
    seq = []
    for piece in layout.pieces:
        seq += [VIDEO] * (piece[1] - piece[0]) if isinstance(piece, tuple) else piece.tolist()
    assert pr.prefix_ids[0].tolist() + seq + pr.question_ids[0].tolist() \
        == kw["input_ids"][0].tolist()
    plan = fam.position_plan(4, blocks, units * 12, 5, layout=layout)
    assert isinstance(plan, SequentialPlan)
    torch.testing.assert_close(plan.chunk(0, plan.total), want, rtol=0, atol=0)
    for lo, hi in [(0, 3), (3, 17), (17, plan.total)]:
        torch.testing.assert_close(plan.chunk(lo, hi), want[:, :, lo:hi], rtol=0, atol=0)
    assert int(plan.decode(2)[0, 0, 0]) == plan.total + 2 + int(delta)


@pytest.mark.parametrize("frames", [2, 5, 8])
@pytest.mark.parametrize("attention,chunk", [("auto", 7), ("model", 11)])
def test_full_equals_generate(qwen35, frames, attention, chunk):
    """``full`` == ``generate``: greedy tokens equal, first-token logits within 1e-5, prefill
    chunks that do not divide the prompt (the linear layers' conv window and recurrent
    state carried across every chunk boundary, inside frames and timestamps), the fused
    attention (head dim 64) and the model's own."""
    vlm = LongVideoVLM(qwen35, "full", vision_chunk_frames=4, prefill_chunk_tokens=chunk,
                       attention=attention)
    pr = _prompt(frames, seed=frames, fps=1.0 if frames == 8 else None)
    kw = hf_inputs(vlm, pr)
    res = check_full_equals_generate(vlm, qwen35, pr, kw)
    assert res.llm_tokens == kw["input_ids"].shape[1]
    kinds = [type(la) for la in res.cache.layers]
    assert kinds == [PreallocatedStateLayer, PreallocatedLayer] * 2
    # KV rows for prompt + 5 fed-back tokens; the states did not grow
    assert res.cache.get_seq_length() == res.llm_tokens + 5
    assert res.cache.state_bytes() == 2 * (1 * 256 * 4 + 4 * 32 * 32) * 4


def test_from_pretrained(qwen35, tmp_path):
    check_from_pretrained(qwen35, tmp_path, "qwen3_5", _prompt(4, seed=1))


def test_bad_input(qwen35):
    vlm = LongVideoVLM(qwen35)
    with pytest.raises(ValueError, match=r"multiples of 32"):
        vlm.first_token(_prompt(2, hw=(112, 112)))
    pr = _prompt(2)
    pr.text_ids = None
    with pytest.raises(ValueError, match=r"prompt\.text_ids"):
        vlm.first_token(pr)
    res = vlm.prefill(_prompt(2))
    with pytest.raises(ValueError, match="recurrent state has absorbed"):
        res.cache.crop(-1)
