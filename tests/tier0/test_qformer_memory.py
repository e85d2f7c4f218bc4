"""CPU memory of the Q-Former cross-attention is constant in T (issue 13: "no (T*32, hidden)
K or V tensor and no score matrix is ever materialised").

Peak bytes above entry are measured at 64 and 1,024 frames for the op's C++ forward and
backward and for :class:`VideoQFormer`'s two-pass streaming forward; beyond the O(T)
inputs and outputs themselves (frames are allocated before the measurement; the
backward's dframes / dpos are subtracted) the peak must not grow with T.

How it is measured: torch's profiler with ``profile_memory=True`` records every
allocation and free of c10's CPU allocator, including those made *inside* the C++ kernel
(its per-chunk X, K, V and score tiles); replaying them in time order gives the exact peak
of live bytes. The project's dispatch-level tracker (``lvlm_fast.profile.tracker``) cannot
see a C++ kernel's internal scratch (its "What it cannot see" section), and the RSS
cross-check is page-granular and noisy, so neither could catch a kernel that builds the
whole K internally. Each test carries its own negative control: the plain-PyTorch
reference, which does materialise K, V and the scores, is measured the same way and must
grow by at least one (T*S, hidden) K.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lvlm_fast  # noqa: F401
from lvlm_fast.nn import VideoQFormer
from lvlm_fast.ops import qformer_cross_attention as op
from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention as ref

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py

B, S, C, E, H, LQ = 2, 32, 64, 64, 2, 32  # video layout (32 queries, 32 tokens per frame)
SMALL, LARGE = 64, 1024  # frames; the C++ kernel's chunk is 4,096 keys = 64 frames here
SLACK = 1 << 20  # 1 MiB; a materialised K at 1,024 frames is 16 MiB


def alloc_peak(fn) -> tuple[object, int, int]:
    """(fn(), peak live CPU bytes above entry during the call, live bytes still held at
    exit by what the call allocated), from the allocator events of torch's profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]  # fmt: skip
    events.sort(key=lambda x: x[0])  # stable: same-time events keep their recorded order
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak, live


def _inputs(t: int, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    xs = [torch.randn(B, LQ, C, generator=g), torch.randn(B, t, S, E, generator=g),
          torch.randn(t, E, generator=g) * 0.5, torch.randn(C, E, generator=g) * E**-0.5,
          torch.randn(C, generator=g) * 0.1, torch.randn(C, E, generator=g) * E**-0.5,
          torch.randn(C, generator=g) * 0.1]  # fmt: skip
    return [x.requires_grad_(requires_grad) for x in xs]


def _k_bytes(t: int) -> int:
    return B * t * S * C * 4  # one materialised (B, T*S, C) fp32 K


def _forward_extra(fn, t: int) -> int:
    xs = _inputs(t)
    _, peak, live = alloc_peak(lambda: fn(*xs, H))
    return peak - live  # the output (B, Lq, C) and lse are O(1)


def _backward_extra(fn, t: int) -> int:
    xs = _inputs(t, requires_grad=True)
    out = fn(*xs, H)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads, peak, _ = alloc_peak(lambda: torch.autograd.grad(out, xs, go))
    # the O(T) outputs: dframes (the size of frames) and dpos
    return peak - sum(g.numel() * g.element_size() for g in grads)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_op_cpu_memory_constant_in_frames(direction):
    assert torch.ops.lvlm_fast.qformer_cross_attention.default.has_kernel_for_dispatch_key(
        "CPU")  # the C++ kernel (not a fallback) is what is measured
    measure = _forward_extra if direction == "forward" else _backward_extra
    small, large = measure(op, SMALL), measure(op, LARGE)
    assert large <= small + SLACK, (direction, small, large)
    # negative control: the same measurement sees the reference materialise K, V, scores
    ref_small, ref_large = measure(ref, SMALL), measure(ref, LARGE)
    assert ref_large - ref_small >= _k_bytes(LARGE) - _k_bytes(SMALL), (ref_small, ref_large)


def _qformer() -> VideoQFormer:
    torch.manual_seed(0)
    return VideoQFormer(hidden_size=C, num_heads=H, intermediate_size=2 * C, encoder_width=E,
                        position="interpolate", chunk_frames=64).eval()  # fmt: skip


def test_video_qformer_two_pass_streaming_memory_constant_in_frames(monkeypatch):
    model = _qformer()

    def extra(t: int) -> int:
        frames = torch.randn(1, t, S, E, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            _, peak, live = alloc_peak(lambda: model(frames))
        return peak - live

    small, large = extra(SMALL), extra(LARGE)
    assert large <= small + SLACK, (small, large)
    # negative control: the module running the reference (which materialises K / V per
    # call) over the whole stream at once grows by at least one K
    import lvlm_fast.nn.qformer as mod

    monkeypatch.setattr(model, "chunk_frames", LARGE)
    monkeypatch.setattr(mod, "qformer_cross_attention", ref)
    ref_small, ref_large = extra(SMALL), extra(LARGE)
    k1 = (LARGE - SMALL) * S * C * 4  # B = 1
    assert ref_large - ref_small >= k1, (ref_small, ref_large)
