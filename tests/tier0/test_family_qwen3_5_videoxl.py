"""``videoxl`` on Qwen3.5 (hybrid decoder): eviction acts on the full-attention layers only.

The reference is plain PyTorch: the interleaved stream (prefix; the timestamped video
segment as the processor lays it out, a summary token after every ``ratio``-th token of it,
at the position of the token before it; question) run ONCE through transformers' Qwen3.5
decoder with the eviction mask on the full-attention layers (a token sees the prefix, its
own window and earlier windows' summaries) and NO mask on the linear-attention layers:
their recurrent state has absorbed every token, raw and summary, and is never evicted.
Greedy decoding continues at ``max(prompt positions) + 1``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import test_family_qwen3_5_strategies as base  # same directory (pytest's rootdir import)
from family_helpers import (  # tests/tier0 is on sys.path
    UNITS,
    VIDEO,
    D,
    G,
    P,
    Q,
    reference_prompt,
    videoxl_mask,
)

from lvlm_fast.models.strategies import get_strategy
from lvlm_fast.models.strategies.videoxl import DecoderView, _summary_vector

# the same module-scoped fixtures (tiny Qwen3.5 wrapper, 13-frame prompt, all-frames features)
vlm, prompt, full = base.vlm, base.prompt, base.full

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


def videoxl_reference(vlm, prompt, full, ratio, window, evict, steps):
    """(first-token logits, greedy tokens) of the masked whole-stream reference."""
    model = vlm.model
    emb = model.get_input_embeddings()
    vst = _summary_vector(vlm, DecoderView(vlm), None)
    ids, pos = reference_prompt(prompt, [(u, [(G, G)]) for u in range(UNITS)])
    n_stream = ids.shape[1] - P - Q
    rows = full.reshape(-1, D)
    toks, at, kind, win = [], [], [], []
    vi = 0
    for i in range(ids.shape[1]):
        if ids[0, i] == VIDEO:
            x = rows[vi]
            vi += 1
        else:
            x = emb(ids[:, i])[0]
        r = i - P  # index in the raw stream (timestamps included)
        if r < 0:
            k, w = 0, -1
        elif r < n_stream:
            k, w = 1, r // window
        else:
            k, w = 0, 10**9
        toks.append(x)
        at.append(pos[:, 0, i].tolist())
        kind.append(k)
        win.append(w)
        if 0 <= r < n_stream and (r + 1) % ratio == 0:  # a summary after every ratio-th
            toks.append(vst)
            at.append(pos[:, 0, i].tolist())  # the position of the token before it
            kind.append(2)
            win.append(r // window)
    nxt = max(max(p) for p in at) + 1
    tokens = []
    for s in range(steps):
        m = len(toks)
        mask = videoxl_mask(kind, win, evict)
        with torch.no_grad():
            h = model.model.language_model(
                inputs_embeds=torch.stack(toks).unsqueeze(0),
                position_ids=torch.tensor(at).T.reshape(3, 1, m),
                attention_mask={"full_attention": mask.view(1, 1, m, m),
                                "linear_attention": None}).last_hidden_state
            lg = model.lm_head(h[:, -1]).float()
        if s == 0:
            first = lg
        tokens.append(int(lg.argmax()))
        toks.append(emb(torch.tensor([tokens[-1]]))[0])
        at.append([nxt + s] * 3)
        kind.append(0)
        win.append(10**9)
    return first, tokens, n_stream


@pytest.mark.parametrize("ratio,window", [(8, 40), (5, 1000)])
@pytest.mark.parametrize("evict", [True, False])
def test_videoxl(vlm, prompt, full, ratio, window, evict):
    want_first, want_tokens, n_stream = videoxl_reference(vlm, prompt, full, ratio, window,
                                                          evict, steps=3)
    s = get_strategy("videoxl", ratio=ratio, window=window, evict=evict)
    torch.testing.assert_close(vlm.first_token(prompt, s), want_first, rtol=0, atol=1e-5)
    assert vlm.generate(prompt, max_new_tokens=3, strategy=s)[0].tolist() == want_tokens
    cache = vlm.last_prefill.cache
    kept = n_stream // ratio
    rows = P + (kept if evict else n_stream + kept) + Q + 2
    assert [la.length for la in cache.kv_layers] == [rows, rows]  # full-attention only
    assert len(cache.state_layers) == 2
