"""Memory accounting: the live-tensor tracker (``lvlm_fast.profile.tracker``) behind every
``peak_bytes`` number in the benchmarks and the memory-vs-frames profiles."""

from lvlm_fast.profile.tracker import (
    LiveTensorTracker,
    cuda_allocator_peak_bytes,
    measure_peak,
    peak_live_bytes,
    rss_peak_bytes,
)

__all__ = [
    "LiveTensorTracker",
    "cuda_allocator_peak_bytes",
    "measure_peak",
    "peak_live_bytes",
    "rss_peak_bytes",
]
