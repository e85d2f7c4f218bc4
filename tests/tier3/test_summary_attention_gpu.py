"""Tier 3: summary_attention on CUDA (Triton) in bf16/fp16/fp32 vs the reference."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import summary_attention
from lvlm_fast.reference import summary_attention as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_forward_backward_cuda(dtype, d):
    torch.manual_seed(0)
    kbuf = torch.randn(1, 4, 3000, d, device="cuda", dtype=dtype)
    vbuf = torch.randn(1, 4, 3000, d, device="cuda", dtype=dtype)
    k, v = kbuf[:, :, :2100], vbuf[:, :, :2100]
    q = torch.randn(1, 1530, 28, d, device="cuda", dtype=dtype).transpose(1, 2)
    q.requires_grad_(True)
    out, mass = summary_attention(q, k, v, return_key_mass=True)
    qr = q.detach().float().requires_grad_(True)
    r, rmass = ref(qr, k.float(), v.float(), return_key_mass=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=1e-2, rtol=1e-3)
    go = torch.randn_like(r)
    out.backward(go.to(dtype))
    r.backward(go)
    torch.testing.assert_close(q.grad.float(), qr.grad, atol=tol * 4, rtol=tol * 4)


def test_fp64_runs_on_cuda():
    # issue 9.4: fp64 inputs used to reach the Triton kernel, which Triton rejects at compile
    # time; they now run the reference on the device (forward and backward)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 64, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    k = torch.randn(1, 2, 23, 64, generator=g, dtype=torch.float64).cuda()
    out = summary_attention(q, k, k)
    r = ref(q.detach().cpu(), k.cpu(), k.cpu())
    torch.testing.assert_close(out.detach().cpu(), r, atol=1e-12, rtol=1e-12)
    out.sum().backward()
    assert q.grad.dtype == torch.float64 and torch.isfinite(q.grad).all()


def test_output_rows_past_2_31_elements():
    # issue 9.6: out is a view of (B, Lq, Hq, D), so row * stride passes 2^31 elements at
    # Lq * Hq * D >= 2^31 (here 131,073 x 128 x 128, 4.3 GB per bf16 tensor). With int32
    # offsets the last rows of the last heads were written to wrapped addresses.
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GB of free GPU memory")
    hq, d, lq = 128, 128, 2**17 + 1
    assert (lq - 1) * hq * d >= 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, hq, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 1, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 1, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out = summary_attention(q, k, v)
    for h, i in ((hq - 1, lq - 1), (hq - 1, lq - 2), (hq // 2, lq - 1), (0, 5), (hq - 1, 7)):
        s = (q[0, h, i].float() @ k[0, 0, : i + 1].float().T) / d**0.5
        want = torch.softmax(s, -1) @ v[0, 0, : i + 1].float()
        torch.testing.assert_close(out[0, h, i].float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("hq", "hkv", "lq", "s", "d"), [
    (28, 4, 1, 131_072, 128), (28, 4, 16, 20_000, 128), (8, 8, 3, 5_000, 64),
    (32, 4, 4, 9_000, 80),
])  # fmt: skip
def test_splitkv_decode_cuda(dtype, hq, hkv, lq, s, d):
    # issue 14.2.1: Lq <= 16 without key mass runs the split-KV kernel + the lse merge
    torch.manual_seed(0)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype)
    q = torch.randn(1, lq, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
    out = summary_attention(q, k, v)
    r = ref(q.float(), k.float(), v.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("d", [64, 128])
def test_autotuned_prefill_cuda(monkeypatch, d):
    # issue 14.2.2: LVLM_FAST_AUTOTUNE=1 tunes fwd / dK,dV / dQ over their spaces on CUDA
    monkeypatch.setenv("LVLM_FAST_AUTOTUNE", "1")
    torch.manual_seed(0)
    k = torch.randn(1, 4, 2100, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4, 2100, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 600, 28, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q.requires_grad_(True)
    out = summary_attention(q, k, v)
    qr = q.detach().float().requires_grad_(True)
    r = ref(qr, k.float(), v.float())
    torch.testing.assert_close(out.float(), r, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(r)
    out.backward(go.to(out.dtype))
    r.backward(go)
    torch.testing.assert_close(q.grad.float(), qr.grad, atol=8e-2, rtol=8e-2)
