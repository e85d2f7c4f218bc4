"""Tier 3: kv_compact on CUDA (Triton) vs the reference and the CPU kernel: bf16/fp16/fp32,
LLaVA-OneVision-7B-sized heads, poisoned rows, caller scores, no host sync."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import kv_compact
from lvlm_fast.reference.kv_compact import kv_compact as ref
from lvlm_fast.reference.kv_compact import move_kept, rotation_freqs, select_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inv(d):
    return 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _bufs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g)
    v = torch.randn(*shape, generator=g) * (1 + torch.rand(*shape[:4], 1, generator=g))
    return k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_medium(dtype):
    shape, n, budget, prefix, recent, tpf = (2, 1, 2, 300, 80), 290, 150, 7, 40, 20
    k, v = _bufs(shape, dtype)
    k[..., n:, :] = float("nan")
    v[..., n:, :] = float("nan")
    kc, vc = k.cuda(), v.cuda()
    inv = _inv(80)
    res = kv_compact(kc, vc, torch.tensor(n, device="cuda"), budget=budget, prefix=prefix,
                     recent=recent, tokens_per_frame=tpf, inv_freq=inv.cuda())
    ps = int(0.5 * (budget - prefix - recent) + 0.5)
    _, _, rscore = ref(k.clone(), v.clone(), n, inv, budget=budget, prefix=prefix,
                       recent=recent, tokens_per_frame=tpf, primary_slots=ps)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    score = res.score.cpu()
    torch.testing.assert_close(score, rscore, atol=tol * 10, rtol=tol)
    keep, kc, vc = res.keep.cpu(), kc.cpu(), vc.cpu()
    freqs = rotation_freqs(inv, None)
    for li, bi, hi in torch.cartesian_prod(*[torch.arange(s) for s in shape[:3]]).tolist():
        want = select_rows(score[0, li, bi, hi], score[1, li, bi, hi], n, budget, prefix,
                           recent, ps)
        assert torch.equal(keep[li, bi, hi], want)
        kk, vv = k[li, bi, hi].clone(), v[li, bi, hi].clone()
        move_kept(kk, vv, want, freqs)
        torch.testing.assert_close(kc[li, bi, hi, :budget].float(), kk[:budget].float(),
                                   atol=tol * 4, rtol=tol * 4)
        assert torch.equal(vc[li, bi, hi, :budget], vv[:budget])
    assert int(res.new_length) == budget
    assert torch.isfinite(kc[..., :budget, :].float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_7b_sized_cuda_equals_cpu_kernel(dtype):
    """28 layers x 4 KV heads, head dim 128, 196 tokens per frame, 32 frames -> 24."""
    shape = (28, 1, 4, 14 + 32 * 196, 128)
    budget, prefix, recent, tpf = 14 + 24 * 196, 14, 8 * 196, 196
    k, v = _bufs(shape, dtype, seed=1)
    kc, vc = k.cuda(), v.cuda()
    inv = _inv(128)
    kw = dict(budget=budget, prefix=prefix, recent=recent, tokens_per_frame=tpf)
    res_gpu = kv_compact(kc, vc, shape[3], inv_freq=inv.cuda(), **kw)
    res_cpu = kv_compact(k, v, shape[3], inv_freq=inv, **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res_gpu.score.cpu(), res_cpu.score, atol=tol, rtol=tol)
    same = (res_gpu.keep.cpu() == res_cpu.keep).float().mean().item()
    assert same > 0.999  # near-equal scores may order differently after rounding
    assert int(res_gpu.new_length) == budget


def test_caller_scores_and_no_host_sync():
    shape = (4, 1, 4, 1000, 128)
    k, v = _bufs(shape, torch.bfloat16, seed=2)
    sc = torch.randint(0, 5, shape[:4]).float()  # ties
    kc, vc, scc = k.cuda(), v.cuda(), sc.cuda()
    length = torch.tensor(990, device="cuda")
    inv = _inv(128).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = kv_compact(kc, vc, length, budget=400, prefix=10, recent=50, scores=scc,
                         inv_freq=inv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rn, rkeep, _ = ref(k.clone(), v.clone(), 990, inv.cpu(), budget=400, prefix=10,
                       recent=50, primary_slots=340, scores=sc)
    assert torch.equal(res.keep.cpu(), rkeep) and int(res.new_length) == rn
