"""Tier 0: SummaryKVCache + summary projections + window driver on tiny random Qwen2 and
Llama decoders (built from configs, no downloads), fp32.

* eviction off: logits and greedy tokens equal a plain transformers forward of the same
  token sequence (prefix, windows with summary tokens, question, answer);
* eviction on: logits and tokens equal the straightforward reference of the released loop
  (pre-RoPE cache, concatenated and re-rotated every call) for r = 2, 4, 8, 16, windows
  that do not divide the video, carried remainders, distinct summary projections;
* cache bytes after the video = (sink + summaries) rows exactly;
* layout helpers, SummaryLinear row selection, bad input with nothing half-written."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lvlm_fast.cache import SummaryKVCache
from lvlm_fast.models.videoxl_driver import interleave, run_videoxl
from lvlm_fast.nn.summary_proj import (
    SummaryEmbedding,
    SummaryLayout,
    SummaryLinear,
    install_summary_projections,
    summary_weights,
)
from lvlm_fast.reference.videoxl import raw_slots, summary_slots, videoxl_reference

HIDDEN, VOCAB = 128, 97


def _model(kind: str, heads: int = 2, kv: int = 1, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=4096, head_dim=64)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _inputs(n_vis: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, VOCAB, (1, 6), generator=g)
    question = torch.randint(0, VOCAB, (1, 5), generator=g)
    visual = torch.randn(1, n_vis, HIDDEN, generator=g)
    emb = SummaryEmbedding(HIDDEN, torch.randn(HIDDEN, generator=g))
    return prefix, visual, question, emb


def _perturb_summary_projections(model, seed=3):
    install_summary_projections(model, share_base=False)  # own copies: perturbable
    g = torch.Generator().manual_seed(seed)
    for layer in summary_weights(model):
        for lin in layer.values():
            lin.weight.data += 0.1 * torch.randn(lin.weight.shape, generator=g)
            if lin.bias is not None:
                lin.bias.data += 0.1 * torch.randn(lin.bias.shape, generator=g)


def _plain_sequence(model, prefix, visual, question, emb, ratio, window):
    embed = model.get_input_embeddings()
    parts, carry = [embed(prefix)], 0
    for s in range(0, visual.shape[1], window):
        raw = visual[:, s : s + window]
        parts.append(interleave(raw, emb.weight, ratio, carry))
        carry = (raw.shape[1] + carry) % ratio
    parts.append(embed(question))
    return torch.cat(parts, 1)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize(("ratio", "window", "n_vis"), [(4, 20, 45), (16, 40, 100)])
@torch.no_grad()
def test_no_eviction_equals_plain_transformers(kind, ratio, window, n_vis):
    model = _model(kind)
    prefix, visual, question, emb = _inputs(n_vis)
    steps = 4
    out = run_videoxl(model, prefix, visual, question, ratio=ratio, window=window,
                      max_new_tokens=steps, summary_embed=emb, evict=False)
    assert model.config._attn_implementation == "sdpa"  # restored
    x = _plain_sequence(model, prefix, visual, question, emb, ratio, window)
    embed = model.get_input_embeddings()
    for t in range(steps):
        logits = model(inputs_embeds=x).logits[0, -1].float()
        torch.testing.assert_close(out.logits[t], logits, atol=2e-5, rtol=2e-5)
        assert int(out.tokens[t]) == int(logits.argmax())
        x = torch.cat([x, embed(out.tokens[t].view(1, 1))], 1)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize(("ratio", "window", "n_vis"), [
    (2, 17, 50), (4, 20, 45), (8, 30, 100), (16, 40, 150), (16, 64, 64),
])  # fmt: skip
@torch.no_grad()
def test_eviction_equals_released_reference(kind, ratio, window, n_vis):
    model = _model(kind, heads=4, kv=2)
    _perturb_summary_projections(model)
    prefix, visual, question, emb = _inputs(n_vis)
    steps = 4
    out = run_videoxl(model, prefix, visual, question, ratio=ratio, window=window,
                      max_new_tokens=steps, summary_embed=emb)
    logits, tokens = videoxl_reference(model, summary_weights(model), emb.weight, prefix,
                                       visual, question, ratio=ratio, window=window,
                                       max_new_tokens=steps)
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.tokens, tokens)
    # the summaries really matter: a different ratio gives different logits
    other = run_videoxl(model, prefix, visual, question, ratio=ratio + 1, window=window,
                        max_new_tokens=1, summary_embed=emb)
    assert not torch.allclose(other.logits[0], out.logits[0], atol=1e-4)


@torch.no_grad()
def test_carry_crosses_windows_and_cache_bytes_exact():
    model = _model("qwen2", heads=4, kv=2)
    prefix, visual, question, emb = _inputs(75)
    ratio, window = 8, 20  # windows 20,20,20,15: carries 4, 0, 4, 3 -> 9 summaries
    seen = []
    cache = SummaryKVCache.for_model(model, prefix=6, num_visual=75, ratio=ratio,
                                     window=window, tail=5)

    def after_window(i):
        seen.append((cache.get_seq_length(), cache.carry))

    run_videoxl(model, prefix, visual, question, ratio=ratio, window=window,
                max_new_tokens=1, summary_embed=emb, cache=cache, on_window=after_window)
    assert seen == [(6 + 2, 4), (6 + 5, 0), (6 + 7, 4), (6 + 9, 3)]
    assert cache.num_summaries == 75 // ratio
    # after the video + question: sink + summaries + question rows, nothing else
    per_row = 2 * 2 * 2 * 64 * 4  # layers x (k, v) x kv heads x head dim x fp32
    assert cache.bytes() == (6 + 9 + 5) * per_row


def test_layout_helpers_agree_with_reference():
    for ratio in (1, 2, 3, 4, 8, 16):
        for carry in range(ratio):
            for n in (1, 7, 20, 33):
                raw = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 2)
                x = interleave(raw, torch.full((2,), -1.0), ratio, carry)
                is_sum = x[0, :, 0] == -1
                want = torch.zeros(x.shape[1], dtype=torch.bool)
                want[summary_slots(n, ratio, carry)] = True
                assert torch.equal(is_sum, want)
                assert torch.equal(x[0, raw_slots(n, ratio, carry), 0], torch.arange(n).float())
                slots = torch.arange(x.shape[1])
                assert torch.equal(want, slots % (ratio + 1) == ratio - carry)


def test_summary_linear_selects_strided_rows():
    base = torch.nn.Linear(8, 6)
    lay = SummaryLayout()
    lin = SummaryLinear(base, lay, share_base=False)
    torch.nn.init.normal_(lin.summary.weight)
    x = torch.randn(2, 23, 8)
    torch.testing.assert_close(lin(x), base(x))  # no layout: plain base
    lay.set(first=3, stride=5, count=4)  # rows 3, 8, 13, 18
    mask = torch.zeros(23, dtype=torch.bool)
    mask[[3, 8, 13, 18]] = True
    want = base(x)
    want[:, mask] = lin.summary(x[:, mask])
    torch.testing.assert_close(lin(x), want)
    # gradients reach the summary weights through the strided rows
    lin(x).sum().backward()
    assert lin.summary.weight.grad.abs().sum() > 0


def test_summary_projections_default_to_the_shared_base():
    model = _model("qwen2")
    install_summary_projections(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, SummaryLinear)
    assert torch.equal(attn.q_proj.summary.weight, attn.q_proj.base.weight)
    # no checkpoint weights: shared with the base, not copied (issue 9.14)
    assert attn.q_proj.summary.weight.data_ptr() == attn.q_proj.base.weight.data_ptr()
    layout = install_summary_projections(model)  # idempotent, one shared layout
    assert attn.v_proj.layout is layout and model.model.layers[1].self_attn.k_proj.layout is layout


def test_summary_embedding_from_eos():
    model = _model("llama")
    emb = SummaryEmbedding.from_model(model, eos_token_id=5)
    assert torch.equal(emb.weight.data, model.get_input_embeddings().weight[5])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kw", "err", "words"), [
    (dict(ratio=0), ValueError, ["ratio", ">= 1"]),
    (dict(ratio=2.5), TypeError, ["ratio"]),
    (dict(window=0), ValueError, ["window", "positive"]),
    (dict(max_new_tokens=0), ValueError, ["max_new_tokens"]),
])  # fmt: skip
def test_bad_driver_args(kw, err, words):
    model = _model("qwen2")
    prefix, visual, question, emb = _inputs(10)
    args = dict(ratio=4, window=8, max_new_tokens=1, summary_embed=emb)
    args.update(kw)
    with pytest.raises(err) as e:
        run_videoxl(model, prefix, visual, question, **args)
    for w in words:
        assert w in str(e.value)


def test_capacity_overflow_is_clear_and_writes_nothing():
    model = _model("qwen2")
    prefix, visual, question, emb = _inputs(40)
    cache = SummaryKVCache.for_model(model, prefix=6, num_visual=10, ratio=4, window=8, tail=5)
    with pytest.raises(ValueError, match="capacity"):
        run_videoxl(model, prefix, visual, question, ratio=4, window=8, summary_embed=emb,
                    cache=cache)
    assert cache.get_seq_length() == 0
    assert all(not layer.is_initialized for layer in cache.layers)  # nothing allocated/written


def test_cache_used_past_capacity():
    cache = SummaryKVCache(1, 5, torch.ones(32))
    k = torch.randn(1, 2, 4, 64)
    cache.update(k, k, 0)
    before = cache.layers[0].key_buffer.clone()
    with pytest.raises(ValueError, match="capacity exceeded: 4 cached \\+ 2 new > capacity 5"):
        cache.update(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), 0)
    assert cache.get_seq_length() == 4
    assert torch.equal(cache.layers[0].key_buffer[:, :, :4], before[:, :, :4])
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        SummaryKVCache(1, 0, torch.ones(32))


def test_head_counts_that_do_not_divide():
    model = _model("qwen2", heads=3, kv=2)
    prefix, visual, question, emb = _inputs(10)
    with pytest.raises(ValueError, match="divide"):
        run_videoxl(model, prefix, visual, question, ratio=4, window=8, summary_embed=emb)
    assert model.config._attn_implementation == "sdpa"


def test_bad_visual_shape():
    model = _model("qwen2")
    prefix, _, question, emb = _inputs(10)
    with pytest.raises(ValueError, match="visual must be"):
        run_videoxl(model, prefix, torch.randn(1, 10, 64), question, ratio=4, window=8,
                    summary_embed=emb)


def test_eos_masks_tokens_after_first_eos():
    model = _model("qwen2")
    prefix, visual, question, emb = _inputs(12)
    out = run_videoxl(model, prefix, visual, question, ratio=4, window=8, max_new_tokens=5,
                      summary_embed=emb)
    eos = int(out.tokens[1])
    out2 = run_videoxl(model, prefix, visual, question, ratio=4, window=8, max_new_tokens=5,
                       summary_embed=emb, eos_token_id=eos)
    first = int((out.tokens == eos).nonzero()[0, 0])
    assert (out2.tokens[first:] == eos).all()
    assert torch.equal(out2.tokens[:first], out.tokens[:first])


def test_benchmark_whole_video_pass_peak_growth():
    """The summary_cache benchmark's whole-video passes (quick model): the fused pass's
    peak grows by exactly the summary rows it keeps per frame, the seed-style pass (all
    frames' features and the whole input sequence up front) by much more."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from benchmarks.cases import summary_cache as sc
    from lvlm_fast.profile.tracker import peak_live_bytes

    p = dict(sc.QUICK)
    s = sc._build(p)
    growth = {}
    for name, fn in (("fused", sc.fused_pass), ("seed", sc.seed_pass)):
        lo, hi = (peak_live_bytes(lambda f=f, fn=fn: fn(s, p, f)) for f in (8, 16))
        growth[name] = (hi - lo) / 8
    per_frame_rows = p["per_frame"] / p["ratio"]  # summaries kept per frame
    assert growth["fused"] == per_frame_rows * s["row_bytes"]
    assert growth["seed"] > 4 * growth["fused"]
