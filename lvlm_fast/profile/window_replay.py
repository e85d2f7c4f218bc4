"""Replay of repeated simulated decoder steps into a budgeted KV cache (issue 12).

Why: the ``stream`` strategy at 100,000 frames sends 12,500 identical windows through the
7B decoder (LLaVA-OneVision: 8 frames x 196 tokens each), and in steady state every window
starts from the same cache length (``kv_budget``). On meta tensors one decoder step
``vlm.run_llm(x, cache)`` into a :class:`~lvlm_fast.stream_cache.BudgetedKVCache` is a
function of: the decoder (the same module object), its attention implementation, the
input's metadata, and the cache's length, capacity and buffer shape. Its effects are: the
tensors it allocates and frees (its peak above the live level), its output (the hidden
states), and ``n`` rows written in place into the preallocated buffers (no allocation:
the lengths advance and the layer views are refreshed). So the first step with a given
key runs for real under the tracker and is recorded the way
:class:`~lvlm_fast.profile.memory.VisionChunkReplay` records a vision chunk; a later step
with the same key raises the tracker's peak to ``live + recorded peak`` if higher,
allocates the recorded output and advances the cache lengths by ``n``. A step that leaves
anything alive besides its output is never replayed. Frames are never skipped: every
window's vision chunks, pooling, window rows and ``kv_compact`` still run (the vision
chunks through their own replay). Tested: replayed and fully run simulations give equal
peaks, token counts and allocation counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lvlm_fast.profile.memory import PeakBreakdownTracker
from lvlm_fast.profile.tracker import LiveTensorTracker
from lvlm_fast.stream_cache import BudgetedKVCache


@dataclass(frozen=True)
class _StepRecord:
    inner_peak: int  # peak of the step's own live bytes above the level at entry
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    out_dtype: torch.dtype
    num_allocations: int
    allocated_bytes: int


class DecoderWindowReplay:
    """Replays ``vlm.run_llm`` steps into a :class:`BudgetedKVCache` (module doc).
    ``records``: key -> record (None: not replayable, always run); ``hits``/``misses``."""

    def __init__(self) -> None:
        self.records: dict[Any, _StepRecord | None] = {}
        self.hits = 0
        self.misses = 0

    def wrap(self, run_llm: Callable[..., torch.Tensor], tracker: LiveTensorTracker
             ) -> Callable[..., torch.Tensor]:
        """``run_llm`` (a bound ``LongVideoVLM.run_llm``) with replay under ``tracker``
        (a peak-breakdown tracker always runs for real: it lists tensors, not totals)."""
        lm = run_llm.__self__.language_model

        def replayed(embeds: torch.Tensor, cache: Any, position_ids: Any = None,
                     **kwargs: Any) -> torch.Tensor:
            if not (isinstance(embeds, torch.Tensor) and embeds.is_meta
                    and isinstance(cache, BudgetedKVCache) and cache.key.is_meta
                    and position_ids is None and not kwargs and not cache.state_layers
                    and not isinstance(tracker, PeakBreakdownTracker)):
                return run_llm(embeds, cache, position_ids, **kwargs)
            n, length = embeds.shape[1], cache.get_seq_length()
            if length + n > cache.capacity:  # let the real call raise its error
                return run_llm(embeds, cache)
            key = (lm, lm.config._attn_implementation, tuple(embeds.shape), embeds.stride(),
                   embeds.dtype, length, cache.capacity, tuple(cache.key.shape),
                   tuple(cache.value.shape), cache.key.dtype)
            if key not in self.records:
                self.misses += 1
                return self._record(key, lambda: run_llm(embeds, cache), tracker)
            rec = self.records[key]
            if rec is None:  # left state behind when recorded: always run
                return run_llm(embeds, cache)
            self.hits += 1
            out = self._replay(rec, tracker)
            for layer in cache.kv_layers:  # the rows written in place: lengths advance
                layer.length += n
                layer._refresh()
            return out

        return replayed

    def _record(self, key: Any, call: Callable[[], torch.Tensor],
                tr: LiveTensorTracker) -> torch.Tensor:
        with tr._lock:
            entry, saved_peak = tr.current_bytes, tr.peak_bytes
            entry_keys = set(tr._live)
            n0, a0 = tr.num_allocations, tr.allocated_bytes
            tr.peak_bytes = entry  # follow the step's own peak from here
        try:
            out = call()
        finally:
            with tr._lock:
                inner_peak = tr.peak_bytes - entry
                tr.peak_bytes = max(tr.peak_bytes, saved_peak)
        st = out.untyped_storage() if isinstance(out, torch.Tensor) else None
        if (st is None or not out.is_meta or st._cdata in entry_keys or out.storage_offset()
                or st.nbytes() != out.numel() * out.element_size() or not out.is_contiguous()
                or tr.current_bytes - entry != st.nbytes()):
            self.records[key] = None  # anything but one fresh dense output: not replayable
            return out
        self.records[key] = _StepRecord(inner_peak, tuple(out.shape), out.stride(), out.dtype,
                                        tr.num_allocations - n0, tr.allocated_bytes - a0)
        return out

    def _replay(self, rec: _StepRecord, tr: LiveTensorTracker) -> torch.Tensor:
        with tr._lock:
            n0, a0 = tr.num_allocations, tr.allocated_bytes
            tr.peak_bytes = max(tr.peak_bytes, tr.current_bytes + rec.inner_peak)
            dev_cur = tr._by_device.get("meta", 0) + rec.inner_peak
            if dev_cur > tr.peak_by_device.get("meta", 0):
                tr.peak_by_device["meta"] = dev_cur
        # allocated through the tracker: the output is live from here, as the real step's
        out = torch.empty_strided(rec.out_shape, rec.out_stride, dtype=rec.out_dtype,
                                  device="meta")
        with tr._lock:
            tr.num_allocations = n0 + rec.num_allocations
            tr.allocated_bytes = a0 + rec.allocated_bytes
        return out


__all__ = ["DecoderWindowReplay"]
