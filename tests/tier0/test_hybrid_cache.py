"""The preallocated caches on a hybrid decoder (Qwen3.5: Gated DeltaNet linear-attention
layers + full-attention layers), checked against transformers' own Qwen3.5.

* Full-attention layers hold preallocated K/V rows, linear-attention layers their fixed-size
  conv window and recurrent state, written in place (same storage from the first token to
  the last, constant bytes).
* Chunked prefill (any chunk size, fused or model attention) equals transformers' forward on
  the whole prompt; ``generate`` with the cache equals ``generate`` with transformers' own
  cache token for token (greedy and beam search).
* Beam reorder in place, batch ops, ``crop`` refused once a recurrent state exists (nothing
  changed), bad input named.
* Eviction and the KV budget act on full-attention layers only: Video-XL windows driven
  through a :class:`SummaryKVCache` leave every linear layer's state untouched at each
  eviction, and the whole run equals a plain-PyTorch reference: the interleaved stream run
  ONCE through transformers' decoder with the eviction mask on the full-attention layers
  and no mask on the linear ones (their recurrent state has absorbed every token).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import videoxl_mask  # tests/tier0 is on sys.path
from transformers import Qwen3_5ForConditionalGeneration

from lvlm_fast.cache import (
    ATTN_NAME,
    PreallocatedKVCache,
    PreallocatedLayer,
    PreallocatedStateLayer,
    SummaryKVCache,
)
from lvlm_fast.models._compat import cache_kwarg, cache_kwargs
from lvlm_fast.models.configs import tiny_qwen3_5
from lvlm_fast.models.videoxl_driver import AttnImpl, run_window
from lvlm_fast.nn.summary_proj import install_summary_projections

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py

LINEAR = [0, 2]  # tiny-qwen3.5: linear, full, linear, full
FULL = [1, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Qwen3_5ForConditionalGeneration(tiny_qwen3_5()).eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _states(cache: PreallocatedKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(la.conv_states[0], la.recurrent_states[0]) for la in cache.state_layers]


def _prefill(model, cache, ids: torch.Tensor, chunk: int, fused: bool = False) -> torch.Tensor:
    """Chunked prefill into ``cache``; returns all positions' logits."""
    lm = model.model.language_model
    emb = model.get_input_embeddings()(ids)
    outs = []
    ctx = AttnImpl(lm, ATTN_NAME) if fused else torch.no_grad()
    with ctx, torch.no_grad():
        for a in range(0, ids.shape[1], chunk):
            h = lm(inputs_embeds=emb[:, a : a + chunk], **cache_kwargs(lm, cache),
                   use_cache=True).last_hidden_state
            outs.append(model.lm_head(h))
    return torch.cat(outs, 1)


# --------------------------------------------------------------------------- layout
def test_layer_kinds_from_the_config(model):
    cache = PreallocatedKVCache.for_config(model.config, 50)
    kinds = [type(la) for la in cache.layers]
    assert [kinds[i] for i in LINEAR] == [PreallocatedStateLayer] * 2
    assert [kinds[i] for i in FULL] == [PreallocatedLayer] * 2
    assert cache.kv_layers == [cache.layers[i] for i in FULL]
    assert cache.get_seq_length() == 0 and cache.get_max_length() == 50
    assert cache.kv_bytes() == cache.state_bytes() == 0
    # a decoder without layer_types (or with only attention layers): unchanged
    assert all(isinstance(la, PreallocatedLayer) for la in PreallocatedKVCache(3, 8).layers)


@pytest.mark.parametrize("types,exc,match", [
    (["linear_attention", "full_attention"], ValueError, "name 4 layers"),
    (["linear_attention", "full_attention", "mamba", "full_attention"], ValueError,
     r"unsupported layer type\(s\) \['mamba'\]"),
    (["linear_attention"] * 4, ValueError, "no attention layer"),
    ("full_attention", TypeError, "layer_types must be a sequence"),
])
def test_bad_layer_types(types, exc, match):
    with pytest.raises(exc, match=match):
        PreallocatedKVCache(4, 8, types)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("chunk", [1, 5, 16, 37])
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_prefill_equals_forward(model, chunk, fused):
    """Any chunking (1 token, smaller than / equal to the conv kernel's reach, non-dividing,
    one chunk) equals transformers' forward on the whole prompt; the states are written in
    place (same storage after every chunk) and their bytes do not grow."""
    ids = _ids(37)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    cache = PreallocatedKVCache.for_config(model.config, 40)
    lm = model.model.language_model
    emb = model.get_input_embeddings()(ids)
    ptrs, sizes, outs = None, set(), []
    ctx = AttnImpl(lm, ATTN_NAME) if fused else torch.no_grad()
    with ctx, torch.no_grad():
        for a in range(0, 37, chunk):
            h = lm(inputs_embeds=emb[:, a : a + chunk], **cache_kwargs(lm, cache),
                   use_cache=True).last_hidden_state
            outs.append(model.lm_head(h))
            now = [(c.data_ptr(), r.data_ptr()) for c, r in _states(cache)]
            assert ptrs is None or now == ptrs
            ptrs = now
            sizes.add(cache.state_bytes())
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 37
    assert [la.length for la in cache.kv_layers] == [37, 37]
    conv, rec = _states(cache)[0]
    assert conv.shape == (1, 2 * 2 * 32 + 4 * 32, 4) and rec.shape == (1, 4, 32, 32)
    assert sizes == {2 * (conv.nbytes + rec.nbytes)}  # constant from the first chunk on


def test_states_equal_transformers_cache(model):
    """After a chunked prefill, every linear layer's conv window and recurrent state equal
    those of transformers' own cache after one forward of the whole prompt."""
    ids = _ids(23, seed=3)
    with torch.no_grad():
        # the output field was renamed with the keyword (past_key_values -> cache)
        ref = getattr(model(input_ids=ids, use_cache=True), cache_kwarg(model))
    cache = PreallocatedKVCache.for_config(model.config, 30)
    _prefill(model, cache, ids, chunk=6)
    for li in LINEAR:
        torch.testing.assert_close(cache.layers[li].conv_states[0], ref.layers[li].conv_states[0])
        torch.testing.assert_close(cache.layers[li].recurrent_states[0],
                                   ref.layers[li].recurrent_states[0], rtol=1e-5, atol=1e-5)
    for li in FULL:
        torch.testing.assert_close(cache.layers[li].keys, ref.layers[li].keys,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_transformers(model, beams):
    """``model.generate`` with the preallocated cache == with transformers' own cache,
    token for token (beam search reorders the states in place)."""
    ids = _ids(19, seed=1)
    kw = dict(max_new_tokens=7, do_sample=False, num_beams=beams)
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kw)
        cache = PreallocatedKVCache.for_config(model.config, 19 + 6)
        got = model.generate(input_ids=ids, **cache_kwargs(model, cache), **kw)
    assert got.tolist() == want.tolist()
    assert cache.get_seq_length() == 19 + 6
    assert cache.batch_size == beams


def test_decode_after_chunked_prefill_equals_forward(model):
    """Decode steps (single-token path: the conv window updated in place by transformers'
    ``causal_conv1d_update``) continue the chunked prefill exactly."""
    ids = _ids(30, seed=2)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    cache = PreallocatedKVCache.for_config(model.config, 30)
    got = [_prefill(model, cache, ids[:, :24], chunk=7)]
    for t in range(24, 30):
        got.append(_prefill(model, cache, ids[:, t : t + 1], chunk=1))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- generation ops
def test_reset_keeps_storage_and_starts_over(model):
    """``reset`` zeroes the states in place and forgets them (the next update is a first
    one again): a second prompt through the reset cache == a fresh cache."""
    cache = PreallocatedKVCache.for_config(model.config, 20)
    _prefill(model, cache, _ids(11, seed=4), chunk=4)
    ptrs = [s.data_ptr() for pair in _states(cache) for s in pair]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.is_croppable
    got = _prefill(model, cache, _ids(9, seed=5), chunk=5)
    want = _prefill(model, PreallocatedKVCache.for_config(model.config, 20), _ids(9, seed=5),
                    chunk=5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [s.data_ptr() for pair in _states(cache) for s in pair] == ptrs


def test_crop_refused_when_a_recurrent_state_exists(model):
    cache = PreallocatedKVCache.for_config(model.config, 20)
    assert cache.is_croppable  # nothing absorbed yet
    cache.crop(-3)  # empty: a no-op
    _prefill(model, cache, _ids(9), chunk=4)
    assert not cache.is_croppable
    before = [s.clone() for pair in _states(cache) for s in pair]
    with pytest.raises(ValueError, match="recurrent state has absorbed them"):
        cache.crop(-2)
    assert cache.get_seq_length() == 9  # nothing changed
    assert all(torch.equal(a, b) for a, b in
               zip(before, [s for pair in _states(cache) for s in pair], strict=True))
    cache.crop(0)  # no-op
    with pytest.raises(TypeError, match="tokens_to_remove must be an int"):
        cache.crop(1.0)
    with pytest.raises(ValueError, match="negative number"):
        cache.crop(2)
    with pytest.raises(ValueError, match="past recording"):
        cache.activate_past_recording()


def test_reorder_in_place_and_batch_ops(model):
    ids = torch.cat([_ids(8, seed=s) for s in range(3)])
    cache = PreallocatedKVCache.for_config(model.config, 10)
    _prefill(model, cache, ids, chunk=3)
    snap = [s.clone() for pair in _states(cache) for s in pair]
    ptrs = [s.data_ptr() for pair in _states(cache) for s in pair]
    perm = torch.tensor([2, 0, 0])
    cache.reorder_cache(perm)
    now = [s for pair in _states(cache) for s in pair]
    assert [s.data_ptr() for s in now] == ptrs  # in place
    for a, b in zip(snap, now, strict=True):
        assert torch.equal(a[perm], b)
    cache.batch_select_indices(torch.tensor([True, False, True]))
    assert cache.batch_size == 2
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    for a, b in zip(snap, [s for pair in _states(cache) for s in pair], strict=True):
        assert torch.equal(a[torch.tensor([2, 2, 0, 0])], b)
    with pytest.raises(ValueError, match="beam_idx must have one entry per cached row"):
        cache.reorder_cache(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        cache.batch_repeat_interleave(0)
    # an update of another batch names the argument and the allocated shape
    with pytest.raises(ValueError, match=r"conv_states has \(batch, channels\)"):
        _prefill(model, cache, _ids(2), chunk=2)


def test_state_layer_bad_input():
    la = PreallocatedStateLayer()
    with pytest.raises(ValueError, match="conv_states must be a"):
        la.update_conv_state(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="state_idx must be an int in"):
        la.update_conv_state(torch.zeros(1, 3, 2), state_idx=1)
    la.update_recurrent_state(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="recurrent_states has shape"):
        la.update_recurrent_state(torch.zeros(1, 2, 4, 5))
    with pytest.raises(NotImplementedError, match="offloading"):
        la.offload()
    with pytest.raises(ValueError, match="number_of_states"):
        PreallocatedStateLayer(0)


# --------------------------------------------------------------------------- eviction
class _View:
    """The Qwen3.5 decoder seen as the causal LM the Video-XL driver expects."""

    def __init__(self, model) -> None:
        self.model = model.model.language_model
        self.config = model.config.text_config
        self.lm_head = model.lm_head
        self._embed = model.get_input_embeddings()

    def get_input_embeddings(self):
        return self._embed

    def set_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation(name)


def _pos(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi).view(1, 1, -1).expand(3, 1, -1)


def _videoxl_cached(model, prefix, raw, question, ratio, window, evict, steps, fused):
    """Video-XL windows through a SummaryKVCache with logical positions kept (1-D logical
    positions on all three M-RoPE axes; summaries moved unrotated). Checks at every
    eviction that the linear layers' states are untouched (values and storage)."""
    view = _View(model)
    layout = install_summary_projections(view)
    vst = model.get_input_embeddings().weight[2]
    lm = view.model
    p, n, q = prefix.shape[1], raw.shape[1], question.shape[1]
    cache = SummaryKVCache.for_model(
        view, prefix=p, num_visual=n, ratio=ratio, window=window, tail=q + steps - 1,
        evict=evict, inv_freq=torch.zeros_like(lm.rotary_emb.inv_freq))
    assert len(cache.kv_layers) == 2  # capacity and eviction: full-attention layers only
    evictions = []
    orig = cache.evict_window

    def spy(start: int, n_raw: int, r: int) -> int:
        before = [(s.clone(), s.data_ptr()) for pair in _states(cache) for s in pair]
        kept = orig(start, n_raw, r)
        after = [s for pair in _states(cache) for s in pair]
        assert all(torch.equal(b, a) and ptr == a.data_ptr()
                   for (b, ptr), a in zip(before, after, strict=True))
        evictions.append(cache.kv_bytes())
        return kept

    cache.evict_window = spy
    emb = model.get_input_embeddings()
    ctx = AttnImpl(view, ATTN_NAME) if fused else torch.no_grad()
    with ctx, torch.no_grad():
        lm(inputs_embeds=emb(prefix), position_ids=_pos(0, p), **cache_kwargs(lm, cache),
           use_cache=True)
        cache.mark_sink()
        for s in range(0, n, window):
            m = min(window, n - s)
            run_window(view, cache, layout, raw[:, s : s + m], vst, ratio, _pos(p + s, p + s + m))
        h = lm(inputs_embeds=emb(question), position_ids=_pos(p + n, p + n + q),
               **cache_kwargs(lm, cache),
               use_cache=True).last_hidden_state[:, -1:]
        logits, tokens = [], []
        for t in range(steps):
            lg = model.lm_head(h[:, -1]).float()
            logits.append(lg)
            tokens.append(int(lg.argmax()))
            if t + 1 < steps:
                at = p + n + q + t
                h = lm(inputs_embeds=emb(torch.tensor([[tokens[-1]]])),
                       position_ids=_pos(at, at + 1), **cache_kwargs(lm, cache),
                       use_cache=True).last_hidden_state
    assert len(evictions) == -(-n // window)
    return logits[0], tokens, cache


def _videoxl_reference(model, prefix, raw, question, ratio, window, evict, steps):
    """The whole interleaved stream run once through transformers' Qwen3.5 decoder: the
    eviction mask on the full-attention layers, none on the linear-attention layers."""
    emb = model.get_input_embeddings()
    vst = emb.weight[2]
    p, n, q = prefix.shape[1], raw.shape[1], question.shape[1]
    toks, pos, kind, win = [], [], [], []

    def add(tok: torch.Tensor, at: int, k: int, w: int) -> None:
        toks.append(tok)
        pos.append(at)
        kind.append(k)  # 0 text, 1 raw, 2 summary
        win.append(w)

    for i in range(p):
        add(emb(prefix[:, i])[0], i, 0, -1)
    for r in range(n):
        add(raw[0, r], p + r, 1, r // window)
        # a summary after every ratio-th raw token of the stream (the count runs across
        # windows), at the position of the raw token before it
        if (r + 1) % ratio == 0:
            add(vst, p + r, 2, r // window)
    for i in range(q):
        add(emb(question[:, i])[0], p + n + i, 0, 10**9)
    lm = model.model.language_model
    tokens = []
    for s in range(steps):
        m = len(toks)
        mask = videoxl_mask(kind, win, evict)
        with torch.no_grad():
            h = lm(inputs_embeds=torch.stack(toks).unsqueeze(0),
                   position_ids=torch.tensor(pos).view(1, 1, m).expand(3, 1, m),
                   attention_mask={"full_attention": mask.view(1, 1, m, m),
                                   "linear_attention": None}).last_hidden_state
            lg = model.lm_head(h[:, -1]).float()
        if s == 0:
            first = lg
        tokens.append(int(lg.argmax()))
        add(emb(torch.tensor([tokens[-1]]))[0], p + n + q + s, 0, 10**9)
    return first, tokens


@pytest.mark.parametrize("n,ratio,window", [(40, 4, 12), (33, 5, 10), (20, 7, 64)])
@pytest.mark.parametrize("evict", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_videoxl_eviction_acts_on_full_attention_only(model, n, ratio, window, evict, fused):
    """Every eviction leaves the linear layers' states as they were; the result equals the
    masked whole-stream reference (full layers masked, linear layers see every token)."""
    g = torch.Generator().manual_seed(n)
    prefix, question = _ids(3, seed=10), _ids(4, seed=11)
    raw = torch.randn(1, n, 128, generator=g)
    want_first, want_tokens = _videoxl_reference(model, prefix, raw, question, ratio, window,
                                                 evict, steps=3)
    first, tokens, cache = _videoxl_cached(model, prefix, raw, question, ratio, window, evict,
                                           steps=3, fused=fused)
    torch.testing.assert_close(first, want_first, rtol=1e-5, atol=1e-5)
    assert tokens == want_tokens
    kept = n // ratio
    rows = 3 + (kept if evict else n + kept) + 4 + 2
    assert [la.length for la in cache.kv_layers] == [rows, rows]
    kv = cache.layers[FULL[0]].key_buffer
    assert cache.allocated_bytes() == 2 * 2 * kv.nbytes  # K and V of 2 full layers only
    assert cache.bytes() == cache.kv_bytes() == 2 * 2 * rows * kv[0, :, 0].nbytes
    assert cache.state_bytes() == 2 * sum(s.nbytes for s in _states(cache)[0])
