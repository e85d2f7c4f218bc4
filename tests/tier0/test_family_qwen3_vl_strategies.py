"""Every reducing strategy on Qwen3-VL: timestamps, DeepStack and positions.

For each strategy:

* the visual rows ``[main | DeepStack level 0 | level 1]`` equal a recomputation from
  transformers' ``get_video_features`` on every frame at once with the plain-PyTorch specs
  in ``lvlm_fast.reference``, the scores/selections read from the main channels only and the
  SAME selection and pooling weights applied to every DeepStack level;
* the prompt the wrapper feeds (timestamp text between the kept units) equals the
  processor's layout (``Qwen3VLProcessor._calculate_timestamps`` + ``replace_video_token``)
  written for the units the reference kept: each kept unit (or the token standing for it)
  carries its OWN timestamp, dropped units none (the known engine bug is a timestamp /
  token misalignment after pruning);
* positions equal ``get_rope_index`` on that prompt where every unit is one grid, and the
  documented per-block rule otherwise (LLaMA-VID's context + content);
* the first-token logits equal transformers' own Qwen3-VL decoder run in ONE forward on
  those embeddings, positions, ``visual_pos_masks`` and ``deepstack_visual_embeds``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 is on sys.path (rootdir-relative conftest)
    FPS,
    FRAMES,
    UNITS,
    VIDEO,
    D,
    G,
    H,
    P,
    Q,
    W,
    check_strategy,
    make_prompt,
    reference_prompt,
    text_ids,
)
from transformers import Qwen3VLForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies import VideoPrompt, get_strategy
from lvlm_fast.ops import SlowFastConfig
from lvlm_fast.reference.context_content_pool import context_content_pool as ref_ccp
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_dwp
from lvlm_fast.reference.keyframe_select import keyframe_select as ref_kfs
from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_sfp

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(get_config("tiny-qwen3-vl")).eval()
    return LongVideoVLM(model, vision_chunk_frames=4, prefill_chunk_tokens=13)


@pytest.fixture(scope="module")
def prompt():
    return make_prompt()


@pytest.fixture(scope="module")
def full(vlm, prompt):
    """(units, 4, 4, 3 D): transformers' vision path on every frame at once, stacked."""
    with torch.no_grad():
        return vlm.family.encode_all_at_once(prompt.pixel_values)


# --------------------------------------------------------------------------- references
def hf_first_logits(vlm, ids, visual, pos):
    """transformers' Qwen3-VL decoder, one forward: the placeholders replaced by the main
    rows, DeepStack levels added at the visual positions of the first layers."""
    emb = vlm.model.get_input_embeddings()(ids)
    mask = ids == VIDEO
    emb = emb.masked_scatter(mask.unsqueeze(-1), visual[0, :, :D])
    ds = [visual[0, :, D * (i + 1):D * (i + 2)] for i in range(2)]
    with torch.no_grad():
        h = vlm.model.model.language_model(inputs_embeds=emb, position_ids=pos,
                                           visual_pos_masks=mask,
                                           deepstack_visual_embeds=ds).last_hidden_state
        return vlm.model.lm_head(h[:, -1]).float()


def check(vlm, prompt, name, kw, want_visual, runs):
    return check_strategy(vlm, prompt, name, kw, want_visual, runs, width=3 * D,
                          hf_first_logits=hf_first_logits)


def split_levels(x):
    return x[..., :D], x


# --------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["vilamp", "vilamp-seed"])
def test_vilamp_timestamps_and_deepstack(vlm, prompt, full, name, k):
    """Keyframes over temporal units keep their 4 x 4 grid (every level) and their own
    timestamp; each run of consecutive other units is ONE frame of their DFM tokens with
    the run's first unit's timestamp; the DFM weights come from the main channels and pool
    every DeepStack level alike."""
    x = full.reshape(UNITS, G * G, 3 * D)
    xm = x[..., :D]
    emb = xm.mean(dim=1).float()
    idx, ref_pos = ref_kfs(emb, emb.mean(0), k, threshold=0.85, min_relevance=None, fill=True)
    tok = ref_dwp(x, torch.zeros(D), xm[idx], ref_pos, rel=xm, red=xm, tau=2.0)
    # the same weights on each level: level-by-level recomputation agrees
    for lv in range(3):
        sl = slice(lv * D, (lv + 1) * D)
        torch.testing.assert_close(tok[:, sl], ref_dwp(x[..., sl], torch.zeros(D), xm[idx],
                                                       ref_pos, rel=xm, red=xm, tau=2.0))
    kf = idx.tolist()
    rows, runs = [], []
    for u in range(UNITS):
        if u in kf:
            rows.append(x[u])
            runs.append((u, [(G, G)]))
        else:
            rows.append(tok[u:u + 1])
            if runs and runs[-1][0] not in kf:  # continue the run of DFM tokens
                runs[-1][1].append((1, 1))
            else:
                runs.append((u, [(1, 1)]))
    assert any(len(b) > 1 for _, b in runs)  # a run of several DFM tokens is tested
    check(vlm, prompt, name, {"num_keyframes": k}, torch.cat(rows).unsqueeze(0), runs)


@pytest.mark.parametrize("kw", [{}, {"num_slow": 3, "order": "interleaved"},
                                {"fast_frames": "non_slow", "fast_grid": (2, 2)}])
def test_slowfast_timestamps_and_deepstack(vlm, prompt, full, kw):
    """Each stream's block of a unit is framed as a frame with that unit's timestamp (a
    slow unit under ``slow_fast`` appears twice: slow grid, later fast grid); the pooling
    (average / per-channel max over the same windows) acts on every level."""
    s = get_strategy("slowfast", **kw)
    sf = s.config.resolved()
    fast = (min(sf.fast_grid[0], G), min(sf.fast_grid[1], G))
    slow = SlowFastConfig(**sf.__dict__).slow_index(UNITS)
    want = ref_sfp(full, slow, slow_kernel=sf.slow_kernel, slow_mode=sf.slow_mode,
                   fast_grid=fast, fast_frames=sf.fast_frames, order=sf.order).unsqueeze(0)
    main = ref_sfp(full[..., :D].contiguous(), slow, slow_kernel=sf.slow_kernel,
                   slow_mode=sf.slow_mode, fast_grid=fast, fast_frames=sf.fast_frames,
                   order=sf.order)
    torch.testing.assert_close(want[0, :, :D], main)  # levels never mix into the main rows
    sh, sw = G // sf.slow_kernel[0], G // sf.slow_kernel[1]
    slow_l = slow.tolist()
    fast_units = [u for u in range(UNITS) if sf.fast_frames == "all" or u not in slow_l]
    if sf.order == "slow_fast":
        runs = [(u, [(sh, sw)]) for u in slow_l] + [(u, [fast]) for u in fast_units]
    else:
        runs = []
        for u in range(UNITS):
            blocks = ([(sh, sw)] if u in slow_l else []) + ([fast] if u in fast_units else [])
            if blocks:
                runs.append((u, blocks))
    check(vlm, prompt, "slowfast", kw, want, runs)


@pytest.mark.parametrize("g", [1, 2])
def test_llamavid_timestamps_and_deepstack(vlm, prompt, full, g):
    """Context (1 x 1) + content (g x g) of a unit in ONE frame with the unit's timestamp,
    each block at the running position; attention keys are the main channels, the same
    attention weights and content bins pool every level."""
    x = full.reshape(UNITS, -1, 3 * D)
    question = vlm.embed_tokens(prompt.question_ids)[0]
    want = ref_ccp(x, question, x[..., :D], scale=D ** -0.5,
                   content_grid=g).reshape(1, -1, 3 * D)
    runs = [(u, [(1, 1), (g, g)]) for u in range(UNITS)]
    check(vlm, prompt, "llamavid", {"content_grid": g}, want, runs)


def test_uniform_timestamps_are_the_sampled_video(vlm, prompt):
    """uniform (6 of 13 frames): the sampled frames' video at the sampled rate, each of its
    3 units with its own timestamp, == ``full`` on that video."""
    s = get_strategy("uniform", num_frames=6)
    out = s.visual_embeds(vlm, prompt)
    idx = torch.linspace(0, FRAMES - 1, 6, dtype=torch.float64).round().long()
    sampled = VideoPrompt(prompt.pixel_values[idx], prompt.prefix_ids, prompt.question_ids,
                          fps=FPS * 6 / FRAMES, text_ids=text_ids)
    with torch.no_grad():
        want = vlm.family.encode_all_at_once(sampled.pixel_values).reshape(1, -1, 3 * D)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    ids, pos = reference_prompt(sampled, [(u, [(G, G)]) for u in range(3)], 6, FPS * 6 / 13)
    torch.testing.assert_close(vlm.first_token(prompt, s),
                               hf_first_logits(vlm, ids, want, pos), rtol=0, atol=1e-5)


def test_full_timestamps_and_deepstack(vlm, prompt, full):
    check(vlm, prompt, "full", {}, full.reshape(1, -1, 3 * D),
          [(u, [(G, G)]) for u in range(UNITS)])


@pytest.mark.parametrize("name", ["full", "uniform", "vilamp", "vilamp-seed", "slowfast",
                                  "llamavid", "videoxl"])
def test_every_strategy_runs_on_meta(vlm, prompt, name):
    """The profiler's simulation: the same pipeline on a meta-device Qwen3-VL (vision
    metadata from the host grid, no tokenizer: nominal timestamp token counts), with the
    real run's token counts wherever the blocks are host values (every strategy but
    ViLAMP's device-side keyframes, whose count is exact all the same)."""
    meta = LongVideoVLM.from_config("tiny-qwen3-vl", device="meta", vision_chunk_frames=4,
                                    prefill_chunk_tokens=13)
    kw = {"num_frames": 6} if name == "uniform" else {}
    pm = VideoPrompt(torch.empty(FRAMES, 3, H, W, device="meta"),
                     torch.zeros(1, P, dtype=torch.long, device="meta"),
                     torch.ones(1, Q, dtype=torch.long, device="meta"), fps=FPS,
                     text_ids=text_ids)
    logits = meta.first_token(pm, name, **kw)
    assert logits.shape == (1, 256) and logits.device.type == "meta"
    vlm.first_token(prompt, name, **kw)
    assert meta.last_prefill.visual_tokens == vlm.last_prefill.visual_tokens
    # timestamps too (ViLAMP: default 32 keyframes >= 7 units, so the nominal keyframes
    # on meta are the real ones)
    assert meta.last_prefill.llm_tokens == vlm.last_prefill.llm_tokens
    # without a tokenizer (the profiler): Qwen's token count for each timestamp
    pm.text_ids = None
    meta.first_token(pm, name, **kw)
    assert meta.last_prefill.visual_tokens <= vlm.last_prefill.visual_tokens
    assert meta.last_prefill.llm_tokens < vlm.last_prefill.llm_tokens  # "<0.5 seconds>": 6


def test_blocks_keep_host_values(vlm, prompt):
    """Blocks built from host values carry them (no device read for the timestamps)."""
    from lvlm_fast.models.families import TokenBlocks

    b = TokenBlocks.per_unit([TokenBlocks.grid(3, 1, 1), TokenBlocks.grid(3, 2, 2)])
    assert b.host == ([0, 0, 1, 1, 2, 2], [1, 2, 1, 2, 1, 2], [1, 2, 1, 2, 1, 2])
    assert b.t.tolist() == b.host[0] and b.h.tolist() == b.host[1]
    c = TokenBlocks.cat([b, TokenBlocks.grid(torch.tensor([4]), 1, 1)])
    assert c.host is None  # a device-valued part: read once when needed
    out = get_strategy("slowfast").visual_embeds(vlm, prompt)
    assert out.blocks.host[0] == out.blocks.t.tolist()
