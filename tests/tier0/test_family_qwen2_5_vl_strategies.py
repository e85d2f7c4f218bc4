"""Every reducing strategy on Qwen2.5-VL through the family interface.

For each strategy: the visual tokens equal a recomputation from every temporal patch's
features (transformers' ``get_video_features`` on all frames at once) with the plain-PyTorch
specs in ``lvlm_fast.reference``; the M-RoPE position ids of the whole prompt equal a
per-token table written from the documented rule (Qwen2.5-VL's position rule applied to
each strategy's stated token grid); and the first-token logits equal transformers' own
Qwen2.5-VL decoder run on those embeddings with those positions (one forward, no chunks).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2_5_VLForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies import VideoPrompt, get_strategy
from lvlm_fast.ops import SlowFastConfig
from lvlm_fast.reference.context_content_pool import context_content_pool as ref_ccp
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_dwp
from lvlm_fast.reference.keyframe_select import keyframe_select as ref_kfs
from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_sfp

FRAMES = 13  # 7 temporal patches, the last one padded with a repeat of frame 12
UNITS = 7
H, W = 112, 168  # merged grid 4 x 6
GH, GW = 4, 6
P, Q = 3, 5
FPS = 2.0  # second_per_grid = 1 s -> interval = tokens_per_second (2) per temporal patch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(get_config("tiny-qwen2.5-vl")).eval()
    return LongVideoVLM(model, vision_chunk_frames=4, prefill_chunk_tokens=13)


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(FRAMES, 3, H, W, generator=g)
    pv[6:8] = pv[4:6] + 0.01 * torch.randn(2, 3, H, W, generator=g)  # a repeated patch
    return VideoPrompt(pv, torch.tensor([[7, 8, 252]]), torch.tensor([[253, 5, 6, 7, 9]]),
                       fps=FPS)


@pytest.fixture(scope="module")
def full(vlm, prompt):
    """(units, 4, 6, D): transformers' vision path on every frame at once."""
    with torch.no_grad():
        return vlm.family.encode_all_at_once(prompt.pixel_values)


# --------------------------------------------------------------------------- references
def ref_positions(coords: list[tuple[int, int, int]]) -> torch.Tensor:
    """Qwen2.5-VL's rule, token by token: text 0..P-1; a visual token of unit u at (y, x)
    of its grid -> (P + floor(u * interval), P + y, P + x) with interval = float32(2 * 1.0);
    the question from P + max(GH, GW)."""
    interval = torch.tensor(2.0, dtype=torch.float32) * torch.tensor(2 / FPS,
                                                                      dtype=torch.float32)
    rows = [(i, i, i) for i in range(P)]
    for u, y, x in coords:
        rows.append((P + int((torch.tensor(float(u)) * interval).long()), P + y, P + x))
    start = P + max(GH, GW)
    rows += [(start + i,) * 3 for i in range(Q)]
    return torch.tensor(rows, dtype=torch.int64).T.reshape(3, 1, -1)


def grid_coords(u: int, h: int, w: int) -> list[tuple[int, int, int]]:
    return [(u, y, x) for y in range(h) for x in range(w)]


def hf_first_logits(vlm, prompt, visual, pos):
    """transformers' decoder on [prefix ; visual ; question] with explicit ids."""
    emb = vlm.model.get_input_embeddings()
    x = torch.cat([emb(prompt.prefix_ids), visual, emb(prompt.question_ids)], dim=1)
    with torch.no_grad():
        h = vlm.model.model.language_model(inputs_embeds=x, position_ids=pos).last_hidden_state
        return vlm.model.lm_head(h[:, -1]).float()


def check(vlm, prompt, name, kw, want_visual, coords):
    s = get_strategy(name, **kw)
    out = s.visual_embeds(vlm, prompt)
    got, frames = out
    assert frames in (FRAMES, 2 * FRAMES)
    torch.testing.assert_close(got, want_visual, rtol=1e-5, atol=1e-5)
    pos = ref_positions(coords)
    assert pos.shape[2] == P + got.shape[1] + Q
    plan = vlm.family.position_plan(P, out.blocks, got.shape[1], Q)
    assert torch.equal(plan.chunk(0, plan.total), pos)
    logits = vlm.first_token(prompt, s)
    torch.testing.assert_close(logits, hf_first_logits(vlm, prompt, want_visual, pos),
                               rtol=0, atol=1e-5)
    assert vlm.last_prefill.visual_tokens == got.shape[1]
    return plan


# --------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["vilamp", "vilamp-seed"])
def test_vilamp_keyframes_over_temporal_patches(vlm, prompt, full, name, k):
    """Keyframe selection over temporal patches; keyframes keep their merged 4 x 6 grid,
    other temporal patches one DFM token at (unit time, row 0, column 0)."""
    d = full.shape[-1]
    x = full.reshape(UNITS, GH * GW, d)
    emb = full.mean(dim=(1, 2)).float()
    idx, ref_pos = ref_kfs(emb, emb.mean(0), k, threshold=0.85, min_relevance=None, fill=True)
    tok = ref_dwp(x, torch.zeros(d), x[idx], ref_pos, tau=2.0)
    kf = idx.tolist()
    rows, coords = [], []
    for u in range(UNITS):
        if u in kf:
            rows.append(x[u])
            coords += grid_coords(u, GH, GW)
        else:
            rows.append(tok[u:u + 1])
            coords.append((u, 0, 0))
    want = torch.cat(rows).unsqueeze(0)
    check(vlm, prompt, name, {"num_keyframes": k}, want, coords)


@pytest.mark.parametrize("kw", [{}, {"num_slow": 3, "order": "interleaved"},
                                {"fast_frames": "non_slow", "fast_grid": (2, 3)}])
def test_slowfast_pooled_grid_positions(vlm, prompt, full, kw):
    s = get_strategy("slowfast", **kw)
    sf = s.config.resolved()
    fast = (min(sf.fast_grid[0], GH), min(sf.fast_grid[1], GW))
    slow = SlowFastConfig(**sf.__dict__).slow_index(UNITS)
    want = ref_sfp(full, slow, slow_kernel=sf.slow_kernel, slow_mode=sf.slow_mode,
                   fast_grid=fast, fast_frames=sf.fast_frames, order=sf.order).unsqueeze(0)
    sh, sw = GH // sf.slow_kernel[0], GW // sf.slow_kernel[1]
    slow_l = slow.tolist()
    fast_units = [u for u in range(UNITS) if sf.fast_frames == "all" or u not in slow_l]
    if sf.order == "slow_fast":
        coords = [c for u in slow_l for c in grid_coords(u, sh, sw)]
        coords += [c for u in fast_units for c in grid_coords(u, *fast)]
    else:
        coords = []
        for u in range(UNITS):
            coords += grid_coords(u, sh, sw) if u in slow_l else []
            coords += grid_coords(u, *fast) if u in fast_units else []
    check(vlm, prompt, "slowfast", kw, want, coords)
    assert s.num_tokens(vlm, UNITS, (H, W)) == want.shape[1]


def test_llamavid_content_grid_needs_a_square_grid(vlm, prompt):
    """The op pools a flat patch list: a g x g content grid needs a square frame grid."""
    with pytest.raises(ValueError, match=r"content_grid.*needs.*square"):
        get_strategy("llamavid", content_grid=2).visual_embeds(vlm, prompt)


@pytest.mark.parametrize("g", [1])
def test_llamavid_context_then_content(vlm, prompt, full, g):
    d = full.shape[-1]
    question = vlm.embed_tokens(prompt.question_ids)[0]
    want = ref_ccp(full.reshape(UNITS, -1, d), question, scale=d ** -0.5,
                   content_grid=g).reshape(1, -1, d)
    coords = []
    for u in range(UNITS):
        coords += [(u, 0, 0), *grid_coords(u, g, g)]
    check(vlm, prompt, "llamavid", {"content_grid": g}, want, coords)


def test_uniform_positions_are_the_sampled_video(vlm, prompt, full):
    """uniform (num_frames=6 of 13): the sampled frames grouped into 3 temporal patches at
    the sampled rate (fps * 6 / 13): positions of a 3-patch video at that rate."""
    s = get_strategy("uniform", num_frames=6)
    out = s.visual_embeds(vlm, prompt)
    assert out[0].shape == (1, 3 * GH * GW, full.shape[-1]) and out[1] == 6
    assert out.blocks.fps == pytest.approx(FPS * 6 / 13)
    assert out.blocks.t.tolist() == [0, 1, 2]


def test_separator_needs_a_family_separator(vlm, prompt):
    with pytest.raises(ValueError, match="separator=True needs a separator token"):
        get_strategy("slowfast", separator=True).visual_embeds(vlm, prompt)


def test_vilamp_selector_embeddings_are_per_temporal_patch(vlm, prompt):
    """With a selector (frames -> embeddings), a temporal patch's embedding is the mean
    of its two frames' (the padded last patch: its one frame)."""
    from lvlm_fast.models.strategies.vilamp import unit_embeddings

    e = torch.arange(FRAMES * 2, dtype=torch.float32).view(FRAMES, 2)
    u = unit_embeddings(vlm, e)
    assert u.shape == (UNITS, 2)
    torch.testing.assert_close(u[0], e[0:2].mean(0))
    torch.testing.assert_close(u[-1], e[-1])


@pytest.mark.parametrize("name", ["full", "uniform", "vilamp", "vilamp-seed", "slowfast",
                                  "llamavid", "videoxl"])
def test_every_strategy_runs_on_meta(vlm, prompt, name):
    """The profiler's simulation: the same pipeline on a meta-device model and meta frames
    (vision metadata from the host grid), with the same token counts as the real run."""
    meta = LongVideoVLM.from_config("tiny-qwen2.5-vl", device="meta", vision_chunk_frames=4,
                                    prefill_chunk_tokens=13)
    kw = {"num_frames": 6} if name == "uniform" else {}
    pm = VideoPrompt(torch.empty(FRAMES, 3, H, W, device="meta"),
                     torch.zeros(1, P, dtype=torch.long, device="meta"),
                     torch.ones(1, Q, dtype=torch.long, device="meta"), fps=FPS)
    logits = meta.first_token(pm, name, **kw)
    assert logits.shape == (1, 256) and logits.device.type == "meta"
    vlm.first_token(prompt, name, **kw)
    if name not in ("vilamp", "vilamp-seed"):  # keyframe counts need real selections
        assert meta.last_prefill.visual_tokens == vlm.last_prefill.visual_tokens


def test_qwen2_5_vl_7b_full_on_meta():
    """The shipped 7B config end to end on meta: 448x448 frames -> 16 x 16 = 256 tokens per
    temporal patch."""
    meta = LongVideoVLM.from_config("qwen2.5-vl-7b", device="meta", dtype=torch.bfloat16)
    pm = VideoPrompt(torch.empty(8, 3, 448, 448, device="meta"),
                     torch.zeros(1, 5, dtype=torch.long, device="meta"),
                     torch.ones(1, 9, dtype=torch.long, device="meta"))
    assert meta.first_token(pm).shape == (1, 152064)
    assert meta.last_prefill.visual_tokens == 4 * 256
    assert meta.fused_attention  # head dim 128
