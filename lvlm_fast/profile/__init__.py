"""Memory accounting: the live-tensor tracker (``lvlm_fast.profile.tracker``) behind every
``peak_bytes`` number in the benchmarks and the memory-vs-frames profiles
(``lvlm_fast.profile.memory``: ``profile_pipeline``, ``Profiler``; CLI ``lvlm-fast profile``)."""

from lvlm_fast.profile.memory import (
    PeakBreakdownTracker,
    Profiler,
    SimulationTracker,
    VisionChunkReplay,
    profile_pipeline,
)
from lvlm_fast.profile.tracker import (
    LiveTensorTracker,
    cuda_allocator_peak_bytes,
    measure_peak,
    peak_live_bytes,
    rss_peak_bytes,
)

__all__ = [
    "LiveTensorTracker",
    "PeakBreakdownTracker",
    "Profiler",
    "SimulationTracker",
    "VisionChunkReplay",
    "cuda_allocator_peak_bytes",
    "measure_peak",
    "peak_live_bytes",
    "profile_pipeline",
    "rss_peak_bytes",
]
