"""``videoxl`` + ``kv_budget`` on the M-RoPE families (Qwen2.5-VL blocked, Qwen3-VL
interleaved, Qwen3.5 interleaved + partial rotary + linear-attention layers).

Rule (``lvlm_fast.models.strategies.videoxl`` module doc): after each window the sink +
summaries are compacted to ``kv_budget`` rows per full-attention layer by VaN, the kept
rows moved WITHOUT re-rotation, so every kept row keeps its logical (``full``) position and
the question / answer keep theirs. Checked here:

* a budget covering sink + every summary == ``videoxl`` without a budget, exactly (that run
  equals the masked whole-stream reference: ``test_family_*_videoxl.py``);
* a smaller budget: every compaction == the reference ``kv_compact`` (VaN, sink protected)
  with all-zero rotation frequencies applied to the same rows (kept rows bit-identical to
  the old ones, in time order), the question's position ids == those without a budget, the
  rows after the video == the budget, the linear-attention states (Qwen3.5) never touched
  by a compaction.

Not checked against a whole-stream masked reference for the smaller budget: the kept
summaries differ per layer and KV head, which one attention mask through transformers'
decoder cannot express."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import text_ids  # tests/tier0 is on sys.path

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.reference.kv_compact import kv_compact as ref_compact

CONFIGS = {"qwen2_5_vl": ("tiny-qwen2.5-vl", (56, 84)), "qwen3_vl": ("tiny-qwen3-vl", (64, 96)),
           "qwen3_5": ("tiny-qwen3.5", (64, 96))}
KW = dict(ratio=2, window=12)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fam(request):
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration,
           "qwen3_5": Qwen3_5ForConditionalGeneration}[request.param]
    torch.manual_seed(0)
    name, hw = CONFIGS[request.param]
    return cls(get_config(name)).eval(), hw


def _prompt(hw, frames: int = 8, seed: int = 0) -> VideoPrompt:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.cat([torch.randint(3, 250, (1, 2), generator=g), torch.tensor([[252]])], 1)
    question = torch.cat([torch.tensor([[253]]), torch.randint(3, 250, (1, 4), generator=g)],
                         1)
    return VideoPrompt(torch.randn(frames, 3, *hw, generator=g), prefix, question, fps=2.0,
                       text_ids=text_ids)


def _question_ids(vlm, pr):
    """First-token logits and the position ids of the prefill's last decoder call (the
    question)."""
    seen = []
    orig = vlm.run_llm

    def run(x, cache, position_ids=None, **kw):
        seen.append(position_ids)
        return orig(x, cache, position_ids, **kw)

    vlm.run_llm = run
    try:
        logits = vlm.first_token(pr)
    finally:
        del vlm.run_llm
    return logits, seen[-1]


def test_budget_covering_every_summary_equals_no_budget(fam):
    model, hw = fam
    pr = _prompt(hw)
    plain = LongVideoVLM(model, "videoxl", **KW)
    want, want_pos = _question_ids(plain, pr)
    want_tokens = plain.generate(pr, 3)
    rows = plain.strategy.rows_after_video  # sink + every summary
    big = LongVideoVLM(model, "videoxl", kv_budget=rows, **KW)
    got, pos = _question_ids(big, pr)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(pos, want_pos)
    assert torch.equal(big.generate(pr, 3), want_tokens)


def test_smaller_budget_moves_summaries_unrotated_logical_positions(fam, monkeypatch):
    from lvlm_fast.models.strategies import videoxl as vx

    model, hw = fam
    pr = _prompt(hw, frames=10, seed=1)
    plain = LongVideoVLM(model, "videoxl", **KW)
    _, want_pos = _question_ids(plain, pr)
    budget = 9
    calls = []
    orig = vx.compact_per_layer

    def spy(cache, b, *, prefix, inv_freq):
        n = cache.get_seq_length()
        key = torch.stack([la.key_buffer for la in cache.kv_layers]).clone()
        value = torch.stack([la.value_buffer for la in cache.kv_layers]).clone()
        states = [(la.conv_states[0].clone(), la.recurrent_states[0].clone())
                  for la in cache.state_layers]
        new = orig(cache, b, prefix=prefix, inv_freq=inv_freq)
        calls.append((n, new, prefix, inv_freq, key, value, states))
        for la, (c0, r0) in zip(cache.state_layers, states, strict=True):
            assert torch.equal(la.conv_states[0], c0) and torch.equal(la.recurrent_states[0], r0)
        got_k = torch.stack([la.key_buffer[:, :, :new] for la in cache.kv_layers]).clone()
        got_v = torch.stack([la.value_buffer[:, :, :new] for la in cache.kv_layers]).clone()
        calls[-1] = (*calls[-1][:7], got_k, got_v)
        return new

    monkeypatch.setattr(vx, "compact_per_layer", spy)
    vlm = LongVideoVLM(model, "videoxl", kv_budget=budget, **KW)
    logits, pos = _question_ids(vlm, pr)
    assert torch.isfinite(logits).all()
    assert torch.equal(pos, want_pos)  # the question keeps its logical (full) positions
    assert vlm.strategy.rows_after_video == budget < plain.strategy.rows_after_video
    assert vlm.last_prefill.cache.capacity < plain.last_prefill.cache.capacity
    done = 0
    d = calls[0][4].shape[-1]  # head dim of the cached keys
    for n, new, prefix, inv_freq, key, value, _, got_k, got_v in calls:
        assert inv_freq is None  # M-RoPE: logical positions, no re-rotation
        if n <= budget:
            assert new == n
            continue
        done += 1
        kr, vr = key.clone(), value.clone()
        rn, keep, _ = ref_compact(kr, vr, n, torch.zeros(d // 2), budget=budget,
                                  prefix=prefix)  # zero frequencies: rows move unrotated
        assert new == rn == budget
        assert torch.equal(got_k, kr[:, :, :, :budget]) and torch.equal(got_v, vr[:, :, :, :budget])
        for li in range(keep.shape[0]):
            for h in range(keep.shape[2]):
                src = keep[li, 0, h].nonzero()[:, 0]
                assert torch.equal(got_k[li, 0, h], key[li, 0, h, src])  # bit-identical
    assert done >= 2
    assert vlm.generate(pr, 3).shape == (1, 3)
