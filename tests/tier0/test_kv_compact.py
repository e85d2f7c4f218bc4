"""Tier 0: kv_compact C++ kernel vs the reference: kept set (fused TaR/VaN scores, caller
scores with ties, budget = 1, budget > window, protected prefix + recent), moved rows and
re-rotated keys (1-D RoPE and M-RoPE), poisoned NaN rows past the length, fp32/fp64/fp16/
bf16, stacked per-layer views, device length, opcheck, meta, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import kv_compact, stacked_layer_view
from lvlm_fast.reference.kv_compact import kv_compact as ref
from lvlm_fast.reference.kv_compact import move_kept, rotation_freqs, select_rows
from lvlm_fast.reference.videoxl import apply_rope, rope_cos_sin


def _inv_freq(d, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _bufs(shape, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g).to(dtype)
    vshape = (*shape[:4], dv or shape[4])
    v = (torch.randn(*vshape, generator=g) * (1 + torch.rand(*vshape[:4], 1, generator=g))
         ).to(dtype)
    return k, v


def _primary_slots(budget, prefix, recent, ratio):
    return int(ratio * (budget - prefix - recent) + 0.5)


def _both(shape, n, budget, prefix, recent, tpf, ratio=0.5, dtype=torch.float32, dv=None,
          seed=0, section=None, scores=None):
    k, v = _bufs(shape, dv, dtype, seed)
    kr, vr = k.clone(), v.clone()
    inv = _inv_freq(shape[4])
    kw = dict(budget=budget, prefix=prefix, recent=recent, inv_freq=inv, mrope_section=section)
    if scores is None:
        res = kv_compact(k, v, n, tokens_per_frame=tpf, tar_ratio=ratio, **kw)
        ps = _primary_slots(budget, prefix, recent, ratio)
    else:
        res = kv_compact(k, v, n, scores=scores, **kw)
        ps, tpf = budget - prefix - recent, 0
    rn, rkeep, rscore = ref(kr, vr, n, inv, budget=budget, prefix=prefix, recent=recent,
                            tokens_per_frame=tpf, primary_slots=ps, scores=scores,
                            mrope_section=section)
    return res, (k, v), (rn, rkeep, rscore, kr, vr), ps


CASES = [  # shape (L, B, H, C, D), n, budget, prefix, recent, tokens_per_frame
    ((2, 1, 3, 60, 64), 60, 36, 3, 8, 4),    # full buffer, budget 36 > window 24
    ((1, 2, 2, 70, 80), 55, 20, 5, 6, 3),    # ragged, head dim 80
    ((3, 1, 1, 45, 32), 45, 13, 0, 4, 4),    # no prefix
    ((1, 1, 2, 40, 64), 40, 12, 2, 10, 5),   # recent is most of the budget
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_kept_set_equals_reference_fp64(case, ratio):
    shape, n, budget, prefix, recent, tpf = case
    res, (k, v), (rn, rkeep, rscore, kr, vr), _ = _both(shape, n, budget, prefix, recent, tpf,
                                                        ratio, torch.float64)
    assert int(res.new_length) == rn == min(n, budget)
    assert torch.equal(res.keep, rkeep)
    torch.testing.assert_close(res.score, rscore, atol=1e-6, rtol=1e-6)
    nl = rn
    torch.testing.assert_close(k[..., :nl, :], kr[..., :nl, :], atol=1e-6, rtol=1e-6)
    assert torch.equal(v[..., :nl, :], vr[..., :nl, :])
    assert torch.equal(res.keep.sum(-1), torch.full(shape[:3], rn))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:2])
def test_dtypes_scores_selection_and_moves(case, dtype):
    """Scores match the reference within the dtype's tolerance; the kept set is exactly the
    reference selection on the kernel's own fp32 scores; rows moved exactly as the
    reference moves that set (values bit-exact)."""
    shape, n, budget, prefix, recent, tpf = case
    k, v = _bufs(shape, None, dtype)
    k0, v0 = k.clone(), v.clone()
    inv = _inv_freq(shape[4])
    res = kv_compact(k, v, n, budget=budget, prefix=prefix, recent=recent, inv_freq=inv,
                     tokens_per_frame=tpf)
    ps = _primary_slots(budget, prefix, recent, 0.5)
    _, _, rscore = ref(k0.clone(), v0.clone(), n, inv, budget=budget, prefix=prefix,
                       recent=recent, tokens_per_frame=tpf, primary_slots=ps)
    torch.testing.assert_close(res.score, rscore, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    freqs = rotation_freqs(inv, None)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape[:3]]).tolist():
        li, bi, hi = idx
        want = select_rows(res.score[0, li, bi, hi], res.score[1, li, bi, hi], n, budget,
                           prefix, recent, ps)
        assert torch.equal(res.keep[li, bi, hi], want), idx
        kk, vv = k0[li, bi, hi].clone(), v0[li, bi, hi].clone()
        move_kept(kk, vv, want, freqs)
        nl = min(n, budget)
        torch.testing.assert_close(k[li, bi, hi, :nl], kk[:nl], atol=TOL[dtype],
                                   rtol=TOL[dtype])
        assert torch.equal(v[li, bi, hi, :nl], vv[:nl])


def test_ties_earlier_row_wins_and_nan_lowest():
    shape = (2, 1, 2, 50, 16)
    g = torch.Generator().manual_seed(3)
    sc = torch.randint(0, 3, shape[:4], generator=g).float()  # heavy ties
    sc[0, 0, 0, 10:20] = float("nan")
    sc[0, 0, 1] = 1.0  # all equal: the earliest candidates win
    sc[1, 0, 0, 5:9] = -0.0
    res, (_k, _v), (_rn, rkeep, *_), _ = _both(shape, 50, 20, 2, 4, 0, scores=sc)
    assert torch.equal(res.keep, rkeep)
    head = res.keep[0, 0, 1]
    assert head[:16].all() and not head[16:46].any() and head[46:].all()  # 2 + 14 + 4
    nan_head = res.keep[0, 0, 0]
    assert not nan_head[10:20].any()  # NaN ranks below every finite score


def test_scores_with_strides_attention_mass_style():
    """A (L, B, C) mass expanded over heads (stride 0) is read through its strides."""
    shape = (2, 1, 3, 40, 16)
    mass = torch.rand(2, 1, 40)
    sc = mass[:, :, None, :].expand(shape[:4])
    res, _, (_rn, rkeep, rscore, *_), _ = _both(shape, 38, 15, 1, 4, 0, scores=sc)
    assert torch.equal(res.keep, rkeep)
    assert torch.equal(res.keep[:, :, 0], res.keep[:, :, 2])
    torch.testing.assert_close(res.score, rscore)


@pytest.mark.parametrize(("budget", "prefix", "recent"), [(1, 0, 0), (1, 0, 1), (1, 1, 0)])
def test_budget_one(budget, prefix, recent):
    shape = (1, 1, 2, 20, 16)
    sc = torch.rand(shape[:4], generator=torch.Generator().manual_seed(1))
    res, (k, v), (_rn, rkeep, _, kr, vr), _ = _both(shape, 17, budget, prefix, recent, 0,
                                                   scores=sc)
    assert int(res.new_length) == 1 and torch.equal(res.keep, rkeep)
    assert torch.equal(res.keep.sum(-1), torch.ones(1, 1, 2, dtype=torch.long))
    if recent:
        assert res.keep[..., 16].all()
    elif prefix:
        assert res.keep[..., 0].all()
    else:
        assert torch.equal(res.keep[0, 0].float().argmax(-1), sc[0, 0, :, :17].argmax(-1))
    torch.testing.assert_close(k[..., :1, :], kr[..., :1, :])
    assert torch.equal(v[..., :1, :], vr[..., :1, :])


@pytest.mark.parametrize("n", [0, 5, 24, 25])
def test_fits_in_budget_is_a_noop(n):
    shape = (2, 1, 2, 40, 16)
    k, v = _bufs(shape)
    k0, v0 = k.clone(), v.clone()
    res = kv_compact(k, v, n, budget=25, prefix=2, recent=4, tokens_per_frame=2,
                     inv_freq=_inv_freq(16))
    assert int(res.new_length) == n
    assert torch.equal(k, k0) and torch.equal(v, v0)
    assert res.keep[..., :n].all() and not res.keep[..., n:].any()


def test_protected_prefix_and_recent_positions():
    """Prefix rows stay put; the recent frames land at [budget - r, budget) with keys equal
    to a fresh RoPE at their new slot (positions are slots)."""
    L, H, C, D, n, budget, p, r = 2, 2, 50, 64, 48, 24, 3, 8
    inv = _inv_freq(D, 1e6)
    raw = torch.randn(L, 1, H, C, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(C), inv)
    k = apply_rope(raw, cos.double(), sin.double())
    v = raw.clone()
    k_before = k.clone()
    res = kv_compact(k, v, n, budget=budget, prefix=p, recent=r, tokens_per_frame=4,
                     inv_freq=inv)
    assert torch.equal(k[..., :p, :], k_before[..., :p, :])
    c2, s2 = rope_cos_sin(torch.arange(budget - r, budget), inv)
    want = apply_rope(raw[..., n - r:n, :], c2.double(), s2.double())
    torch.testing.assert_close(k[..., budget - r:budget, :], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(v[..., budget - r:budget, :], raw[..., n - r:n, :])
    # every kept key sits at its new slot's position
    for li in range(L):
        for hi in range(H):
            src = torch.nonzero(res.keep[li, 0, hi]).flatten()
            c3, s3 = rope_cos_sin(torch.arange(budget), inv)
            want = apply_rope(raw[li, 0, hi, src], c3.double(), s3.double())
            torch.testing.assert_close(k[li, 0, hi, :budget], want, atol=1e-5, rtol=1e-5)


def test_mrope_section_rotates_temporal_pairs_only():
    shape = (1, 1, 2, 40, 32)  # D/2 = 16 pairs: (t, h, w) = (4, 6, 6)
    res, (k, _v), (_rn, rkeep, _, kr, _vr), _ = _both(shape, 40, 16, 2, 4, 2, dtype=torch.float64,
                                                   section=[4, 6, 6])
    assert torch.equal(res.keep, rkeep)
    torch.testing.assert_close(k[..., :16, :], kr[..., :16, :], atol=1e-6, rtol=1e-6)
    # spatial pairs (4..16 and 20..32) are moved without rotation
    k0, _ = _bufs(shape, dtype=torch.float64)
    src = torch.nonzero(res.keep[0, 0, 0]).flatten()
    assert torch.equal(k[0, 0, 0, :16, 4:16], k0[0, 0, 0, src, 4:16])
    assert not torch.allclose(k[0, 0, 0, :16, :4], k0[0, 0, 0, src, :4])


@pytest.mark.parametrize("device_length", [False, True])
def test_poisoned_rows_never_visible(device_length):
    """NaN rows past the valid length: scores, kept rows and attention over the new length
    stay finite; the poison is never moved into a kept row."""
    from lvlm_fast.ops import summary_attention

    L, H, C, D, n, budget = 2, 2, 64, 64, 44, 20
    k, v = _bufs((L, 1, H, C, D))
    k[..., n:, :] = float("nan")
    v[..., n:, :] = float("nan")
    length = torch.tensor(n) if device_length else n
    res = kv_compact(k, v, length, budget=budget, prefix=2, recent=6, tokens_per_frame=3,
                     inv_freq=_inv_freq(D))
    nl = int(res.new_length)
    assert nl == budget
    assert torch.isfinite(res.score).all()
    assert not res.keep[..., n:].any()
    assert torch.isfinite(k[..., :nl, :]).all() and torch.isfinite(v[..., :nl, :]).all()
    q = torch.randn(1, 4, 5, D)
    for li in range(L):
        out = summary_attention(q, k[li, :, :, :nl], v[li, :, :, :nl])
        assert torch.isfinite(out).all()


def test_device_length_is_clamped_and_equals_host_length():
    shape = (1, 1, 2, 30, 16)
    k1, v1 = _bufs(shape)
    k2, v2 = k1.clone(), v1.clone()
    kw = dict(budget=10, prefix=1, recent=2, tokens_per_frame=1, inv_freq=_inv_freq(16))
    a = kv_compact(k1, v1, 30, **kw)
    b = kv_compact(k2, v2, torch.tensor([99]), **kw)  # clamped to C = 30
    assert a.new_length.item() == b.new_length.item() == 10
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(a.keep, b.keep)


def test_stacked_layer_views_no_copy():
    L, shape = 3, (1, 2, 30, 16)
    stacked_k, stacked_v = _bufs((L, *shape))
    ref_k, ref_v = stacked_k.clone(), stacked_v.clone()
    layers_k = [stacked_k[i] for i in range(L)]
    layers_v = [stacked_v[i] for i in range(L)]
    view = stacked_layer_view(layers_k, "key")
    assert view.data_ptr() == stacked_k.data_ptr() and view.shape == stacked_k.shape
    kw = dict(budget=12, prefix=1, recent=4, tokens_per_frame=2, inv_freq=_inv_freq(16))
    kv_compact(layers_k, layers_v, 28, **kw)
    kv_compact(ref_k, ref_v, 28, **kw)
    assert torch.equal(stacked_k, ref_k) and torch.equal(stacked_v, ref_v)
    with pytest.raises(ValueError, match="equally spaced views of one storage"):
        stacked_layer_view([torch.zeros(shape), torch.zeros(shape)], "key")


@settings(max_examples=25, deadline=None)
@given(c=st.integers(4, 48), n_frac=st.floats(0, 1), prefix=st.integers(0, 4),
       frames=st.integers(0, 3), tpf=st.integers(1, 4), extra=st.integers(0, 20),
       ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]), seed=st.integers(0, 99))  # fmt: skip
def test_hypothesis_vs_reference(c, n_frac, prefix, frames, tpf, extra, ratio, seed):
    recent = frames * tpf
    budget = max(1, prefix + recent + extra)
    n = int(n_frac * c)
    if frames == 0:
        ratio = 0.0
    res, (k, v), (rn, rkeep, _rscore, kr, vr), _ = _both(
        (1, 1, 2, c, 16), n, budget, prefix, recent, tpf if frames else 0, ratio,
        torch.float64, seed=seed)
    assert int(res.new_length) == rn
    assert torch.equal(res.keep, rkeep)
    torch.testing.assert_close(k[..., :rn, :], kr[..., :rn, :], atol=1e-6, rtol=1e-6)
    assert torch.equal(v[..., :rn, :], vr[..., :rn, :])


def test_value_head_dim_differs():
    res, (_k, v), (rn, rkeep, rscore, _kr, vr), _ = _both((1, 1, 2, 30, 16), 30, 12, 1, 4, 2,
                                                        dtype=torch.float64, dv=24)
    assert torch.equal(res.keep, rkeep)
    torch.testing.assert_close(res.score, rscore, atol=1e-6, rtol=1e-6)
    assert torch.equal(v[..., :rn, :], vr[..., :rn, :])


def test_opcheck_and_meta():
    k, v = _bufs((2, 1, 2, 30, 16))
    args = (k, v, torch.tensor(28), _inv_freq(16), None, 12, 1, 4, 2, 4, 8)
    torch.library.opcheck(torch.ops.lvlm_fast.kv_compact.default, args)
    sc = torch.rand(2, 1, 2, 30)
    torch.library.opcheck(torch.ops.lvlm_fast.kv_compact.default,
                          (k, v, torch.tensor(28), _inv_freq(16), sc, 12, 1, 4, 0, 7, 8))
    km = torch.empty(28, 1, 4, 7000, 128, device="meta", dtype=torch.bfloat16)
    res = kv_compact(km, km.clone(), torch.empty((), dtype=torch.int64, device="meta"),
                     budget=6000, prefix=14, recent=1568, tokens_per_frame=196,
                     inv_freq=torch.empty(64, device="meta"))
    assert res.keep.shape == (28, 1, 4, 7000) and res.score.shape == (2, 28, 1, 4, 7000)
    assert res.new_length.shape == () and res.new_length.dtype == torch.int64


def test_torch_compile_fullgraph():
    k, v = _bufs((2, 1, 2, 30, 16))
    kr, vr = k.clone(), v.clone()
    inv = _inv_freq(16)
    length = torch.tensor(29)

    def f(k, v, length):
        res = kv_compact(k, v, length, budget=12, prefix=1, recent=4, tokens_per_frame=2,
                         inv_freq=inv)
        return res.new_length + 0, res.keep, res.score

    nl, keep, _score = torch.compile(f, fullgraph=True)(k, v, length)
    want = kv_compact(kr, vr, length, budget=12, prefix=1, recent=4, tokens_per_frame=2,
                      inv_freq=inv)
    assert nl.item() == 12 and torch.equal(keep, want.keep)
    assert torch.equal(k, kr) and torch.equal(v, vr)


def test_requires_grad_rejected():
    k, v = _bufs((1, 1, 1, 10, 8))
    with pytest.raises(ValueError, match=r"key requires grad.*not differentiable"):
        kv_compact(k.requires_grad_(), v, 10, budget=4, inv_freq=_inv_freq(8), tar_ratio=0)


BAD = [
    (dict(budget=0), ValueError, ["budget", ">= 1"]),
    (dict(budget=5), ValueError, ["budget", "prefix + recent"]),
    (dict(prefix=-1), ValueError, ["prefix"]),
    (dict(budget=12.0), TypeError, ["budget", "int"]),
    (dict(length=41), ValueError, ["length", "capacity"]),
    (dict(length=torch.tensor(3.0)), TypeError, ["length"]),
    (dict(length=torch.tensor([1, 2])), ValueError, ["length", "1-element"]),
    (dict(tokens_per_frame=0), ValueError, ["tokens_per_frame", "TaR"]),
    (dict(recent=5), ValueError, ["recent", "multiple of tokens_per_frame"]),
    (dict(tar_ratio=1.5), ValueError, ["tar_ratio", "[0, 1]"]),
    (dict(scores=torch.zeros(1, 1, 2, 40), tar_ratio=0.5), ValueError, ["tar_ratio", "scores"]),
    (dict(scores=torch.zeros(1, 1, 2, 41)), ValueError, ["scores", "(L, B, H, C)"]),
    (dict(inv_freq=torch.ones(7)), ValueError, ["inv_freq", "D/2"]),
    (dict(mrope_section=[2, 2, 2]), ValueError, ["mrope_section", "D/2"]),
    (dict(value=torch.zeros(1, 1, 2, 41, 16)), ValueError, ["value", "(L, B, H, C, Dv)"]),
    (dict(key=torch.zeros(1, 1, 2, 40, 16, dtype=torch.float64)), TypeError, ["dtype"]),
    (dict(key=torch.zeros(1, 2, 40, 16)), ValueError, ["key", "5-D"]),
    (dict(key=torch.zeros(1, 1, 2, 40, 15), value=torch.zeros(1, 1, 2, 40, 15),
          inv_freq=torch.ones(7)), ValueError, ["head dim", "even"]),
]


@pytest.mark.parametrize(("kw", "err", "words"), BAD)
def test_bad_input_names_the_argument_and_writes_nothing(kw, err, words):
    k, v = _bufs((1, 1, 2, 40, 16))
    args = dict(key=k, value=v, length=40, budget=12, prefix=2, recent=4, tokens_per_frame=2,
                inv_freq=_inv_freq(16))
    args.update(kw)
    if "scores" in kw:
        args.pop("tokens_per_frame")
    k0, v0 = k.clone(), v.clone()
    key, value, length = args.pop("key"), args.pop("value"), args.pop("length")
    with pytest.raises(err) as e:
        kv_compact(key, value, length, **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_raw_op_checks():
    k, v = _bufs((1, 1, 2, 40, 16))
    with pytest.raises(RuntimeError, match="prefix \\+ recent <= budget"):
        torch.ops.lvlm_fast.kv_compact(k, v, torch.tensor(40), _inv_freq(16), None, 4, 3, 3,
                                       0, 0, 8)
    with pytest.raises(RuntimeError, match="inv_freq"):
        torch.ops.lvlm_fast.kv_compact(k, v, torch.tensor(40), _inv_freq(8), None, 12, 1, 1,
                                       0, 0, 8)


def test_seed_baseline_keeps_the_same_rows():
    """The benchmark's seed (the released per-layer gather + cat) and the fused op keep the
    same rows when tar_ratio gives TaR the seed's TaR slots (the released ratio counts the
    recent frames inside TaR's share)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:  # benchmarks/ is not installed (as in test_benchmarks.py)
        sys.path.insert(0, root)
    from benchmarks.seed.infinipot_v import seed_process_kv_cache

    L, H, D, P, sys_len, frames, keep_f, recent_f = 3, 2, 32, 9, 5, 8, 5, 2
    c = sys_len + frames * P
    k, v = _bufs((L, 1, H, c, D), seed=4)
    keys, values = [k[i].clone() for i in range(L)], [v[i].clone() for i in range(L)]
    _, new_v, kept = seed_process_kv_cache(keys, values, sys_len, P, keep_f, recent_f)
    keep_tokens, recent = keep_f * P, recent_f * P
    tar_slots = keep_tokens - round(0.5 * keep_tokens) - recent
    budget = sys_len + keep_tokens
    res = kv_compact(k, v, c, budget=budget, prefix=sys_len, recent=recent,
                     tokens_per_frame=P, tar_ratio=tar_slots / (budget - sys_len - recent),
                     inv_freq=_inv_freq(D))
    for li in range(L):
        want = torch.zeros(H, c, dtype=torch.bool)
        want[:, :sys_len] = True
        want.scatter_(1, kept[li] + sys_len, True)
        assert torch.equal(res.keep[li, 0], want)
        assert torch.equal(v[li, 0, :, :budget], new_v[li][0])  # values: same rows, same order
