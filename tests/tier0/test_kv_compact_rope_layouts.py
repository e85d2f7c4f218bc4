"""Tier 0: kv_compact's re-rotation under interleaved M-RoPE (Qwen3-VL) and partial rotary
with interleaved M-RoPE (Qwen3.5), checked against transformers' own rotary embeddings
(``Qwen3VLTextRotaryEmbedding`` / ``Qwen3_5TextRotaryEmbedding`` and the family's
``apply_rotary_pos_emb``) and against the plain-PyTorch reference: a key cached at
``(slot s, h, w)`` and moved to slot ``d`` must equal the key computed at ``(d, h, w)``.
Also: the temporal-pair mask, the C++ kernel driven without any kernel change (spatial
pairs at frequency 0 / rows moved unrotated then re-rotated from the keep mask), a device
length, and bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import lvlm_fast  # noqa: F401
from lvlm_fast.models import get_config
from lvlm_fast.ops import kv_compact
from lvlm_fast.reference.kv_compact import kv_compact as ref
from lvlm_fast.reference.kv_compact import temporal_pairs


def _family(name: str):
    """(text config, rotary embedding, apply_rotary_pos_emb) of a tiny config."""
    if name == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            Qwen3VLTextRotaryEmbedding as Rot,
        )
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
        tc = get_config("tiny-qwen3-vl").text_config
    else:
        from transformers.models.qwen3_5.modeling_qwen3_5 import (
            Qwen3_5TextRotaryEmbedding as Rot,
        )
        from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb
        tc = get_config("tiny-qwen3.5").text_config
    return tc, Rot(tc), apply_rotary_pos_emb


def _hf_rope(rot, apply, raw: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """raw (R, D) keys rotated by transformers at ids pos (3, R)."""
    cos, sin = rot(raw[None], pos[:, None, :])
    k = raw.view(1, 1, *raw.shape)
    return apply(k, k, cos.double(), sin.double())[1].view_as(raw)


def test_temporal_pairs_match_transformers_interleaving():
    """Pair i carries the temporal id iff transformers' interleaving leaves freq[0] there:
    ids (t, 0, 0) and (0, h, w) split the pairs exactly as the mask says."""
    for name in ("qwen3_vl", "qwen3_5"):
        tc, rot, _ = _family(name)
        sec = tc.rope_parameters["mrope_section"]
        pairs = rot.inv_freq.shape[0]
        mask = temporal_pairs(pairs, sec, interleaved=True)
        x = torch.zeros(1, 1, 1)
        cos_t, _ = rot(x, torch.tensor([50, 0, 0]).view(3, 1, 1))
        cos_s, _ = rot(x, torch.tensor([0, 70, 30]).view(3, 1, 1))
        moved_t = cos_t[0, 0, :pairs] != 1  # pairs that rotate with the temporal id
        moved_s = cos_s[0, 0, :pairs] != 1
        assert torch.equal(moved_t, mask) and torch.equal(moved_s, ~mask)
        assert int(mask.sum()) == sec[0]


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("device_length", [False, True])
def test_rerotated_key_equals_transformers_at_the_new_slot(name, device_length):
    """Keys made by transformers at (slot, h, w); compaction by caller scores (ties,
    NaN-free); every kept key == transformers' key at (new slot, h, w); spatial ids never
    move. The same as the reference kv_compact."""
    tc, rot, apply = _family(name)
    d = tc.head_dim
    sec = tc.rope_parameters["mrope_section"]
    rdim = 2 * rot.inv_freq.shape[0]
    nl, h, c, n, budget, prefix = 2, 2, 37, 33, 14, 3
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(nl, 1, h, c, d, generator=g, dtype=torch.float64)
    hw = torch.randint(0, 40, (nl, 1, h, c, 2), generator=g)
    key = torch.empty_like(raw)
    for li in range(nl):
        for hh in range(h):
            pos = torch.cat([torch.arange(c).view(1, -1), hw[li, 0, hh].T])
            key[li, 0, hh] = _hf_rope(rot, apply, raw[li, 0, hh], pos)
    value = torch.randn(nl, 1, h, c, d, generator=g, dtype=torch.float64)
    scores = torch.randint(0, 4, (nl, 1, h, c), generator=g).float()
    k1, v1 = key.clone(), value.clone()
    length = torch.tensor(n) if device_length else n
    res = kv_compact(k1, v1, length, budget=budget, inv_freq=rot.inv_freq, prefix=prefix,
                     recent=2, scores=scores, mrope_section=sec, mrope_interleaved=True,
                     rotary_dim=None if rdim == d else rdim)
    k2, v2 = key.clone(), value.clone()
    rn, rkeep, _ = ref(k2, v2, n, rot.inv_freq, budget=budget, prefix=prefix, recent=2,
                       primary_slots=budget - prefix - 2, scores=scores, mrope_section=sec,
                       mrope_interleaved=True)
    assert int(res.new_length) == rn == budget and torch.equal(res.keep, rkeep)
    torch.testing.assert_close(k1[..., :budget, :], k2[..., :budget, :], rtol=1e-6, atol=1e-6)
    assert torch.equal(v1[..., :budget, :], v2[..., :budget, :])
    for li in range(nl):
        for hh in range(h):
            src = rkeep[li, 0, hh].nonzero()[:, 0]
            pos = torch.cat([torch.arange(budget).view(1, -1), hw[li, 0, hh, src].T])
            want = _hf_rope(rot, apply, raw[li, 0, hh, src], pos)
            # angles in fp32 (as transformers' rotary embedding): ~1e-6 of a unit key
            torch.testing.assert_close(k1[li, 0, hh, :budget], want, rtol=1e-5, atol=2e-5)
            if rdim < d:  # the pass-through dims only move
                assert torch.equal(k1[li, 0, hh, :budget, rdim:], key[li, 0, hh, src, rdim:])


def test_interleaved_full_rotary_is_masked_inv_freq_exactly():
    """Full-rotary interleaved M-RoPE == the C++ kernel with the spatial pairs' inverse
    frequencies zeroed (bit for bit: angle 0 is the identity), spatial dims unchanged."""
    d, sec = 32, [6, 5, 5]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 2, 30, d, generator=g)
    v = torch.randn(1, 1, 2, 30, d, generator=g)
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    res = kv_compact(k1, v1, 30, budget=12, inv_freq=inv, prefix=2, tar_ratio=0.0,
                     mrope_section=sec, mrope_interleaved=True)
    mask = temporal_pairs(d // 2, sec, interleaved=True)
    kv_compact(k2, v2, 30, budget=12, inv_freq=inv * mask, prefix=2, tar_ratio=0.0)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    src = res.keep[0, 0, 0].nonzero()[:, 0]
    spatial = torch.cat([torch.nonzero(~mask)[:, 0], torch.nonzero(~mask)[:, 0] + d // 2])
    assert torch.equal(k1[0, 0, 0, :12][:, spatial], k[0, 0, 0, src][:, spatial])


def test_rotary_dim_zero_moves_rows_unrotated():
    """rotary_dim=0 (Video-XL's logical positions): rows move, no key changes."""
    k = torch.randn(1, 1, 1, 20, 16)
    v = torch.randn(1, 1, 1, 20, 16)
    k1, v1 = k.clone(), v.clone()
    res = kv_compact(k1, v1, 20, budget=7, inv_freq=torch.zeros(0), prefix=1, tar_ratio=0.0,
                     rotary_dim=0)
    src = res.keep[0, 0, 0].nonzero()[:, 0]
    assert torch.equal(k1[0, 0, 0, :7], k[0, 0, 0, src])
    assert torch.equal(v1[0, 0, 0, :7], v[0, 0, 0, src])


@pytest.mark.parametrize(("kw", "err", "words"), [
    (dict(rotary_dim=15, inv_freq=torch.ones(7)), ValueError, ["rotary_dim", "even"]),
    (dict(rotary_dim=40, inv_freq=torch.ones(20)), ValueError, ["rotary_dim", "<="]),
    (dict(rotary_dim=8, inv_freq=torch.ones(8)), ValueError, ["inv_freq", "rotary_dim/2"]),
    (dict(rotary_dim=8, inv_freq=torch.ones(4), mrope_section=[2, 2, 2]), ValueError,
     ["mrope_section", "rotary_dim/2"]),
    (dict(mrope_interleaved=True), ValueError, ["mrope_interleaved", "mrope_section"]),
    (dict(mrope_interleaved=1, mrope_section=[4, 2, 2]), TypeError, ["mrope_interleaved"]),
])
def test_bad_rope_layout_names_the_argument(kw, err, words):
    k = torch.randn(1, 1, 2, 40, 16)
    v = torch.randn(1, 1, 2, 40, 16)
    k0 = k.clone()
    args = dict(budget=12, inv_freq=torch.ones(8), tar_ratio=0.0)
    args.update(kw)
    with pytest.raises(err) as e:
        kv_compact(k, v, 30, **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert torch.equal(k, k0)
