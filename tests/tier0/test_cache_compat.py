"""Tier 0: PreallocatedKVCache / SummaryKVCache as generic transformers caches, checked
against DynamicCache on tiny random Qwen2 and Llama decoders (configs, no downloads):

* beam search (``reorder_cache`` in place) and prompt-lookup decoding (``crop``) through
  ``model.generate``: same sequences and scores as DynamicCache;
* ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``, ``reorder_cache``,
  ``reset``, ``get_seq_length``, ``get_mask_sizes`` against DynamicCache doing the same;
* the fused ``lvlm_summary`` attention refuses a padded batch (and non-causal masks)
  before any compute; an unpadded batch matches SDPA;
* a cache too small for a ``generate`` call, or of another batch size, raises a clear
  ValueError before any token is produced."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lvlm_fast.cache import ATTN_NAME, PreallocatedKVCache, SummaryKVCache, check_cache_room
from lvlm_fast.models._compat import cache_kwargs  # ``cache=`` on 5.x, else past_key_values

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100


def _model(kind: str, head_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    cls, cfg = ((Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2"
                else (LlamaForCausalLM, LlamaConfig))
    model = cls(cfg(**common)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, **cache_kwargs(model, cache), return_dict_in_generate=True,
                          output_scores=True, **kw)


# --------------------------------------------------------------------------- generate
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("beams", [2, 3])
@pytest.mark.parametrize("cache_cls", ["preallocated", "summary"])
@torch.no_grad()
def test_beam_search_equals_dynamic_cache(kind, beams, cache_cls):
    """Before the fix, transformers' generic reorder_cache rebound ``keys`` to a reordered
    copy that the next in-place update never saw: beams continued from the wrong rows."""
    model = _model(kind)
    ids = _ids(2, 7)
    steps = 8
    ref = _generate(model, ids, DynamicCache(), num_beams=beams, max_new_tokens=steps,
                    num_return_sequences=beams, output_logits=True)
    cap = ids.shape[1] + steps
    if cache_cls == "preallocated":
        cache = PreallocatedKVCache(2, cap)
    else:
        cache = SummaryKVCache(2, cap, model.model.rotary_emb.inv_freq)
    storage = []
    out = _generate(model, ids, cache, num_beams=beams, max_new_tokens=steps,
                    num_return_sequences=beams, output_logits=True)
    storage = [layer.key_buffer.untyped_storage().data_ptr() for layer in cache.layers]
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the views still alias the preallocated buffers (reordered in place)
    for layer, ptr in zip(cache.layers, storage, strict=True):
        assert layer.keys.untyped_storage().data_ptr() == ptr
        assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@torch.no_grad()
def test_prompt_lookup_decoding_equals_dynamic_greedy(kind):
    """Assisted (prompt-lookup) decoding crops the cache after rejected candidates."""
    model = _model(kind)
    # a repetitive prompt so that lookups find candidates (and some are rejected)
    base = _ids(1, 6, seed=3)
    ids = torch.cat([base, base, base[:, :3]], 1)
    steps = 12
    greedy = _generate(model, ids, DynamicCache(), max_new_tokens=steps)
    cache = PreallocatedKVCache(2, ids.shape[1] + steps)
    calls = []
    orig = cache.crop
    cache.crop = lambda n: (calls.append(n), orig(n))[1]
    out = model.generate(ids, **cache_kwargs(model, cache), do_sample=False, max_new_tokens=steps,
                         prompt_lookup_num_tokens=3)
    assert torch.equal(out, greedy.sequences)
    assert any(n < 0 for n in calls)  # candidates were rejected and cropped away
    assert cache.get_seq_length() <= ids.shape[1] + steps - 1


@torch.no_grad()
def test_generate_refuses_a_too_small_cache_before_any_token():
    model = _model("qwen2")
    ids = _ids(1, 5)
    cache = PreallocatedKVCache(2, 5 + 10 - 2)  # one row short of prompt + 10 - 1
    with pytest.raises(ValueError, match=r"capacity 13 is too small .* needs 14 rows"):
        model.generate(ids, **cache_kwargs(model, cache), do_sample=False, max_new_tokens=10)
    assert cache.get_seq_length() == 0 and not cache.is_initialized  # nothing ran
    # exactly enough rows: the full answer
    cache = PreallocatedKVCache(2, 5 + 10 - 1)
    out = model.generate(ids, **cache_kwargs(model, cache), do_sample=False, max_new_tokens=10)
    assert out.shape == (1, 15)
    assert cache.get_seq_length() == 14


@torch.no_grad()
def test_generate_refuses_a_cache_of_another_batch():
    model = _model("llama")
    cache = PreallocatedKVCache(2, 40)
    model(_ids(1, 4), **cache_kwargs(model, cache))  # allocated for batch 1
    with pytest.raises(ValueError, match="holds a batch of 1 rows but this generate call runs 4"):
        model.generate(_ids(2, 4), **cache_kwargs(model, cache), num_beams=2, max_new_tokens=3)


def test_update_with_another_batch_is_a_clear_error():
    cache = PreallocatedKVCache(1, 8)
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), 0)
    before = cache.layers[0].key_buffer.clone()
    with pytest.raises(ValueError, match=r"key_states has \(batch, heads, head_dim\) = \(3, 2, 4\)"
                                         r" but this cache was allocated for \(2, 2, 4\)"):
        cache.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), 0)
    with pytest.raises(ValueError, match="value_states"):
        cache.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 5), 0)
    with pytest.raises(ValueError, match="key_states must be a"):
        cache.update(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0)
    with pytest.raises(ValueError, match="differ"):
        cache.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 2, 4), 0)
    assert cache.get_seq_length() == 3
    assert torch.equal(cache.layers[0].key_buffer, before)


def test_check_cache_room():
    cache = PreallocatedKVCache(1, 8)
    check_cache_room(cache, 8)
    with pytest.raises(ValueError, match="needs 9 rows, capacity is 8"):
        check_cache_room(cache, 9, "decoding")
    check_cache_room(DynamicCache(), 10**9)  # unbounded


# --------------------------------------------------------------------------- cache API
def _pair(batch: int = 3, cap: int = 16, lengths=(5, 2), seed: int = 0):
    """A PreallocatedKVCache and a DynamicCache fed the same updates (2 layers)."""
    g = torch.Generator().manual_seed(seed)
    ours, ref = PreallocatedKVCache(2, cap), DynamicCache()
    for n in lengths:
        for li in range(2):
            k = torch.randn(batch, 2, n, 4, generator=g)
            v = torch.randn(batch, 2, n, 6, generator=g)
            ours.update(k, v, li)
            ref.update(k, v, li)
    return ours, ref


def _same(ours, ref):
    assert ours.get_seq_length() == ref.get_seq_length()
    for li in range(2):
        a, b = ours.layers[li], ref.layers[li]
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.keys.data_ptr() == a.key_buffer.data_ptr()  # still views of the buffers
        assert a.key_buffer.shape[2] == ours.capacity  # capacity kept
        assert ours.get_mask_sizes(3, li) == ref.get_mask_sizes(3, li)


def test_crop_matches_dynamic_cache_and_keeps_storage():
    ours, ref = _pair()
    ptr = ours.layers[0].key_buffer.data_ptr()
    for n in (0, -2, -1):
        ours.crop(n)
        ref.crop(n)
        _same(ours, ref)
    assert ours.layers[0].key_buffer.data_ptr() == ptr
    # appending after a crop overwrites the dropped rows
    k = torch.randn(3, 2, 2, 4)
    v = torch.randn(3, 2, 2, 6)
    for li in range(2):
        ours.update(k, v, li)
        ref.update(k, v, li)
    _same(ours, ref)
    ours.crop(-100)
    ref.crop(-100)
    assert ours.get_seq_length() == ref.get_seq_length() == 0
    with pytest.raises(ValueError, match="negative"):
        ours.crop(2)
    with pytest.raises(TypeError, match="tokens_to_remove"):
        ours.crop(1.5)
    assert ours.is_croppable


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_batch_repeat_interleave_matches_dynamic_cache(repeats):
    ours, ref = _pair()
    ours.batch_repeat_interleave(repeats)
    ref.batch_repeat_interleave(repeats)
    _same(ours, ref)
    assert ours.batch_size == 3 * repeats
    # the cache keeps working at the new batch
    k = torch.randn(3 * repeats, 2, 1, 4)
    v = torch.randn(3 * repeats, 2, 1, 6)
    for li in range(2):
        ours.update(k, v, li)
        ref.update(k, v, li)
    _same(ours, ref)
    with pytest.raises(ValueError, match="repeats"):
        ours.batch_repeat_interleave(0)


@pytest.mark.parametrize("indices", [[2, 0], [1], [0, 0, 2], [True, False, True], [-1, 0]])
def test_batch_select_indices_matches_dynamic_cache(indices):
    ours, ref = _pair()
    idx = torch.tensor(indices)
    ours.batch_select_indices(idx)
    ref.batch_select_indices(idx)
    _same(ours, ref)
    assert ours.batch_size == ref.layers[0].keys.shape[0]


def test_batch_ops_bad_input():
    ours, _ = _pair()
    with pytest.raises(ValueError, match=r"indices must index the cached batch of 3 rows"):
        ours.batch_select_indices(torch.tensor([3]))
    with pytest.raises(ValueError, match="bool mask must have 3 entries"):
        ours.batch_select_indices(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="integer indices or a bool mask"):
        ours.batch_select_indices(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="beam_idx must have one entry per cached row"):
        ours.reorder_cache(torch.tensor([0, 1]))


def test_reorder_cache_in_place_matches_dynamic_cache():
    ours, ref = _pair()
    ptrs = [layer.key_buffer.data_ptr() for layer in ours.layers]
    beam_idx = torch.tensor([2, 2, 0])
    ours.reorder_cache(beam_idx)
    ref.reorder_cache(beam_idx)
    _same(ours, ref)
    assert [layer.key_buffer.data_ptr() for layer in ours.layers] == ptrs
    # the next update lands in the reordered buffer (the bug: it landed in a stale one)
    k = torch.randn(3, 2, 1, 4)
    v = torch.randn(3, 2, 1, 6)
    for li in range(2):
        ours.update(k, v, li)
        ref.update(k, v, li)
    _same(ours, ref)


def test_generic_cache_behaviours():
    ours, ref = _pair()
    assert ours.get_max_length() == 16 and ref.get_max_length() == -1
    assert ours.is_initialized and not ours.is_compileable and ours.batch_size == 3
    assert ours.get_mask_sizes(4, 0) == ref.get_mask_sizes(4, 0) == (11, 0)
    ptr = ours.layers[0].key_buffer.data_ptr()
    ours.reset()
    assert ours.get_seq_length() == 0 and ours.layers[0].keys.shape[2] == 0
    assert ours.layers[0].key_buffer.data_ptr() == ptr  # buffers kept for reuse
    # early initialization (export recipes) allocates without writing
    fresh = PreallocatedKVCache(2, 8)
    assert fresh.batch_size == -1 and fresh.get_seq_length() == 0
    fresh.early_initialization(2, 2, 4, torch.float32, torch.device("cpu"))
    assert fresh.is_initialized and fresh.batch_size == 2 and fresh.get_seq_length() == 0
    with pytest.raises(NotImplementedError, match="offloading"):
        ours.layers[0].offload()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="capacity must be a positive int"):
            PreallocatedKVCache(2, bad)
    with pytest.raises(ValueError, match="num_layers"):
        PreallocatedKVCache(0, 4)


def test_summary_cache_crop_protects_sink_and_summaries_and_reset_clears():
    cache = SummaryKVCache(1, 32, torch.ones(2), evict=False)
    cache.update(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), 0)
    cache.mark_sink()
    cache.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 0)
    cache.crop(-3)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="sink and summaries"):
        cache.crop(-1)
    cache.reset()
    assert (cache.get_seq_length(), cache.sink_length, cache.frozen_length) == (0, None, 0)


# --------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@torch.no_grad()
def test_fused_attention_refuses_padded_batch(kind):
    """Before the fix no mask function was registered, transformers passed no mask, and
    the pad tokens were attended to silently (logits off by ~4)."""
    model = _model(kind, head_dim=64)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on row 0
    model.set_attn_implementation(ATTN_NAME)
    calls = []
    import lvlm_fast.cache as cache_mod

    real = cache_mod.summary_attention
    cache_mod.summary_attention = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        with pytest.raises(ValueError, match="does not support padded batches"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="does not support padded batches"):
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2)
        assert not calls  # refused before any attention ran
        # unpadded: an all-ones mask (or none) runs and matches SDPA, with and without cache
        fused = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert calls
        cache = PreallocatedKVCache(2, 8)
        model(ids[:, :4], **cache_kwargs(model, cache))
        fused_step = model(ids[:, 4:], **cache_kwargs(model, cache)).logits
    finally:
        cache_mod.summary_attention = real
        model.set_attn_implementation("sdpa")
    ref = model(ids).logits
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_step, ref[:, 4:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_attention_refuses_non_causal_masks():
    """A sliding-window layer (or packed sequences) needs a mask the kernel does not have."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, use_sliding_window=True, sliding_window=4,
                      max_window_layers=0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation(ATTN_NAME)
    with pytest.raises(ValueError, match="sliding window"):
        model(_ids(1, 6))


@torch.no_grad()
def test_wrapper_decode_checks_room_before_the_first_token():
    """``LongVideoVLM.decode`` after a ``prefill`` sized without a decode reserve: refused
    up front (before, it failed at the second step and lost the first token)."""
    from lvlm_fast.models import LongVideoVLM
    from lvlm_fast.models.strategies.base import VideoPrompt

    torch.manual_seed(0)
    vlm = LongVideoVLM.from_config("tiny-llava-onevision")
    g = torch.Generator().manual_seed(0)
    pr = VideoPrompt(torch.randn(2, 3, 56, 56, generator=g),
                     torch.randint(0, 250, (1, 3), generator=g),
                     torch.randint(0, 250, (1, 4), generator=g))
    res = vlm.prefill(pr)
    held = res.cache.get_seq_length()
    assert res.cache.capacity == held  # no reserve
    with pytest.raises(ValueError, match=rf"decoding 4 tokens .* needs {held + 3} rows, "
                                         rf"capacity is {held}"):
        vlm.decode(res, 4)
    assert res.cache.get_seq_length() == held
    assert vlm.decode(res, 1).shape == (1, 1)  # the first token needs no new row
