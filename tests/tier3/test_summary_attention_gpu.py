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
