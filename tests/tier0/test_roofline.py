"""Tier 0: benchmarks/roofline.py's launch counting (issue 14.2.6) on meta tensors: the
dispatch hook sees lvlm_fast ops and replays them through the CUDA launchers with recorded
(not launched) Triton kernels; before/after rules; the bytes model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import summary_attention
from lvlm_fast.ops.evict_summaries import evict_summaries_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import roofline


def test_counts_the_cuda_launches_of_meta_calls():
    q = torch.empty(1, 28, 1, 128, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(1, 4, 100_000, 128, device="meta", dtype=torch.bfloat16)
    qp = torch.empty(1, 28, 1530, 128, device="meta", dtype=torch.bfloat16)
    layers = [torch.empty(1, 4, 3000, 128, device="meta", dtype=torch.bfloat16)
              for _ in range(28)]
    with roofline.LaunchCounter() as c:
        summary_attention(q, kv, kv)  # decode: split-KV + merge
        summary_attention(qp, kv[:, :, :3000], kv[:, :, :3000], return_key_mass=True)
        evict_summaries_layers(layers, layers, window_start=10, ratio=16, carry=0, count=90,
                               dst=10, inv_freq=torch.empty(64, device="meta"))
    names = [[ln["kernel"] for ln in x["launches"]] for x in c.calls]
    assert [x["op"] for x in c.calls] == ["summary_attention", "summary_attention",
                                          "evict_summaries_layers"]
    assert names[0] == ["_summary_attention_splitkv_kernel", "_lse_merge_kernel"]
    assert names[1] == ["_summary_attention_fwd_kernel", "_summary_attention_mass_kernel"]
    assert names[2] == ["_evict_summaries_fwd_kernel"]
    assert c.calls[2]["launches"][0]["grid"] == (4, 28)
    assert [x["legacy"] for x in c.calls] == [1, 1, 28]  # the launchers before issue 14.2
    assert c.calls[0]["launches"][0]["programs"] >= 132 * 3
    m = c.calls[0]["model"]
    assert m["bytes"] >= 2 * 4 * 100_000 * 128 * 2 and m["flops"] == 4 * 28 * 100_000 * 128
    # the kernels are real again afterwards
    import triton
    from lvlm_fast.kernels import summary_attention as k

    assert isinstance(k._summary_attention_fwd_kernel, triton.runtime.JITFunction)
