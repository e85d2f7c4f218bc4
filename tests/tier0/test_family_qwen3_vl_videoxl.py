"""``videoxl`` on Qwen3-VL (interleaved M-RoPE, timestamps, DeepStack): logical positions
kept, summaries moved unrotated.

Plain-PyTorch reference written from the method facts (a summary token after every
``ratio`` raw tokens of the video stream, windows of ``window`` raw tokens, each window's
raw KV rows dropped after it, its summaries kept) and Qwen3-VL's prompt: the raw stream is
the video segment as the processor writes it (``<t seconds><|vision_start|> tokens
<|vision_end|>`` per unit, timestamps from transformers' ``_calculate_timestamps``), every
token at its sequential M-RoPE position (a summary at the position of the raw token before
it), DeepStack levels added at the visual tokens only. The whole interleaved stream runs
ONCE through transformers' Qwen3-VL decoder under the eviction mask (a token sees the
prefix, its own window and earlier windows' summaries; question and answer see the prefix,
every summary and themselves). Interleaving is inside transformers' rotary embedding, so
keeping positions (no key ever re-rotated) is exact for any section layout.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import fixed_text_prompt, text_ids, videoxl_mask  # tests/tier0 is on sys.path
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies import VideoPrompt
from lvlm_fast.models.strategies.videoxl import DecoderView, _summary_vector

START, END = 252, 253
H, W = 64, 96  # merged grid 2 x 3
GH, GW = 2, 3
D = 128

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(get_config("tiny-qwen3-vl")).eval()


def _prompt(frames: int, fps: float | None) -> VideoPrompt:
    return fixed_text_prompt(frames, (H, W), fps, text_ids=text_ids)


def reference(vlm: LongVideoVLM, pr: VideoPrompt, ratio: int, window: int, evict: bool,
              steps: int) -> tuple[torch.Tensor, list[int], int]:
    """First-token logits, greedy tokens and the raw stream length of the reference."""
    model = vlm.model
    emb = model.get_input_embeddings()
    vst = _summary_vector(vlm, DecoderView(vlm), None)
    with torch.no_grad():
        feats = vlm.family.encode_all_at_once(pr.pixel_values)  # (units, 2, 3, 3 D)
    units, frames = feats.shape[0], pr.pixel_values.shape[0]
    ts = Qwen3VLProcessor._calculate_timestamps(
        None, list(range(frames)), 24 if pr.fps is None else pr.fps, 2)
    # token table: embedding, deepstack rows or None, position, kind (0 text 1 raw
    # 2 summary), window
    toks, ds, pos, kind, win = [], [], [], [], []
    cur = 0

    def add(tok, levels, at, k, w):
        toks.append(tok)
        ds.append(levels)
        pos.append(at)
        kind.append(k)
        win.append(w)

    for i in range(pr.prefix_ids.shape[1]):
        add(emb(pr.prefix_ids[:, i])[0], None, (cur,) * 3, 0, -1)
        cur += 1
    raw = 0

    def add_raw(tok, levels, at):
        nonlocal raw
        add(tok, levels, at, 1, raw // window)
        raw += 1
        if raw % ratio == 0:  # a summary after every ratio-th raw token, same position
            add(vst, None, at, 2, (raw - 1) // window)

    for u in range(units):
        for t in [*text_ids(f"<{ts[u]:.1f} seconds>"), START]:
            add_raw(emb(torch.tensor([t]))[0], None, (cur,) * 3)
            cur += 1
        for y in range(GH):
            for x in range(GW):
                f = feats[u, y, x]
                add_raw(f[:D], f[D:].view(2, D), (cur, cur + y, cur + x))
        cur += max(GH, GW)
        add_raw(emb(torch.tensor([END]))[0], None, (cur,) * 3)
        cur += 1
    for i in range(pr.question_ids.shape[1]):
        add(emb(pr.question_ids[:, i])[0], None, (cur,) * 3, 0, 10**9)
        cur += 1
    generated: list[int] = []
    for s in range(steps):
        n = len(toks)
        mask = videoxl_mask(kind, win, evict)
        x = torch.stack(toks).unsqueeze(0)
        ids = torch.tensor(pos, dtype=torch.int64).T.reshape(3, 1, n)
        vis = torch.tensor([d is not None for d in ds]).view(1, n)
        levels = torch.stack([d for d in ds if d is not None])  # (n_vis, 2, D)
        with torch.no_grad():
            h = model.model.language_model(
                inputs_embeds=x, position_ids=ids, visual_pos_masks=vis,
                deepstack_visual_embeds=[levels[:, 0], levels[:, 1]],
                attention_mask=mask.view(1, 1, n, n)).last_hidden_state
            logits = model.lm_head(h[:, -1]).float()
        if s == 0:
            first = logits
        tok = int(logits.argmax(-1))
        generated.append(tok)
        add(emb(torch.tensor([tok]))[0], None, (cur + s,) * 3, 0, 10**9)
    return first, generated, raw


@pytest.mark.parametrize("frames,ratio,window,fps", [(6, 8, 30, None), (5, 5, 24, 2.0),
                                                      (4, 7, 100, 0.5)])
@pytest.mark.parametrize("evict", [True, False])
def test_videoxl_equals_reference(model, frames, ratio, window, fps, evict):
    """Windows cut through timestamps, frames and DeepStack rows; positions kept."""
    vlm = LongVideoVLM(model, "videoxl", ratio=ratio, window=window, evict=evict,
                       vision_chunk_frames=4)
    pr = _prompt(frames, fps)
    want_logits, want_tokens, n_raw = reference(vlm, pr, ratio, window, evict, steps=4)
    torch.testing.assert_close(vlm.first_token(pr), want_logits, rtol=0, atol=1e-5)
    got = vlm.generate(pr, max_new_tokens=4)
    assert got[0].tolist() == want_tokens
    res = vlm.last_prefill
    assert res.visual_tokens == n_raw + n_raw // ratio
    if evict:  # sink + kept summaries only
        assert vlm.strategy.rows_after_video == 3 + n_raw // ratio
