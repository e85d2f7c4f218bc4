"""``videoxl`` on Qwen2.5-VL (M-RoPE): logical positions kept, summaries moved unrotated.

The reference is written from the method facts (shared/methods/videoxl.md: a summary
token after every ``ratio`` raw visual tokens of the stream, windows of ``window`` raw
tokens, after each window its raw KV rows are dropped and its summaries kept) and from
Qwen2.5-VL's position rule, in plain PyTorch: the whole interleaved stream is built token
by token with its positions (raw tokens: their ``full`` M-RoPE position; a summary: the
position of the raw token right before it) and run ONCE through transformers' Qwen2.5-VL
decoder under the eviction mask (a token sees the prefix, its own window and earlier
windows' summaries; the question and answer see the prefix, every summary and
themselves). Greedy decoding continues at ``max(prompt positions) + 1``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import fixed_text_prompt, videoxl_mask  # tests/tier0 is on sys.path
from transformers import Qwen2_5_VLForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies import VideoPrompt
from lvlm_fast.models.strategies.videoxl import DecoderView, _summary_vector

H, W = 112, 168  # merged grid 4 x 6
GH, GW = 4, 6

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(get_config("tiny-qwen2.5-vl")).eval()


def _prompt(frames: int, fps: float | None) -> VideoPrompt:
    return fixed_text_prompt(frames, (H, W), fps)


def reference(vlm: LongVideoVLM, pr: VideoPrompt, ratio: int, window: int, evict: bool,
              steps: int) -> tuple[torch.Tensor, list[int]]:
    """First-token logits and greedy tokens of the plain-PyTorch Video-XL reference."""
    model = vlm.model
    emb = model.get_input_embeddings()
    vst = _summary_vector(vlm, DecoderView(vlm), None)
    with torch.no_grad():
        feats = vlm.family.encode_all_at_once(pr.pixel_values)  # (units, 4, 6, D)
    units = feats.shape[0]
    raw = feats.reshape(-1, feats.shape[-1])
    p, q = pr.prefix_ids.shape[1], pr.question_ids.shape[1]
    interval = torch.tensor(2.0) * torch.tensor(1.0 if pr.fps is None else 2 / pr.fps)
    # token table: (embedding, (t, h, w), kind, window); kind 0 text 1 raw 2 summary
    toks, pos, kind, win = [], [], [], []

    def add(tok, at, k, w):
        toks.append(tok)
        pos.append(at)
        kind.append(k)
        win.append(w)

    for i in range(p):
        add(emb(pr.prefix_ids[:, i])[0], (i, i, i), 0, -1)
    for r in range(raw.shape[0]):
        u, y, x = r // (GH * GW), (r % (GH * GW)) // GW, r % GW
        rp = (p + int((torch.tensor(float(u)) * interval).long()), p + y, p + x)
        add(raw[r], rp, 1, r // window)
        if (r + 1) % ratio == 0:  # a summary after every ratio-th raw token
            add(vst, rp, 2, r // window)
    start = p + max(GH, GW)
    for i in range(q):
        add(emb(pr.question_ids[:, i])[0], (start + i,) * 3, 0, 10**9)
    assert units * GH * GW == raw.shape[0]
    generated: list[int] = []
    next_pos = max(max(r) for r in pos) + 1
    for s in range(steps):
        n = len(toks)
        mask = videoxl_mask(kind, win, evict)
        x = torch.stack(toks).unsqueeze(0)
        ids = torch.tensor(pos, dtype=torch.int64).T.reshape(3, 1, n)
        with torch.no_grad():
            h = model.model.language_model(
                inputs_embeds=x, position_ids=ids,
                attention_mask={"full_attention": mask.view(1, 1, n, n)}).last_hidden_state
            logits = model.lm_head(h[:, -1]).float()
        if s == 0:
            first = logits
        tok = int(logits.argmax(-1))
        generated.append(tok)
        add(emb(torch.tensor([tok]))[0], (next_pos + s,) * 3, 0, 10**9)
    return first, generated


@pytest.mark.parametrize("frames,ratio,window,fps", [(6, 8, 30, None), (10, 5, 24, 2.0),
                                                      (4, 7, 100, 0.5)])
@pytest.mark.parametrize("evict", [True, False])
def test_videoxl_equals_reference(model, frames, ratio, window, fps, evict):
    vlm = LongVideoVLM(model, "videoxl", ratio=ratio, window=window, evict=evict,
                       vision_chunk_frames=4)
    pr = _prompt(frames, fps)
    want_logits, want_tokens = reference(vlm, pr, ratio, window, evict, steps=4)
    torch.testing.assert_close(vlm.first_token(pr), want_logits, rtol=0, atol=1e-5)
    got = vlm.generate(pr, max_new_tokens=4)
    assert got[0].tolist() == want_tokens
    res = vlm.last_prefill
    n_vis = frames // 2 * GH * GW
    assert res.visual_tokens == n_vis + n_vis // ratio
    if evict:  # sink + kept summaries only
        assert vlm.strategy.rows_after_video == 3 + n_vis // ratio


def test_summary_cache_refuses_1d_rerotation_of_mrope(model):
    """Without the family's choice (inv_freq), an M-RoPE decoder is a clear error."""
    from lvlm_fast.cache import SummaryKVCache

    vlm = LongVideoVLM(model)
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        SummaryKVCache.for_model(DecoderView(vlm), prefix=3, num_visual=48, ratio=8,
                                 window=24, tail=4)
