"""Tier 0: lvlm_fast.nn.DifferentialFeatureMerging (ViLAMP DFM / SigPooling).

The module (chunked, fused op per chunk) is compared with the seed (the released dense
SigPooling, benchmarks/seed/vilamp_dfm.py) and with the unchunked reference composition
(lvlm_fast.nn.dfm_reference), forward and backward, plus memory behaviour with the
live-tensor tracker.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.seed.vilamp_dfm import SeedSigPooling, seed_dfm, seed_from_module  # noqa: E402
from lvlm_fast.nn import (  # noqa: E402
    DifferentialFeatureMerging,
    dfm_reference,
    nearest_preceding_reference,
    released_reference,
)
from lvlm_fast.profile.tracker import peak_live_bytes  # noqa: E402
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_pool  # noqa: E402

F64 = torch.float64


def _setup(n=11, p=5, d=16, dt=8, dtype=F64, seed=0):
    torch.manual_seed(seed)
    m = DifferentialFeatureMerging(d, dt).to(dtype)
    with torch.no_grad():  # a non-trivial tau and biases
        m.tau.fill_(0.3)
        for lin in (m.linear_iq, m.linear_ik, m.linear_q, m.linear_k):
            lin.bias.normal_(0, 0.1)
            lin.weight.normal_(0, 0.3)
    x = torch.randn(n, p, d, dtype=dtype)
    t = torch.randn(dt, dtype=dtype)
    return m, x, t


# ------------------------------------------------------------------ index conventions
def test_reference_index_helpers():
    assert nearest_preceding_reference([3, 7], 10) == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]
    assert nearest_preceding_reference([0], 3) == [0, 0, 0]
    frames, ref = released_reference([3, 7], 10)
    assert frames == [0, 1] and ref == nearest_preceding_reference([3, 7], 10)


def test_param_names_match_release():
    m = DifferentialFeatureMerging(8, 4)
    assert set(m.state_dict()) == {
        "linear_iq.weight", "linear_iq.bias", "linear_ik.weight", "linear_ik.bias",
        "linear_q.weight", "linear_q.bias", "linear_k.weight", "linear_k.bias", "tau"}
    assert m.linear_q.weight.shape == (8, 4) and m.tau.shape == () and m.tau.requires_grad
    assert float(m.tau.detach()) == pytest.approx(0.01)


# ------------------------------------------------------------------ forward equality
@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 11, 64, None])
@pytest.mark.parametrize("kf", [[3, 7], [0], [10], [0, 1, 2, 9], [5]])
def test_forward_module_seed_reference(chunk, kf):
    m, x, t = _setup()
    out = m(x, t, kf, chunk_frames=chunk)
    ref = dfm_reference(m, x, t, kf)
    seed = seed_dfm(seed_from_module(m), x, t, kf)
    assert out.shape == (11, 16)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, seed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_released_slip_matches_seed(chunk):
    m, x, t = _setup(n=13)
    kf = [2, 6, 9]
    out = m(x, t, kf, chunk_frames=chunk, reference="released")
    seed = seed_dfm(seed_from_module(m), x, t, kf, released_slip=True)
    torch.testing.assert_close(out, seed, rtol=1e-10, atol=1e-10)
    # and it really differs from the nearest-keyframe reading
    assert not torch.allclose(out, m(x, t, kf, chunk_frames=chunk))


def test_n_equals_one_and_k_equals_one():
    m, x, t = _setup(n=1)
    out = m(x, t, [0])
    torch.testing.assert_close(out, seed_dfm(seed_from_module(m), x, t, [0]))
    torch.testing.assert_close(out, dfm_reference(m, x, t, [0]))


def test_before_first_none_drops_term():
    m, x, t = _setup()
    out = m(x, t, [4], before_first="none", chunk_frames=3)
    # frames 0..3 have no redundancy term: the reference op with ref_index -1
    ref = dfm_reference(m, x, t, [4], before_first="none")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    self_out = m(x, t, [4], chunk_frames=3)
    torch.testing.assert_close(out[4:], self_out[4:], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out[:4], self_out[:4])  # learned: "self" is not a constant


def test_explicit_ref_bank_and_index():
    m, x, t = _setup()
    kf = [3, 7]
    ri = torch.tensor(nearest_preceding_reference(kf, 11))
    out = m(x, t, ref_bank=x[kf].clone(), ref_index=ri, chunk_frames=4)
    torch.testing.assert_close(out, m(x, t, kf), rtol=1e-12, atol=1e-12)
    # arbitrary (non-monotone) index with scattered -1 ("self") frames
    ri2 = torch.tensor([1, -1, 0, 0, -1, 1, -1, -1, 0, 1, -1])
    out2 = m(x, t, ref_bank=x[kf].clone(), ref_index=ri2, chunk_frames=3)
    torch.testing.assert_close(out2, dfm_reference(m, x, t, ref_bank=x[kf].clone(),
                                                   ref_index=ri2), rtol=1e-10, atol=1e-10)
    # keyframe_indices + explicit ref_index
    out3 = m(x, t, kf, ref_index=ri2, chunk_frames=5)
    torch.testing.assert_close(out3, out2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 13])
def test_ref_frame_conventions(chunk):
    """``ref_frame`` (per-frame reference frame numbers) as produced by
    keyframe_select.released_reference_index (prefix frames name themselves, segment i names
    frame i) and by the nearest-keyframe reading (-1 before the first keyframe)."""
    m, x, t = _setup(n=13)
    kf = [2, 6, 9]
    pos = nearest_preceding_reference(kf, 13)
    released_frames = [f if r < 0 else r for f, r in enumerate(pos)]
    nearest_frames = [-1 if r < 0 else kf[r] for r in pos]
    seed = seed_dfm(seed_from_module(m), x, t, kf, released_slip=True)
    out = m(x, t, ref_frame=torch.tensor(released_frames), chunk_frames=chunk)
    torch.testing.assert_close(out, seed, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dfm_reference(m, x, t, ref_frame=released_frames), seed,
                               rtol=1e-10, atol=1e-10)
    out2 = m(x, t, ref_frame=nearest_frames, chunk_frames=chunk)
    torch.testing.assert_close(out2, m(x, t, kf), rtol=1e-12, atol=1e-12)
    # every frame names itself: no bank at all
    out3 = m(x, t, ref_frame=list(range(13)), chunk_frames=chunk)
    torch.testing.assert_close(out3, m(x, t, kf, before_first="self",
                                       ref_index=[-1] * 13), rtol=1e-12, atol=1e-12)


def test_per_frame_text():
    m, x, t = _setup()
    tn = torch.randn(11, 8, dtype=F64)
    out = m(x, tn, [2, 8], chunk_frames=4)
    torch.testing.assert_close(out, dfm_reference(m, x, tn, [2, 8]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, t[None], [2, 8]), m(x, t, [2, 8]))


def test_return_weights():
    m, x, t = _setup()
    out, w = m(x, t, [3, 7], chunk_frames=4, return_weights=True)
    assert w.shape == (11, 5)
    torch.testing.assert_close(w.sum(1), torch.ones(11, dtype=F64))
    torch.testing.assert_close(torch.einsum("np,npd->nd", w, x), out)


def test_float32_matches_seed():
    m, x, t = _setup(n=9, p=49, d=64, dt=32, dtype=torch.float32)
    with torch.no_grad():
        m.tau.fill_(0.01)  # the released init: sharp softmax
    out = m(x, t, [1, 5])
    torch.testing.assert_close(out, seed_dfm(seed_from_module(m), x, t, [1, 5]),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ parameter-free mode
def test_parameter_free_mode():
    torch.manual_seed(1)
    m = DifferentialFeatureMerging(16, learned=False, tau=0.5).double()
    assert len(list(m.parameters())) == 0 and m.text_dim == 16
    x = torch.randn(10, 6, 16, dtype=F64)
    q = torch.randn(16, dtype=F64)
    kf = [2, 6]
    ri = torch.tensor(nearest_preceding_reference(kf, 10))
    want = ref_pool(x, q, x[kf], ri, tau=0.5)  # -1 = no redundancy term
    torch.testing.assert_close(m(x, q, kf, before_first="none", chunk_frames=3), want)
    # "self": cos(x, x) = 1 is a constant shift -> same softmax
    torch.testing.assert_close(m(x, q, kf, chunk_frames=3), want)
    from benchmarks.seed.vilamp import seed_diff_weighted_pool

    torch.testing.assert_close(m(x, q, kf), seed_diff_weighted_pool(x, kf, q, 0.5))


# ------------------------------------------------------------------ backward
def _grads(out, tensors):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("chunk", [3, 11])
def test_backward_module_seed_reference(checkpoint, chunk):
    m, x, t = _setup()
    m.checkpoint = checkpoint
    x.requires_grad_(True)
    kf = [3, 7]
    params = [m.linear_iq.weight, m.linear_iq.bias, m.linear_ik.weight, m.linear_ik.bias,
              m.linear_q.weight, m.linear_q.bias, m.linear_k.weight, m.linear_k.bias, m.tau]
    got = _grads(m(x, t, kf, chunk_frames=chunk), [*params, x])
    ref = _grads(dfm_reference(m, x, t, kf), [*params, x])
    seed = seed_from_module(m)
    sp = [seed.linear_iq.weight, seed.linear_iq.bias, seed.linear_ik.weight,
          seed.linear_ik.bias, seed.linear_q.weight, seed.linear_q.bias, seed.linear_k.weight,
          seed.linear_k.bias, seed.tau]
    sgot = _grads(seed_dfm(seed, x, t, kf), [*sp, x])
    for a, b, c in zip(got, ref, sgot, strict=True):
        assert a.abs().sum() > 0  # every parameter receives a gradient
        # The op's backward normalises with its fp32 log-sum-exp (the schema's lse is fp32),
        # so fp64 gradients agree to ~1e-7 relative, not to fp64 rounding.
        tol = dict(rtol=1e-5, atol=1e-6 * float(b.abs().max()))
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a, c, **tol)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)  # seed == spec in fp64


def test_gradcheck_small():
    """fp64 gradcheck through x, t, tau and two projections (functional_call swaps them in,
    which also checks that the checkpointed recompute uses the forward's tensors)."""
    m, x, t = _setup(n=4, p=3, d=5, dt=3)
    x.requires_grad_(True)
    t.requires_grad_(True)
    tau = torch.tensor(0.4, dtype=F64, requires_grad=True)
    wk = m.linear_k.weight.detach().clone().requires_grad_(True)
    biq = m.linear_iq.bias.detach().clone().requires_grad_(True)

    def f(x, t, tau, wk, biq):
        p = {"tau": tau, "linear_k.weight": wk, "linear_iq.bias": biq}
        return torch.func.functional_call(m, p, (x, t, [1, 3]), {"chunk_frames": 3})

    assert torch.autograd.gradcheck(f, (x, t, tau, wk, biq), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ loading released weights
def _released_sd(d=16, dt=8, prefix="model.composer_projector."):
    torch.manual_seed(5)
    seed = SeedSigPooling(d, dt).double()
    sd = {prefix + k: v.clone() for k, v in seed.state_dict().items()}
    sd["model.embed_tokens.weight"] = torch.randn(4, d)  # unrelated keys are ignored
    sd["model.mm_projector.0.weight"] = torch.randn(d, d)
    return seed, sd


def test_from_released_state_dict():
    seed, sd = _released_sd()
    m = DifferentialFeatureMerging.from_released_state_dict(sd)
    assert m.dim == 16 and m.text_dim == 8 and m.linear_iq.weight.dtype == F64
    assert m.tau.requires_grad
    x = torch.randn(7, 5, 16, dtype=F64)
    t = torch.randn(8, dtype=F64)
    torch.testing.assert_close(m(x, t, [2, 4], chunk_frames=2), seed_dfm(seed, x, t, [2, 4]))
    m32 = DifferentialFeatureMerging.from_released_state_dict(sd, dtype=torch.float32,
                                                              chunk_bytes=1 << 20)
    assert m32.linear_k.weight.dtype == torch.float32 and m32.chunk_bytes == 1 << 20


def test_from_released_checkpoint_files(tmp_path):
    from safetensors.torch import save_file

    seed, sd = _released_sd()
    keys = sorted(sd)
    shard1 = {k: sd[k].contiguous() for k in keys[: len(keys) // 2]}
    shard2 = {k: sd[k].contiguous() for k in keys[len(keys) // 2:]}
    save_file(shard1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(tmp_path / "model-00002-of-00002.safetensors"))
    wmap = {k: "model-00001-of-00002.safetensors" for k in shard1}
    wmap.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    m = DifferentialFeatureMerging.from_released_checkpoint(tmp_path)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, seed.state_dict()[k])
    torch.save(sd, tmp_path / "mm.bin")
    m2 = DifferentialFeatureMerging.from_released_checkpoint(tmp_path / "mm.bin")
    torch.testing.assert_close(m2.linear_q.weight, seed.linear_q.weight)


def test_released_loader_errors():
    _, sd = _released_sd()
    del sd["model.composer_projector.linear_k.bias"]
    with pytest.raises(ValueError, match=r"linear_k\.bias"):
        DifferentialFeatureMerging.from_released_state_dict(sd)
    with pytest.raises(ValueError, match=r"linear_iq\.weight"):
        DifferentialFeatureMerging.from_released_state_dict({"a": torch.zeros(1)})


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        (dict(x=torch.randn(4, 16)), ValueError, "x must be"),
        (dict(x=torch.randn(4, 5, 15, dtype=F64)), ValueError, "x must be"),
        (dict(x=torch.randn(4, 5, 16)), TypeError, "x has dtype"),
        (dict(x=[1.0]), TypeError, "x must be"),
        (dict(text_emb=torch.randn(7, dtype=F64)), ValueError, "text_emb"),
        (dict(text_emb=torch.randn(3, 8, dtype=F64)), ValueError, "text_emb"),
        (dict(keyframe_indices=None), ValueError, "keyframe_indices"),
        (dict(ref_bank=torch.randn(2, 5, 16, dtype=F64)), ValueError, "exactly one"),
        (dict(keyframe_indices=[3, 2]), ValueError, "strictly increasing"),
        (dict(keyframe_indices=[4]), ValueError, "keyframe_indices values"),
        (dict(keyframe_indices=[]), ValueError, "keyframe_indices"),
        (dict(keyframe_indices=torch.tensor([1.0])), TypeError, "keyframe_indices"),
        (dict(ref_index=[0, 0, 2, 0]), ValueError, "ref_index"),
        (dict(ref_index=[0, 0]), ValueError, "ref_index"),
        (dict(chunk_frames=0), ValueError, "chunk_frames"),
        (dict(keyframe_indices=None, ref_frame=[0, 0, 0]), ValueError, r"ref_frame must be \(N=4"),
        (dict(keyframe_indices=None, ref_frame=[0, 0, 0, 4]), ValueError, "ref_frame"),
        (dict(ref_frame=[0, 0, 1, 1]), ValueError, "ref_frame excludes"),
        (dict(reference="first"), ValueError, "reference"),
        (dict(before_first="zero"), ValueError, "before_first"),
    ],
)
def test_bad_inputs(kwargs, exc, name):
    m, x, t = _setup(n=4)
    args = dict(x=x, text_emb=t, keyframe_indices=[1, 3])
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        m(**args)


def test_ref_bank_needs_ref_index_and_shape():
    m, x, t = _setup(n=4)
    with pytest.raises(ValueError, match="ref_index"):
        m(x, t, ref_bank=x[:2])
    with pytest.raises(ValueError, match="ref_bank"):
        m(x, t, ref_bank=x[:2, :3], ref_index=[0, 0, 1, 1])


# ------------------------------------------------------------------ meta / memory
def test_meta_forward_shape_and_simulated_peak_matches_real():
    """Simulation on meta tensors gives the same tracker peak as the real CPU run, for the
    module and for the seed (the basis of the N=2048 seed number in benchmarks/cases/dfm)."""
    n, p, d, dt, kf = 24, 49, 64, 32, [3, 11, 19]
    torch.manual_seed(0)
    m = DifferentialFeatureMerging(d, dt, chunk_bytes=2 * 6 * p * d * 4)  # 6 frames / chunk
    seed = seed_from_module(m)
    x = torch.randn(n, p, d)
    t = torch.randn(dt)
    mm = DifferentialFeatureMerging(d, dt, chunk_bytes=m.chunk_bytes, device="meta")
    sm = SeedSigPooling(d, dt, device="meta")
    xm = torch.empty(n, p, d, device="meta")
    tm = torch.empty(dt, device="meta")
    with torch.no_grad():
        out = mm(xm, tm, kf)
        assert out.device.type == "meta" and out.shape == (n, d)
        assert peak_live_bytes(m, x, t, kf) == peak_live_bytes(mm, xm, tm, kf)
        assert peak_live_bytes(seed_dfm, seed, x, t, kf) == peak_live_bytes(
            seed_dfm, sm, xm, tm, kf)


def test_peak_memory_flat_in_n_vs_seed():
    p, d, dt, c = 49, 64, 32, 8
    torch.manual_seed(0)
    m = DifferentialFeatureMerging(d, dt)
    seed = seed_from_module(m)
    peaks = {}
    for n in (32, 256):
        x = torch.randn(n, p, d)
        t = torch.randn(dt)
        kf = list(range(0, n, n // 4))
        with torch.no_grad():
            peaks["mod", n] = peak_live_bytes(m, x, t, kf, chunk_frames=c)
            peaks["seed", n] = peak_live_bytes(seed_dfm, seed, x, t, kf)
    dn = 256 - 32
    mod_growth = peaks["mod", 256] - peaks["mod", 32]
    seed_growth = peaks["seed", 256] - peaks["seed", 32]
    # module: grows by the (N, D) output (+ the (N,) index and per-chunk pieces), no N*P*D
    assert mod_growth <= 3 * dn * d * 4 + dn * 8, peaks
    # seed: at least five (N, P, D) fp32 tensors per extra frame
    assert seed_growth >= 5 * dn * p * d * 4, peaks
    assert peaks["mod", 256] * 10 <= peaks["seed", 256], peaks


def test_checkpointed_training_memory_flat():
    p, d, dt, c = 49, 64, 32, 4
    torch.manual_seed(0)
    peaks = {}
    for ck in (True, False):
        m = DifferentialFeatureMerging(d, dt, checkpoint=ck)
        x = torch.randn(64, p, d)
        t = torch.randn(dt)

        def step(m=m, x=x, t=t):
            out = m(x, t, [0, 20, 40], chunk_frames=c)
            return out.sum()  # the graph (saved tensors) is alive at the peak

        peaks[ck] = peak_live_bytes(step)
    # without checkpointing the two (N, P, D) projections are saved for backward
    assert peaks[False] >= 2 * 64 * p * d * 4
    assert peaks[True] * 4 <= peaks[False], peaks
