"""Tier 1: summary_attention Triton kernels (fwd with key mass, dK/dV, dQ) in the
interpreter, on CPU tensors, vs the reference. fp32 and fp16; head dim 80, GQA,
non-power-of-two lengths, strided cache views, Lq = 1."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import summary_attention as kern

from lvlm_fast.reference import summary_attention as ref

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _inputs(b, hq, hkv, lq, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kbuf = torch.randn(b, hkv, s + 9, d, generator=g).to(dtype)
    vbuf = torch.randn(b, hkv, s + 9, d, generator=g).to(dtype)
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype).transpose(1, 2)
    return q, kbuf[:, :, :s], vbuf[:, :, :s]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "s", "d"), [
    (1, 4, 2, 37, 101, 80), (2, 2, 1, 1, 29, 64), (1, 3, 3, 70, 70, 96),
])  # fmt: skip
def test_forward_backward(launched, dtype, b, hq, hkv, lq, s, d):
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype)
    scale = 1 / math.sqrt(d)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, scale, True)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    r, rmass = ref(qq, kk, vv, return_key_mass=True)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=1e-4, rtol=1e-4)
    assert out.transpose(1, 2).is_contiguous()
    go = torch.randn(r.shape, dtype=torch.float64)
    r.backward(go)
    dq, dk, dv = kern.summary_attention_bwd(go.to(dtype), q, k, v, out, lse, scale)
    for a, e in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        torch.testing.assert_close(a.double(), e, atol=tol * 4, rtol=tol * 4)
    names = {f.fn.__name__ for f in launched}
    assert names == {"_summary_attention_fwd_kernel", "_summary_attention_mass_kernel",
                     "_summary_attention_bwd_kernel", "_summary_attention_bwd_dq_kernel"}
    for f in launched:
        assert_interpreted(f)


def test_no_mass_leaves_empty(launched):
    q, k, v = _inputs(1, 2, 2, 5, 9, 64, torch.float32)
    out, _, mass = kern.summary_attention_fwd(q, k, v, 0.125, False)
    assert mass.numel() == 0
    torch.testing.assert_close(out, ref(q, k, v, scale=0.125), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- issue 9.4 / 9.6
class _Recorder:
    """Stands in for a Triton kernel: records the launch's constexprs, launches nothing."""

    def __init__(self):
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)

        return launch


def _patch_kernels(monkeypatch):
    recs = {}
    for name in ("_summary_attention_fwd_kernel", "_summary_attention_mass_kernel",
                 "_summary_attention_bwd_kernel", "_summary_attention_bwd_dq_kernel"):
        recs[name] = _Recorder()
        monkeypatch.setattr(kern, name, recs[name])
    return recs


def test_launcher_picks_int64_rows_at_600k_queries(monkeypatch):
    # issue 9.6: out is a (B, Hq, Lq, D) view of (B, Lq, Hq, D): its row stride is Hq * D,
    # so offs_m * stride passes 2^31 at ~600K query rows (Hq = 28, D = 128) while q, k and
    # v (contiguous per head) stay below. On the meta device (no memory, no launch) the
    # launcher must pick int64 row offsets there, and int32 at the usual sizes.
    recs = _patch_kernels(monkeypatch)
    lq = 600_000
    assert (lq - 1) * 28 * 128 + 128 >= 2**31 > lq * 128
    q = torch.empty(1, 28, lq, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 4, lq, 128, device="meta", dtype=torch.bfloat16)
    out, lse, _ = kern.summary_attention_fwd(q, k, k, 0.1, False)
    assert out.stride(2) == 28 * 128
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is True
    # a grad_out laid out like out (what autograd hands back for out's layout) likewise
    kern.summary_attention_bwd(out, q, k, k, out, lse, 0.1)
    assert recs["_summary_attention_bwd_kernel"].calls[-1]["I64"] is True
    assert recs["_summary_attention_bwd_dq_kernel"].calls[-1]["I64"] is True
    # the usual window (Lq = 1,530 queries over a 3,000-row cache): int32
    small_q = torch.empty(1, 28, 1530, 128, device="meta", dtype=torch.bfloat16)
    small_k = torch.empty(1, 4, 3000, 128, device="meta", dtype=torch.bfloat16)
    out, lse, _ = kern.summary_attention_fwd(small_q, small_k, small_k, 0.1, False)
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is False
    kern.summary_attention_bwd(small_q, small_q, small_k, small_k, out, lse, 0.1)
    assert recs["_summary_attention_bwd_kernel"].calls[-1]["I64"] is False


def test_launcher_picks_int64_for_a_huge_cache_stride(monkeypatch):
    # a k/v view into a cache whose row stride is huge (e.g. a (cap, Hkv*D) buffer viewed
    # per head): the span inside one head's slice, not the number of rows, decides
    recs = _patch_kernels(monkeypatch)
    q = torch.empty(1, 2, 20, 64, device="meta")
    kv = torch.empty(1, 2, 24, 64, device="meta").as_strided((1, 2, 24, 64), (0, 64, 2**29, 1))
    kern.summary_attention_fwd(q, kv, kv, 0.1, False)
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is True
    # the split-KV (decode) path likewise
    recs["split"] = _Recorder()
    monkeypatch.setattr(kern, "_summary_attention_splitkv_kernel", recs["split"])
    monkeypatch.setattr(kern, "merge_partials", lambda o, l_, out: torch.empty(l_.shape[1:]))
    kern.summary_attention_fwd(q[:, :, :1], kv, kv, 0.1, False)
    assert recs["split"].calls[-1]["I64"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int64_row_path_matches_reference(monkeypatch, launched, dtype):
    # the int64 branch of every kernel, forced at a small size (the threshold lowered to 0),
    # computes what the int32 branch does
    monkeypatch.setattr(kern, "INT32_SPAN", 0)
    b, hq, hkv, lq, s, d = 1, 4, 2, 37, 101, 80
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, 0.1, True)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    r, rmass = ref(qq, kk, vv, scale=0.1, return_key_mass=True)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=1e-4, rtol=1e-4)
    go = torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r.backward(go)
    grads = kern.summary_attention_bwd(go.to(dtype), q, k, v, out, lse, 0.1)
    for a, e in zip(grads, (qq.grad, kk.grad, vv.grad), strict=True):
        torch.testing.assert_close(a.double(), e, atol=tol * 4, rtol=tol * 4)
    assert launched and all(f.fn.__name__.startswith("_summary_attention") for f in launched)


def test_fp64_runs_the_reference_not_triton(monkeypatch):
    # issue 9.4: Triton rejects the fp64 kernels at compile time (the interpreter does not,
    # so this test pins the routing, and tier 2 pins the rejection): fp64 must never reach
    # a kernel, forward or backward, and must still give the reference's float64 result.
    recs = _patch_kernels(monkeypatch)
    q, k, v = _inputs(1, 4, 2, 9, 23, 64, torch.float64)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, 0.125, True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.transpose(1, 2).is_contiguous()
    r, rmass = ref(q, k, v, scale=0.125, return_key_mass=True)
    torch.testing.assert_close(out, r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mass, rmass.float())
    grads = kern.summary_attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == torch.float64 for g in grads)
    assert not any(rec.calls for rec in recs.values())


# --------------------------------------------------------------------------- issue 14.2.1
@pytest.mark.parametrize(("dtype", "b", "hq", "hkv", "lq", "s", "d"), [
    (torch.float16, 1, 8, 1, 1, 2000, 64),    # decode, G = 8, 8 splits of 256 keys
    (torch.float32, 1, 4, 2, 16, 700, 80),    # Lq 16, G 2, ragged last split, Dh 80
    (torch.float16, 2, 3, 3, 5, 333, 128),    # G 1 (MHA), batch 2
    (torch.float32, 1, 8, 1, 16, 300, 64),    # G 8 x Lq 16 = 128 rows: four row blocks
    (torch.float16, 1, 28, 4, 1, 900, 128),   # the 7B decode shape (G 7) at a short cache
])  # fmt: skip
def test_splitkv_decode_matches_reference(launched, dtype, b, hq, hkv, lq, s, d):
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype, seed=3)
    scale = 1 / math.sqrt(d)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, scale, False)
    assert mass.numel() == 0
    names = [f.fn.__name__ for f in launched]
    assert names == ["_summary_attention_splitkv_kernel", "_lse_merge_kernel"], names
    for f in launched:
        assert_interpreted(f)
    r = ref(q.double(), k.double(), v.double(), scale=scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    assert out.transpose(1, 2).is_contiguous()
    # lse matches the reference's (it is what the backward reads)
    from lvlm_fast.reference.summary_attention import bottom_right_mask

    g = hq // hkv
    sc = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    sc = sc.masked_fill(~bottom_right_mask(lq, s, q.device), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(sc, -1), atol=1e-4, rtol=1e-4)
    # the backward runs on the split path's out / lse
    dq, dk, dv = kern.summary_attention_bwd(torch.ones_like(out), q, k, v, out, lse, scale)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_splitkv_split_with_no_visible_key_for_some_rows(monkeypatch, launched):
    # short splits: the last split [64, 70) holds no key that the first queries can see
    # (row i sees j <= 54 + i), so those partials are empty (lse -inf) and must merge to 0
    monkeypatch.setattr(kern, "SPLITKV_MIN_KEYS", 8)
    q, k, v = _inputs(1, 4, 2, 16, 70, 64, torch.float32, seed=5)
    out, lse, _ = kern.summary_attention_fwd(q, k, v, 0.125, False)
    assert kern.splitkv_splits(70, 1, 32)[0] == 3
    torch.testing.assert_close(out, ref(q, k, v, scale=0.125), atol=2e-5, rtol=2e-5)
    assert torch.isfinite(lse).all()


def test_splitkv_chosen_only_for_small_lq_without_mass(monkeypatch):
    recs = _patch_kernels(monkeypatch)
    for name in ("_summary_attention_splitkv_kernel",):
        recs[name] = _Recorder()
        monkeypatch.setattr(kern, name, recs[name])
    monkeypatch.setattr(kern, "merge_partials", lambda o, l_, out: torch.empty(l_.shape[1:]))
    kv = torch.empty(1, 4, 100_000, 128, device="meta", dtype=torch.bfloat16)
    q = torch.empty(1, 28, 1, 128, device="meta", dtype=torch.bfloat16)
    kern.summary_attention_fwd(q, kv, kv, 0.1, False)
    assert len(recs["_summary_attention_splitkv_kernel"].calls) == 1
    kern.summary_attention_fwd(q, kv, kv, 0.1, True)  # key mass: the one-pass kernel
    assert len(recs["_summary_attention_fwd_kernel"].calls) == 1
    q = torch.empty(1, 28, 17, 128, device="meta", dtype=torch.bfloat16)
    kern.summary_attention_fwd(q, kv, kv, 0.1, False)
    assert len(recs["_summary_attention_fwd_kernel"].calls) == 2
    # 7B decode at S = 100K: 4 KV groups x 1 row block; splits fill ~4 waves of 132 SMs
    nsplit, per = kern.splitkv_splits(100_000, 4, 64)
    assert nsplit * 4 >= 132 * 3 and per % 64 == 0 and nsplit * per >= 100_000


def test_key_mass_is_deterministic(launched):
    # issue 14.2.3: key mass from per-(b, KV head) partials, no atomics: bitwise repeatable
    q, k, v = _inputs(1, 6, 2, 40, 90, 64, torch.float16, seed=2)
    a = kern.summary_attention_fwd(q, k, v, 0.125, True)[2]
    b = kern.summary_attention_fwd(q, k, v, 0.125, True)[2]
    assert torch.equal(a, b)
    _, rmass = ref(q.double(), k.double(), v.double(), scale=0.125, return_key_mass=True)
    torch.testing.assert_close(a, rmass.float(), atol=1e-3, rtol=1e-3)
    assert "_summary_attention_mass_kernel" in {f.fn.__name__ for f in launched}


# --------------------------------------------------------------------------- issue 14.2.2
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_prefill_tiles_per_head_dim_are_in_the_autotune_space(dtype):
    # head dims 80 / 96 / 128 pad to BLOCK_D 128; int32 rows: the defaults are space entries
    for fn, space in ((kern.fwd_config, kern.FWD_SPACE), (kern.bwd_config, kern.BWD_SPACE),
                      (kern.dq_config, kern.DQ_SPACE)):
        c = fn(dtype, 128)
        assert (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) in space
    for m, n, w, st in kern.FWD_SPACE + kern.BWD_SPACE + kern.DQ_SPACE:
        assert m <= 128 and n <= 128 and 2 <= st <= 4 and w in (4, 8)
    # every space entry is in the tier-2 compile matrix
    names = {s["name"] for s in kern.COMPILE_SPECS}
    for kind, space in (("fwd", kern.FWD_SPACE), ("bwd", kern.BWD_SPACE), ("dq", kern.DQ_SPACE)):
        for m, n, w, st in space:
            assert f"space_{kind}_m{m}_n{n}_w{w}_s{st}_bf16_d128" in names


def test_autotune_only_on_cuda_when_enabled(monkeypatch):
    q = torch.empty(1, 2, 3, 128, dtype=torch.float16)
    monkeypatch.setenv("LVLM_FAST_AUTOTUNE", "1")
    assert not kern.use_autotune(q, False)  # CPU tensors (the interpreter): never
    qm = torch.empty(1, 2, 3, 128, dtype=torch.float16, device="meta")
    assert not kern.use_autotune(qm, False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kern.use_autotune(q, False)
    assert not kern.use_autotune(q, True)  # int64 rows: the conservative defaults
    assert not kern.use_autotune(q.float(), False)
    monkeypatch.setenv("LVLM_FAST_AUTOTUNE", "0")
    assert not kern.use_autotune(q, False)
    tuned = kern.autotuned("fwd")
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in tuned.configs] == kern.FWD_SPACE


@pytest.mark.parametrize("cfg", [(128, 32, 8, 2), (64, 32, 4, 3)])
def test_space_entries_compute_the_reference(monkeypatch, launched, cfg):
    # a non-default space entry (BLOCK_M 128; 3 stages) gives the reference's output
    monkeypatch.setattr(kern, "fwd_config", lambda *a, **k: kern._cfg(cfg))
    q, k, v = _inputs(1, 4, 2, 150, 170, 80, torch.float16, seed=4)
    out, _, _ = kern.summary_attention_fwd(q, k, v, 0.1, False)
    torch.testing.assert_close(out.double(), ref(q.double(), k.double(), v.double(), scale=0.1),
                               atol=3e-3, rtol=3e-3)
