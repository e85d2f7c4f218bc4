"""Tier 3: ``diff_weighted_pool`` on CUDA (Triton kernels through the registered op), bf16
numerics against the float64 reference on the same rounded values. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GRAD_NAMES = ("x", "query", "ref_bank", "rel", "red")

CONFIGS = {
    "siglip_shared_query": dict(n=8, p=729, d=1152, k=2, refs=[-1, 0, 0, 0, 1, 1, 1, 1]),
    "one_frame": dict(n=1, p=196, d=80, k=1, refs=[0]),
    "query_per_frame": dict(n=5, p=49, d=96, k=3, query="frame", refs=[2, -1, 0, 2, 1]),
    "rel_red": dict(n=4, p=27, d=64, k=2, rel=True, red=True, refs=[0, 1, -1, 1]),
    "no_bank": dict(n=3, p=100, d=130, bank=False),
}


def _inputs(n, p, d, *, k=1, rel=False, red=False, bank=True, query="shared", refs=None):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    da, db = (d + 16 if rel else d), (d - 16 if red else d)
    return {
        "x": rnd(n, p, d),
        "query": rnd(da) if query == "shared" else rnd(n, da),
        "ref_bank": rnd(k, p, db) if bank else None,
        "ref_index": torch.tensor(refs) if bank else None,
        "rel": rnd(n, p, da) if rel else None,
        "red": rnd(n, p, db) if red else None,
    }


def _run(fn, inp, device, dtype, tau, gout):
    leaves = {
        k: (v.to(device=device, dtype=dtype if k != "ref_index" else v.dtype))
        for k, v in inp.items()
        if v is not None
    }
    for k in GRAD_NAMES:
        if k in leaves:
            leaves[k].requires_grad_(True)
    tau_t = torch.tensor(
        tau, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype
    )
    tau_t.requires_grad_(True)
    out = fn(**leaves, tau=tau_t)
    names = [k for k in GRAD_NAMES if k in leaves]
    grads = torch.autograd.grad(
        out, [leaves[k] for k in names] + [tau_t], gout.to(device=device, dtype=out.dtype)
    )
    return out, dict(zip([*names, "tau"], grads, strict=True))


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_bf16_matches_reference(cfg):
    from lvlm_fast.ops import diff_weighted_pool
    from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as reference

    inp = _inputs(**CONFIGS[cfg])
    tau = 0.5
    n, d = inp["x"].shape[0], inp["x"].shape[2]
    gout = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out, grads = _run(diff_weighted_pool, inp, "cuda", torch.bfloat16, tau, gout)
    torch.cuda.synchronize()
    exp, exp_grads = _run(reference, inp, "cpu", torch.float64, tau, gout.double())
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    torch.testing.assert_close(out.double().cpu(), exp, atol=2e-2, rtol=2e-2)
    floor = max(g.abs().max().item() for g in exp_grads.values())
    for name, got in grads.items():
        want = exp_grads[name]
        assert got.shape == want.shape, name
        scale = max(want.abs().max().item(), floor)
        torch.testing.assert_close(got.double().cpu(), want, atol=4e-2 * scale, rtol=4e-2, msg=name)


def test_bf16_weights_and_uniform_case():
    from lvlm_fast.ops import diff_weighted_pool

    x = torch.randn(3, 49, 64, device="cuda", dtype=torch.bfloat16)
    out, w = diff_weighted_pool(
        x, torch.zeros(64, device="cuda", dtype=torch.bfloat16), tau=0.01, return_weights=True
    )
    torch.testing.assert_close(
        w.float(), torch.full((3, 49), 1 / 49, device="cuda"), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(out.float(), x.float().mean(1), atol=2e-2, rtol=2e-2)


def test_strided_ref_index_on_cuda():
    # issue 9.5: the CUDA launcher read ref_index as contiguous; a strided view (idx[::2])
    # must select the same bank rows as its contiguous copy (and the reference).
    from lvlm_fast.ops import diff_weighted_pool
    from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 49, 64, generator=g).cuda()
    bank = torch.randn(3, 49, 64, generator=g).cuda()
    q = torch.randn(64, generator=g).cuda()
    idx = torch.tensor([2, 0, -1, 1, 0, 2, 1, 0], device="cuda")[::2]
    got = diff_weighted_pool(x, q, bank, idx, tau=0.3)
    torch.testing.assert_close(got, diff_weighted_pool(x, q, bank, idx.contiguous(), tau=0.3))
    want = ref(x.double().cpu(), q.double().cpu(), bank.double().cpu(), idx.cpu(), tau=0.3)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)


def test_python_float_tau_copies_nothing_host_to_device():
    # issue 9.13: a float tau used to be torch.tensor(float(tau), device=cuda): one H2D copy
    # (and stream sync) per call. The profiler must see no HtoD memcpy in the call.
    from torch.profiler import ProfilerActivity, profile

    from lvlm_fast.ops import diff_weighted_pool

    x = torch.randn(8, 49, 64, device="cuda")
    q = torch.randn(64, device="cuda")
    bank, idx = x[:2].clone(), torch.tensor([-1, 0, 0, 0, 1, 1, 1, 1], device="cuda")
    diff_weighted_pool(x, q, bank, idx, tau=0.2)  # warm-up (Triton compile, caches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        diff_weighted_pool(x, q, bank, idx, tau=0.2)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "HtoD" in n], names


def test_small_chunk_splits_patches_cuda():
    # issue 14.2.5: 17 frames (a vision chunk) run as (frame, patch split) programs + merge
    from lvlm_fast.kernels import diff_weighted_pool as K

    from lvlm_fast.ops import diff_weighted_pool

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(17, 729, 1152, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randn(1152, device="cuda", generator=g, dtype=torch.bfloat16)
    assert K.p_splits(17, 729, 2, False)[0] > 1
    out = diff_weighted_pool(x, q, tau=0.1)
    s = torch.nn.functional.cosine_similarity(x.double(), q.double()[None, None], dim=-1) / 0.1
    want = (torch.softmax(s, -1)[..., None] * x.double()).sum(1)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_deepstack_wide_values_split_by_channels():
    """Qwen3-VL ViLAMP's call: values of 4,096 main + 3 x 4,096 DeepStack channels (16,384,
    more than one launch takes), weights from the main channels (rel = red = 4,096 wide, the
    bank too): launched as 4,096-channel chunks; output and gradients == the reference."""
    from lvlm_fast.ops import diff_weighted_pool
    from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 121, 16384, generator=g).to(torch.bfloat16)
    main = x[..., :4096].contiguous()
    inp = {"x": x, "query": torch.zeros(4096).to(torch.bfloat16),
           "ref_bank": torch.cat([torch.randn(1, 121, 4096, generator=g).to(torch.bfloat16),
                                  main]),
           "ref_index": torch.tensor([0, 2, 3]), "rel": main, "red": main.clone()}
    gout = torch.randn(3, 16384, generator=g).to(torch.bfloat16)
    out, grads = _run(diff_weighted_pool, inp, "cuda", torch.bfloat16, 2.0, gout)
    torch.cuda.synchronize()
    exp, exp_grads = _run(reference, inp, "cpu", torch.float64, 2.0, gout.double())
    assert out.shape == (3, 16384)
    torch.testing.assert_close(out.double().cpu(), exp, atol=2e-2, rtol=2e-2)
    floor = max(g.abs().max().item() for g in exp_grads.values())
    for name, got in grads.items():
        scale = max(exp_grads[name].abs().max().item(), floor)
        torch.testing.assert_close(got.double().cpu(), exp_grads[name], atol=4e-2 * scale,
                                   rtol=4e-2, msg=name)
