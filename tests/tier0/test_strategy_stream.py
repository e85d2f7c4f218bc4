"""`stream` strategy (issue 12.3): budget >= stream == `full` (tokens, logits 1e-5); a
smaller budget == a plain-PyTorch whole-stream reference (transformers decoder + the
reference kv_compact on a DynamicCache, window by window); stale rows poisoned with NaN are
never seen; knobs, errors. M-RoPE families: test_strategy_stream_mrope.py."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 on sys.path
    check_stale_rows_never_seen,
    small_video_prompt,
    tiny_onevision,
)
from transformers import DynamicCache, LlavaOnevisionForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config, get_strategy
from lvlm_fast.models._compat import cache_kwargs
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.models.strategies.stream import StreamConfig
from lvlm_fast.reference.kv_compact import kv_compact as ref_compact
from lvlm_fast.stream_cache import BudgetedKVCache

T = 9  # frames; 4 tokens per frame on the toy config -> 37 visual tokens (newline last)
P_TOK = 4
MAX_NEW = 5


def _model(head_dim64: bool):
    return tiny_onevision("tiny-llava-onevision", head_dim64)


@pytest.fixture(scope="module")
def toy_model():
    return _model(False)


@pytest.fixture(scope="module")
def fused_model():
    return _model(True)


def _prompt(t: int = T, seed: int = 0) -> VideoPrompt:
    return small_video_prompt(t, seed)


@pytest.mark.parametrize("which", ["toy_model", "fused_model"])
def test_budget_covering_the_stream_equals_full(which, request):
    model = request.getfixturevalue(which)
    pr = _prompt()
    full = LongVideoVLM(model, "full")
    ref_logits, ref_tokens = full.first_token(pr), full.generate(pr, MAX_NEW)
    vlm = LongVideoVLM(model, "stream", kv_budget=3 + T * P_TOK + 1, window_frames=2,
                       recent_frames=1, vision_chunk_frames=2, prefill_chunk_tokens=5)
    torch.testing.assert_close(vlm.first_token(pr), ref_logits, rtol=1e-5, atol=1e-5)
    assert vlm.strategy.cache.compactions == 0
    assert vlm.last_prefill.visual_tokens == T * P_TOK + 1
    assert torch.equal(vlm.generate(pr, MAX_NEW), ref_tokens)


def _reference(vlm: LongVideoVLM, pr: VideoPrompt, cfg: StreamConfig):
    """Whole stream, plain PyTorch: transformers' decoder on a DynamicCache, window by
    window; after each window the reference kv_compact on the stacked fp32 K/V, then a new
    DynamicCache of the kept rows. Returns (question's last hidden, K, V, last keep)."""
    visual = get_strategy("full").visual_embeds(vlm, pr)[0]
    p, n = pr.prefix_ids.shape[1], visual.shape[1]
    win, rec = cfg.window_frames * P_TOK, cfg.recent_frames * P_TOK
    k_sel = cfg.kv_budget - p - rec
    ratio = 0.5 if cfg.tar_ratio is None else cfg.tar_ratio  # None: the method's 0.5 here
    primary = math.floor(ratio * k_sel + 0.5)
    inv_freq = vlm.language_model.rotary_emb.inv_freq
    cache = DynamicCache()
    vlm.run_llm(vlm.embed_tokens(pr.prefix_ids), cache)
    keep = None
    for lo in range(0, n, win):
        vlm.run_llm(visual[:, lo : lo + win], cache)
        length = cache.get_seq_length()
        if length <= cfg.kv_budget:
            continue
        key = torch.stack([la.keys for la in cache.layers]).clone()
        value = torch.stack([la.values for la in cache.layers]).clone()
        new, keep, _ = ref_compact(key, value, length, inv_freq, budget=cfg.kv_budget,
                                   prefix=p, recent=rec, tokens_per_frame=P_TOK,
                                   primary_slots=primary)
        cache = DynamicCache()
        for li in range(key.shape[0]):
            cache.update(key[li, :, :, :new].clone(), value[li, :, :, :new].clone(), li)
    h = vlm.run_llm(vlm.embed_tokens(pr.question_ids), cache)[:, -1:]
    key = torch.stack([la.keys for la in cache.layers])
    value = torch.stack([la.values for la in cache.layers])
    return h, key, value, keep


@pytest.mark.parametrize("which", ["toy_model", "fused_model"])
@pytest.mark.parametrize("budget,window,recent,tar", [(15, 2, 1, 0.5), (11, 1, 1, 0.5),
                                                      (23, 3, 2, 1.0), (7, 1, 1, 0.0),
                                                      (20, 2, 2, 0.5)])
def test_smaller_budget_equals_whole_stream_reference(which, budget, window, recent, tar,
                                                      request):
    model = request.getfixturevalue(which)
    pr = _prompt(seed=budget)
    cfg = StreamConfig(kv_budget=budget, window_frames=window, recent_frames=recent,
                       tar_ratio=tar)
    vlm = LongVideoVLM(model, get_strategy("stream", cfg), vision_chunk_frames=2,
                       prefill_chunk_tokens=6)
    recorded = []
    orig = BudgetedKVCache.compact

    def spy(self, **kw):
        self.record = True
        out = orig(self, **kw)
        if self.last_result is not None:
            recorded.append(self.last_result.keep.clone())
        return out

    BudgetedKVCache.compact = spy
    try:
        logits = vlm.first_token(pr)
    finally:
        BudgetedKVCache.compact = orig
    cache = vlm.strategy.cache
    h, key, value, keep = _reference(vlm, pr, cfg)
    n_vis = T * P_TOK + 1
    windows = math.ceil(n_vis / (window * P_TOK))
    assert 1 <= cache.compactions <= windows and len(recorded) == cache.compactions
    assert cache.capacity == budget + max(window * P_TOK, 5)
    # the kept set of the last compaction, then every kept row, then the answer
    assert torch.equal(recorded[-1][..., : keep.shape[-1]], keep)
    assert not recorded[-1][..., keep.shape[-1]:].any()
    n = cache.get_seq_length()
    assert n == budget + pr.question_ids.shape[1] == key.shape[3]
    torch.testing.assert_close(cache.key[:, :, :, :n], key, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.value[:, :, :, :n], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.lm_head(h[:, -1]).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["toy_model", "fused_model"])
def test_stale_rows_poisoned_with_nan_are_never_seen(which, request):
    model = request.getfixturevalue(which)
    pr = _prompt(seed=3)
    kw = dict(kv_budget=15, window_frames=2, recent_frames=1)
    vlm = LongVideoVLM(model, "stream", **kw)
    check_stale_rows_never_seen(vlm, pr, MAX_NEW)


def test_cache_stays_bounded(toy_model):
    pr = _prompt(t=24, seed=5)
    vlm = LongVideoVLM(toy_model, "stream", kv_budget=15, window_frames=2, recent_frames=1)
    vlm.generate(pr, MAX_NEW)
    cache = vlm.strategy.cache
    # budget + max(window 8, question 5 + answer reserve 4)
    assert cache.capacity == 15 + max(8, 5 + MAX_NEW - 1)
    assert cache.key.shape[3] == cache.capacity
    # every window but the first (3 + 8 rows <= 15) leaves more than the budget
    assert cache.compactions == math.ceil((24 * P_TOK + 1) / 8) - 1
    # after the video: budget rows + question + (MAX_NEW - 1) answer tokens
    assert cache.get_seq_length() == 15 + 5 + MAX_NEW - 1


def test_defaults_and_knob_errors():
    cfg = StreamConfig()
    # tar_ratio None: the method's 0.5 on fixed-size frames, 0 (VaN) on timestamped units
    assert (cfg.kv_budget, cfg.window_frames, cfg.recent_frames, cfg.tar_ratio) == \
        (6144, 8, 8, None)
    with pytest.raises(TypeError, match="kv_budget"):
        StreamConfig(kv_budget=1.5)
    with pytest.raises(ValueError, match="window_frames"):
        StreamConfig(window_frames=0)
    with pytest.raises(ValueError, match="tar_ratio"):
        StreamConfig(tar_ratio=1.5)
    with pytest.raises(ValueError, match="recent_frames"):
        StreamConfig(recent_frames=0, tar_ratio=0.5)
    StreamConfig(recent_frames=0, tar_ratio=0.0)  # VaN only needs no recent frames


def test_budget_smaller_than_protected_rows_raises(toy_model):
    vlm = LongVideoVLM(toy_model, "stream", kv_budget=6, window_frames=1, recent_frames=1)
    with pytest.raises(ValueError, match="kv_budget must be >= prefix"):
        vlm.first_token(_prompt())


def test_lvlm_fast_run_accepts_stream(tmp_path, capsys):
    """`lvlm-fast run --strategy stream` (registry) with knobs through --set; the report
    lists them and the answer comes out."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lvlm_fast.cli import main
    from lvlm_fast.video import write_video

    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision")).eval() \
        .save_pretrained(tmp_path / "ckpt")
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 254)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    write_video(str(tmp_path / "v.mp4"), rng.integers(0, 255, (12, 64, 80, 3), dtype=np.uint8))
    code = main(["run", str(tmp_path / "v.mp4"), "--model", str(tmp_path / "ckpt"),
                 "--question", "w5 w7", "--strategy", "stream", "--frames", "10",
                 "--set", "kv_budget=40", "--set", "window_frames=2", "--set",
                 "recent_frames=1", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "'kv_budget': 40, 'window_frames': 2, 'recent_frames': 1" in out.out
    assert "(41 visual)" in out.out  # 10 frames x 4 tokens + the newline, all read


@pytest.mark.parametrize("which", ["toy_model", "fused_model"])
def test_attention_mass_score_equals_reference(which, request):
    """attention_mass=True: every selectable row by the attention mass from the window's
    queries == transformers' eager attention probabilities (output_attentions), summed over
    the window's query rows and each KV head's query heads, given to the reference
    kv_compact as scores, window by window."""
    model = request.getfixturevalue(which)
    pr = _prompt(seed=7)
    cfg = StreamConfig(kv_budget=15, window_frames=2, recent_frames=1, attention_mass=True)
    vlm = LongVideoVLM(model, get_strategy("stream", cfg), prefill_chunk_tokens=5)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    logits = vlm.first_token(pr)
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before  # the wrap is undone
    cache = vlm.strategy.cache
    assert cache.compactions > 0
    lm = vlm.language_model
    visual = get_strategy("full").visual_embeds(vlm, pr)[0]
    p, n = pr.prefix_ids.shape[1], visual.shape[1]
    win, rec = 2 * P_TOK, P_TOK
    inv_freq = lm.rotary_emb.inv_freq
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        dyn = DynamicCache()
        lm(inputs_embeds=vlm.embed_tokens(pr.prefix_ids), **cache_kwargs(lm, dyn), use_cache=True)
        for lo in range(0, n, win):
            out = lm(inputs_embeds=visual[:, lo : lo + win], **cache_kwargs(lm, dyn),
                     use_cache=True, output_attentions=True)
            length = dyn.get_seq_length()
            if length <= 15:
                continue
            key = torch.stack([la.keys for la in dyn.layers]).clone()
            value = torch.stack([la.values for la in dyn.layers]).clone()
            hkv = key.shape[2]
            mass = torch.stack([a.float().reshape(1, hkv, -1, a.shape[2], a.shape[3])
                                .sum((2, 3)) for a in out.attentions])
            new, _, _ = ref_compact(key, value, length, inv_freq, budget=15, prefix=p,
                                    recent=rec, scores=mass, primary_slots=15 - p - rec)
            dyn = DynamicCache()
            for li in range(key.shape[0]):
                dyn.update(key[li, :, :, :new].clone(), value[li, :, :, :new].clone(), li)
        h = lm(inputs_embeds=vlm.embed_tokens(pr.question_ids), **cache_kwargs(lm, dyn),
               use_cache=True).last_hidden_state[:, -1:]
    finally:
        lm.set_attn_implementation(old)
    m = cache.get_seq_length()
    ref_k = torch.stack([la.keys for la in dyn.layers])
    torch.testing.assert_close(cache.key[:, :, :, :m], ref_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.lm_head(h[:, -1]).float(), rtol=1e-5, atol=1e-5)
