"""Every strategy on Qwen3.5: Qwen3-VL's semantics through the family layer (timestamps of
the kept units, per-block positions; no DeepStack), on the hybrid decoder.

For each strategy:

* the visual rows equal a recomputation from transformers' ``get_video_features`` on every
  frame at once with the plain-PyTorch specs in ``lvlm_fast.reference``;
* the prompt the wrapper feeds (timestamp text between the kept units) equals the
  processor's layout (``Qwen3VLProcessor._calculate_timestamps`` + ``replace_video_token``,
  the processor transformers maps ``qwen3_5`` to) written for the units the reference kept;
* positions equal ``Qwen3_5Model.get_rope_index`` on that prompt where every unit is one
  grid, and the documented per-block rule otherwise;
* the first-token logits equal transformers' own Qwen3.5 decoder run in ONE forward over
  the whole prompt (linear-attention layers included), while the wrapper ran it in
  non-dividing prefill chunks through the hybrid preallocated cache;

``videoxl`` on Qwen3.5: ``test_family_qwen3_5_videoxl.py``.
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
    check_strategy,
    make_prompt,
    reference_prompt,
    text_ids,
)
from transformers import Qwen3_5ForConditionalGeneration

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
    model = Qwen3_5ForConditionalGeneration(get_config("tiny-qwen3.5")).eval()
    return LongVideoVLM(model, vision_chunk_frames=4, prefill_chunk_tokens=13)


@pytest.fixture(scope="module")
def prompt():
    return make_prompt()


@pytest.fixture(scope="module")
def full(vlm, prompt):
    """(units, 4, 4, D): transformers' vision path on every frame at once."""
    with torch.no_grad():
        return vlm.family.encode_all_at_once(prompt.pixel_values)


# --------------------------------------------------------------------------- references
def hf_first_logits(vlm, ids, visual, pos):
    """transformers' Qwen3.5 decoder, one forward over the whole prompt."""
    emb = vlm.model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == VIDEO).unsqueeze(-1), visual[0])
    with torch.no_grad():
        h = vlm.model.model.language_model(inputs_embeds=emb,
                                           position_ids=pos).last_hidden_state
        return vlm.model.lm_head(h[:, -1]).float()


def check(vlm, prompt, name, kw, want_visual, runs):
    return check_strategy(vlm, prompt, name, kw, want_visual, runs, width=D,
                          hf_first_logits=hf_first_logits)


# --------------------------------------------------------------------------- strategies
def test_full(vlm, prompt, full):
    check(vlm, prompt, "full", {}, full.reshape(1, -1, D),
          [(u, [(G, G)]) for u in range(UNITS)])


@pytest.mark.parametrize("name", ["vilamp", "vilamp-seed"])
def test_vilamp(vlm, prompt, full, name):
    """Keyframes over temporal units keep their grid and timestamp; each run of consecutive
    other units is ONE frame of their DFM tokens with the run's first unit's timestamp
    (the Qwen3-VL family's ViLAMP framing)."""
    k = 2
    x = full.reshape(UNITS, G * G, D)
    emb = x.mean(dim=1).float()
    idx, ref_pos = ref_kfs(emb, emb.mean(0), k, threshold=0.85, min_relevance=None, fill=True)
    tok = ref_dwp(x, torch.zeros(D), x[idx], ref_pos, rel=x, red=x, tau=2.0)
    kf = idx.tolist()
    rows, runs = [], []
    for u in range(UNITS):
        rows.append(x[u] if u in kf else tok[u : u + 1])
        if u not in kf and runs and runs[-1][0] not in kf:  # continue a run of DFM tokens
            runs[-1][1].append((1, 1))
        else:
            runs.append((u, [(G, G)] if u in kf else [(1, 1)]))
    check(vlm, prompt, name, {"num_keyframes": k}, torch.cat(rows).unsqueeze(0), runs)


@pytest.mark.parametrize("kw", [{}, {"num_slow": 3, "order": "interleaved"}])
def test_slowfast(vlm, prompt, full, kw):
    s = get_strategy("slowfast", **kw)
    sf = s.config.resolved()
    fast = (min(sf.fast_grid[0], G), min(sf.fast_grid[1], G))
    slow = SlowFastConfig(**sf.__dict__).slow_index(UNITS)
    want = ref_sfp(full, slow, slow_kernel=sf.slow_kernel, slow_mode=sf.slow_mode,
                   fast_grid=fast, fast_frames=sf.fast_frames, order=sf.order).unsqueeze(0)
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


def test_llamavid(vlm, prompt, full):
    x = full.reshape(UNITS, -1, D)
    question = vlm.embed_tokens(prompt.question_ids)[0]
    want = ref_ccp(x, question, x, scale=D ** -0.5, content_grid=2).reshape(1, -1, D)
    check(vlm, prompt, "llamavid", {"content_grid": 2}, want,
          [(u, [(1, 1), (2, 2)]) for u in range(UNITS)])


def test_uniform(vlm, prompt):
    """uniform (6 of 13 frames) == ``full`` on the sampled video at the sampled rate."""
    s = get_strategy("uniform", num_frames=6)
    out = s.visual_embeds(vlm, prompt)
    idx = torch.linspace(0, FRAMES - 1, 6, dtype=torch.float64).round().long()
    sampled = VideoPrompt(prompt.pixel_values[idx], prompt.prefix_ids, prompt.question_ids,
                          fps=FPS * 6 / FRAMES, text_ids=text_ids)
    with torch.no_grad():
        want = vlm.family.encode_all_at_once(sampled.pixel_values).reshape(1, -1, D)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    ids, pos = reference_prompt(sampled, [(u, [(G, G)]) for u in range(3)], 6, FPS * 6 / 13)
    torch.testing.assert_close(vlm.first_token(prompt, s),
                               hf_first_logits(vlm, ids, want, pos), rtol=0, atol=1e-5)
