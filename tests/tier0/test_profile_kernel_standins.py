"""Tier 0: the simulation's meta stand-ins for GPU kernels (lvlm_fast.profile.kernel_standins).

* FLA's chunk_gated_delta_rule stand-in: outputs with the shapes, strides and dtypes of
  transformers' ``torch_chunk_gated_delta_rule`` (the real path), and a tracked peak equal to
  the allocation table stated in the module (:func:`fla_gdn_peak_bytes`), on small cases
  (ragged chunk tails, grouped value heads, with/without initial state, contiguous inputs).
* The FlashAttention-2 stand-in: transformers' output shape/layout, peak = output + fp32 LSE.
* ``simulation_kernels``: meta inputs only, restored on exit, switched on by the Profiler
  for Qwen3.5 (GDN) and head dim 256 (FA2), off for the other families.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen35

from lvlm_fast.profile.kernel_standins import (
    PROFILE_FLASH,
    fla_chunk_gated_delta_rule_meta,
    fla_gdn_peak_bytes,
    flash_attention_meta,
    simulation_kernels,
    uses_flash_standin,
)
from lvlm_fast.profile.memory import Profiler, SimulationTracker, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


def _gdn_inputs(b, t, hk, hv, dk, dv, dtype, *, strided: bool, state: bool, seed=0):
    """q/k/v as Qwen3_5GatedDeltaNet passes them: views of the (B, C, T + 3) conv output,
    transposed (non-contiguous) when ``strided``; g fp32 <= 0, beta in (0, 1)."""
    g_ = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    if strided:
        mixed = torch.randn(b, c, t + 3, generator=g_).to(dtype)[:, :, -t:].transpose(1, 2)
    else:
        mixed = torch.randn(b, t, c, generator=g_).to(dtype)
    q, k, v = torch.split(mixed, [hk * dk, hk * dk, hv * dv], dim=-1)
    q, k, v = q.reshape(b, t, hk, dk), k.reshape(b, t, hk, dk), v.reshape(b, t, hv, dv)
    g = -torch.rand(b, t, hv, generator=g_)
    beta = torch.rand(b, t, hv, generator=g_).to(dtype)
    s0 = torch.randn(b, hv, dk, dv, generator=g_) if state else None
    return q, k, v, g, beta, s0


CASES = [  # (b, t, hk, hv, dk, dv, strided, state)
    (1, 100, 2, 4, 16, 8, True, True),  # ragged tail (100 = 64 + 36), grouped values
    (1, 64, 2, 2, 8, 8, True, False),
    (2, 37, 1, 3, 8, 16, False, True),  # contiguous inputs: no input_guard copies
    (1, 1, 2, 4, 8, 8, True, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gdn_standin_outputs_match_the_real_path(case, dtype) -> None:
    b, t, hk, hv, dk, dv, strided, state = case
    args = _gdn_inputs(b, t, hk, hv, dk, dv, dtype, strided=strided, state=state)
    q, k, v, g, beta, s0 = args
    # transformers < 5.24's plain rule wants q/k with the value head count (its model
    # repeats them first); repeating them is what both releases compute
    rq, rk = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
    real_o, real_s = qwen35.torch_chunk_gated_delta_rule(
        rq, rk, v, g=g, beta=beta, initial_state=s0, output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    mq, mk, mv, mg, mb = (x.to("meta") for x in (q, k, v, g, beta))
    ms = None if s0 is None else s0.to("meta")
    o, s = fla_chunk_gated_delta_rule_meta(mq, mk, mv, g=mg, beta=mb, initial_state=ms,
                                           output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
    assert o.shape == real_o.shape and o.dtype == real_o.dtype
    assert o.is_contiguous()
    if dtype != torch.float32:  # (fp32: transformers returns a view of its padded buffer;
        assert o.stride() == real_o.stride()  # FLA refuses fp32 and returns it dense)
    assert s.shape == real_s.shape and s.dtype == real_s.dtype == torch.float32
    _, none = fla_chunk_gated_delta_rule_meta(mq, mk, mv, g=mg, beta=mb, initial_state=ms,
                                              output_final_state=False)
    assert none is None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("final", [True, False])
def test_gdn_standin_peak_is_the_stated_fla_allocations(case, dtype, final) -> None:
    b, t, hk, hv, dk, dv, strided, state = case
    q, k, v, g, beta, s0 = (None if x is None else x.to("meta") for x in _gdn_inputs(
        b, t, hk, hv, dk, dv, dtype, strided=strided, state=state))
    with torch.inference_mode(), SimulationTracker() as tr:
        o, s = fla_chunk_gated_delta_rule_meta(q, k, v, g=g, beta=beta, initial_state=s0,
                                               output_final_state=final,
                                               use_qk_l2norm_in_kernel=True)
    item = torch.empty((), dtype=dtype).element_size()
    copies = tuple(not x.is_contiguous() for x in (q, k, v))
    assert copies == (strided and t > 1,) * 3  # (T = 1: a transposed view is contiguous)
    assert tr.peak_bytes == fla_gdn_peak_bytes(b, t, hk, hv, dk, dv, item, copies=copies,
                                               final_state=final)
    # what stays: the output and the final state
    left = o.untyped_storage().nbytes() + (s.untyped_storage().nbytes() if final else 0)
    assert tr.current_bytes == left


def test_gdn_peak_formula_by_hand() -> None:
    # B=1, T=128 (2 chunks), Hk=16, Hv=32, K=V=128, bf16: the 9B's linear-attention shapes
    b, t, hk, hv, d, s = 1, 128, 16, 32, 128, 2
    copies = b * t * (2 * hk * d + hv * d) * s
    l2 = 2 * b * t * hk * (d * s + 4)
    gcum = b * t * hv * 4
    phase_b = (b * t * hv * 64 * s + 2 * b * t * hv * d * s + b * 2 * hv * d * d * s
               + b * t * hv * d * s + b * hv * d * d * 4 + b * t * hv * d * s)
    assert phase_b > b * t * hv * 64 * (4 + s)
    assert fla_gdn_peak_bytes(b, t, hk, hv, d, d, s) == copies + l2 + gcum + phase_b


@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_flash_standin_shape_layout_and_peak(layout) -> None:
    b, hq, hkv, n, s, d = 1, 8, 2, 5, 11, 256
    if layout == "blhd":  # transformers: view(B, L, H, D).transpose(1, 2)
        q = torch.empty(b, n, hq, d, device="meta").transpose(1, 2)
    else:
        q = torch.empty(b, hq, n, d, device="meta")
    k = torch.empty(b, hkv, s, d, device="meta")
    with torch.inference_mode(), SimulationTracker() as tr:
        out, w = flash_attention_meta(None, q, k, k, None)
    assert w is None and out.shape == (b, n, hq, d)
    # the output in the query's memory order (flash_attn's empty_like(q))
    assert out.stride() == q.transpose(1, 2).stride()
    assert tr.peak_bytes == b * n * hq * d * 4 + b * hq * n * 4  # output + fp32 LSE
    assert tr.current_bytes == b * n * hq * d * 4
    with pytest.raises(ValueError, match="no attention mask"):
        flash_attention_meta(None, q, k, k, torch.ones(1, 1, n, s, dtype=torch.bool,
                                                         device="meta"))
    with pytest.raises(RuntimeError, match="meta-device stand-in"):
        flash_attention_meta(None, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8),
                             torch.zeros(1, 1, 2, 8), None)
    # same shape as transformers' SDPA attention output (B, L, H, D)
    real = F.scaled_dot_product_attention(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8),
                                          torch.zeros(1, 4, 3, 8)).transpose(1, 2)
    fake, _ = flash_attention_meta(None, torch.empty(1, 4, 3, 8, device="meta"),
                                   torch.empty(1, 4, 3, 8, device="meta"),
                                   torch.empty(1, 4, 3, 8, device="meta"), None)
    assert fake.shape == real.shape


def test_simulation_kernels_meta_only_and_restored() -> None:
    model = build_model("tiny-qwen3.5", dtype=torch.float32, simulate=True)
    orig = qwen35.torch_chunk_gated_delta_rule
    lm = model.model.language_model
    attn0 = lm.config._attn_implementation
    with simulation_kernels(model) as used:
        assert "linear_attention" in used
        assert "full_attention" not in used  # tiny: head dim 64, the fused kernel's
        assert qwen35.torch_chunk_gated_delta_rule is not orig
        # real tensors still run transformers' function
        q, k, v, g, beta, _ = _gdn_inputs(1, 10, 1, 2, 8, 8, torch.float32, strided=True,
                                          state=False)
        real = qwen35.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta)[0]
        assert torch.equal(real, orig(q, k, v, g=g, beta=beta)[0])
    assert qwen35.torch_chunk_gated_delta_rule is orig
    assert lm.config._attn_implementation == attn0
    # head dim 256 (the 9B): FA2; the other families' decoders: nothing switched
    big = build_model("qwen3.5-9b", simulate=True)
    assert uses_flash_standin(big)
    with simulation_kernels(big) as used:
        assert big.model.language_model.config._attn_implementation == PROFILE_FLASH
        assert set(used) == {"linear_attention", "full_attention"}
    assert big.model.language_model.config._attn_implementation != PROFILE_FLASH
    ov = build_model("tiny-llava-onevision", simulate=True)
    assert not uses_flash_standin(ov)
    with simulation_kernels(ov) as used:
        assert used == {}


def test_profiler_records_the_kernel_models() -> None:
    kw = dict(vision_chunk_frames=3, prefill_chunk_tokens=16)
    on = Profiler("tiny-qwen3.5", dtype="fp32", simulate=True, vlm_kwargs=kw, frame_hw=(64, 64))
    off = Profiler("tiny-qwen3.5", dtype="fp32", simulate=True, vlm_kwargs=kw,
                   frame_hw=(64, 64), kernel_standins=False)
    a, b = on.run("full", 6), off.run("full", 6)
    assert set(on.kernel_models) == {"linear_attention"} and off.kernel_models == {}
    assert a["llm_tokens"] == b["llm_tokens"] and a["kv_bytes"] == b["kv_bytes"]
    assert a["state_bytes"] == b["state_bytes"] > 0
    # transformers' plain-PyTorch rule keeps fp32 copies and (chunk x chunk) systems: the
    # FLA model's transients are smaller
    assert a["pass_peak_bytes"] < b["pass_peak_bytes"]
    measured = Profiler("tiny-qwen3.5", dtype="fp32", simulate=False, vlm_kwargs=kw,
                        frame_hw=(64, 64))
    assert measured.kernel_standins is False


def test_qwen3_profiles_use_the_processors_long_video_frame_size() -> None:
    """Qwen3-VL / Qwen3.5 profiles feed the size Qwen3VLVideoProcessor gives a long video
    with its per-frame cap (cap_pixels_per_frame=True): 448 x 448 -> 352 x 352 from 6 frames
    on (128 x 32^2 x 1.05 pixels per frame, 32-aligned); the other families keep theirs."""
    from lvlm_fast.profile.memory import long_video_frame_hw, profile_frame_hw

    assert {long_video_frame_hw(448, 448, n) for n in (6, 8, 128, 10240)} == {(352, 352)}
    assert profile_frame_hw("qwen3-vl-8b") == profile_frame_hw("qwen3.5-9b") == (352, 352)
    assert profile_frame_hw("qwen2.5-vl-7b") == (448, 448)
    assert profile_frame_hw("llava-onevision-qwen2-7b") == (384, 384)
    # by hand: per-frame cap int(131072 * 1.05) = 137,625 px; beta = sqrt(448^2 / 137,625);
    # floor(448 / beta / 32) * 32 = 352
    import math

    beta = math.sqrt(448 * 448 / int(128 * 32 * 32 * 1.05))
    assert math.floor(448 / beta / 32) * 32 == 352
    # (the processor's __call__ needs torchvision, not a dependency here: the rule is checked
    # through transformers' own smart_resize above and by hand)
