"""``BudgetedKVCache``: a preallocated KV cache with a hard per-layer row budget, compacted
in place by the fused :func:`lvlm_fast.ops.kv_compact` (InfiniPot-V-style, query-agnostic).

Layout. Every full-attention layer's K/V rows live in ONE stacked buffer per K and V,
``key = (L, B, Hkv, C, D)``; layer ``l`` holds the views ``key[l]`` / ``value[l]`` as its
``key_buffer`` / ``value_buffer`` (a :class:`~lvlm_fast.cache.PreallocatedLayer`, so
``update`` and the attention see exactly what a ``DynamicCache`` would hold). That is what
lets one ``kv_compact`` call (one launch) compact every layer and KV head at once.

Capacity ``C = budget + max(window, tail)``: at most ``budget`` rows survive a compaction,
then at most one window (or the question + answer tail) is appended before the next, so
the buffer never grows with the stream (the flat-memory property).

Positions: after :meth:`compact` the kept rows sit at slots ``0 .. budget-1`` with their
keys re-rotated by the slot delta (1-D RoPE), so a row's RoPE position is its slot. The
decoder's default positions (``get_seq_length() + arange``) are then exactly right for
the next window, the question and the answer; every position stays below ``C``.
M-RoPE (``mrope_section = (t, h, w)``): only the temporal id is a slot (the temporal
frequency pairs are re-rotated by the slot delta), height and width ids never move (the
family's ``PositionPlan.stream_chunk`` gives them). Both layouts of the sections are
handled by :func:`lvlm_fast.ops.kv_compact` without a kernel change: blocked (Qwen2.5-VL:
the temporal pairs are a prefix) and interleaved (``mrope_interleaved``: Qwen3-VL,
Qwen3.5; the spatial pairs get frequency 0, which is the identity exactly). Partial rotary
(Qwen3.5: ``partial_rotary_factor`` < 1, ``inv_freq`` is ``(rotary_dim/2,)``) re-rotates the
temporal pairs of the first ``rotary_dim`` dims only.

Hybrid decoders (Qwen3.5, ``layer_types``): the stacked buffers hold the full-attention
layers only (:attr:`kv_layers`); the linear-attention layers keep their fixed-size conv
and recurrent states (:class:`~lvlm_fast.cache.PreallocatedStateLayer`), which every
window updates in place and which a compaction never touches: the recurrent state has
already absorbed every token, evicted ones included, so only the attention rows are cut.

Logical positions (``videoxl`` with ``kv_budget`` on M-RoPE families):
:func:`compact_per_layer` with ``inv_freq=None`` moves the kept rows without any
re-rotation, so every kept row keeps the position it was computed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lvlm_fast.cache import PreallocatedKVCache
from lvlm_fast.ops.kv_compact import KVCompactResult, kv_compact


def _pos_int(name: str, value: object, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


class BudgetedKVCache(PreallocatedKVCache):
    """Preallocated stacked K/V buffers of ``capacity`` rows with in-place compaction to
    ``budget`` rows (module doc). Batch 1 or more, fixed at construction."""

    def __init__(self, num_layers: int, capacity: int, *, budget: int,
                 inv_freq: torch.Tensor, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, batch: int = 1,
                 value_dim: int | None = None,
                 layer_types: Sequence[str] | None = None,
                 mrope_section: Sequence[int] | None = None,
                 mrope_interleaved: bool = False,
                 rotary_dim: int | None = None) -> None:
        super().__init__(num_layers, capacity, layer_types)
        _pos_int("budget", budget, 1)
        if budget > capacity:
            raise ValueError(f"budget must be <= capacity = {capacity}, got {budget}")
        _pos_int("num_kv_heads", num_kv_heads, 1)
        _pos_int("head_dim", head_dim, 2)
        _pos_int("batch", batch, 1)
        rot = head_dim if rotary_dim is None else _pos_int("rotary_dim", rotary_dim, 0)
        if rot > head_dim or rot % 2:
            raise ValueError(f"rotary_dim must be even and <= head_dim = {head_dim}, got {rot}")
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.shape != (rot // 2,):
            raise ValueError(f"inv_freq must be a ({rot // 2},) tensor (the decoder's RoPE "
                             f"inverse frequencies over rotary_dim = {rot} dims)")
        if mrope_interleaved and mrope_section is None:
            raise ValueError("mrope_interleaved=True needs mrope_section")
        dv = head_dim if value_dim is None else _pos_int("value_dim", value_dim, 1)
        kv = self.kv_layers
        self.key = torch.empty(len(kv), batch, num_kv_heads, capacity, head_dim, dtype=dtype,
                               device=device)
        self.value = torch.empty(len(kv), batch, num_kv_heads, capacity, dv, dtype=dtype,
                                 device=device)
        for li, layer in enumerate(kv):
            layer.key_buffer, layer.value_buffer = self.key[li], self.value[li]
            layer.dtype, layer.device = dtype, self.key.device
            layer.is_initialized = True
            layer._refresh()
        self.budget = budget
        self.inv_freq = inv_freq.to(device=self.key.device, dtype=torch.float32)
        self.compactions = 0
        # M-RoPE (t, h, w) sections: only the temporal pairs are re-rotated (None: 1-D)
        self.mrope_section = None if mrope_section is None else list(mrope_section)
        self.mrope_interleaved = bool(mrope_interleaved)
        self.rotary_dim = rot  # dims a key rotates over (< head_dim: partial rotary)
        # set ``record = True`` to keep the last KVCompactResult (keep mask, scores): tests,
        # the quality proxy; off by default (the score tensor is (2, L, B, H, C) fp32)
        self.record = False
        self.last_result: KVCompactResult | None = None

    @classmethod
    def for_text_config(cls, config: Any, capacity: int, *, budget: int,
                        inv_freq: torch.Tensor, dtype: torch.dtype,
                        device: torch.device | str, batch: int = 1) -> BudgetedKVCache:
        """A cache for the decoder described by ``config`` (its layer count, KV heads, head
        dim, ``layer_types``, M-RoPE ``mrope_section`` / ``mrope_interleaved`` and
        ``partial_rotary_factor``). Rejects RoPE variants a slot re-rotation cannot express
        (scaled RoPE types)."""
        tc = getattr(config, "text_config", None) or config
        rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise NotImplementedError(
                f"BudgetedKVCache re-rotates kept keys with plain RoPE; this decoder's rope "
                f"type {kind!r} is not supported")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        factor = rope.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", None))
        rot = head_dim if factor is None else int(head_dim * factor)  # transformers' rule
        return cls(tc.num_hidden_layers, capacity, budget=budget, inv_freq=inv_freq,
                   num_kv_heads=tc.num_key_value_heads, head_dim=head_dim, dtype=dtype,
                   device=device, batch=batch, layer_types=getattr(tc, "layer_types", None),
                   mrope_section=rope.get("mrope_section"),
                   mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
                   rotary_dim=rot)

    def compact(self, *, prefix: int = 0, recent: int = 0, tokens_per_frame: int = 0,
                tar_ratio: float | None = None, scores: torch.Tensor | None = None) -> int:
        """Compact every full-attention layer to ``budget`` rows in place (one op call);
        returns the new length. A no-op (no launch) while the cache holds <= ``budget``
        rows: the host length decides, so nothing syncs with the device."""
        n = self.get_seq_length()
        if n <= self.budget:
            return n
        res = kv_compact(self.key, self.value, n, budget=self.budget, inv_freq=self.inv_freq,
                         prefix=prefix, recent=recent, tokens_per_frame=tokens_per_frame,
                         tar_ratio=tar_ratio, scores=scores, mrope_section=self.mrope_section,
                         mrope_interleaved=self.mrope_interleaved, rotary_dim=self.rotary_dim)
        new = self.budget  # == res.new_length on device (min(n, budget), n > budget)
        for layer in self.kv_layers:
            layer.length = new
            layer._refresh()
        self.compactions += 1
        self.last_result = res if self.record else None
        return new

    # the stacked buffers are shared by all layers: per-layer re-batching would silently
    # detach a layer from ``key``/``value`` (and from the next compaction)
    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BudgetedKVCache has a fixed batch (stacked buffers)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BudgetedKVCache has a fixed batch (stacked buffers)")


def compact_per_layer(cache: PreallocatedKVCache, budget: int, *, prefix: int,
                      inv_freq: torch.Tensor | None) -> int:
    """Compact a cache whose layers own separate buffers (e.g. ``SummaryKVCache``, whose
    rows are a sink and Video-XL summaries) to ``budget`` rows per full-attention layer
    (linear-attention layers of a hybrid decoder keep their states untouched): one
    ``kv_compact`` call per layer (the buffers are not one stacked tensor), VaN only
    (summary rows are not frames of one grid, so TaR's patch index is undefined), the
    ``prefix`` rows protected. Keys: re-rotated to their new slots with the 1-D RoPE
    ``inv_freq`` (head_dim/2,), or, with ``inv_freq=None``, moved WITHOUT re-rotation
    (every kept row keeps the position it was computed at: Video-XL's logical positions on
    M-RoPE families, any section layout or partial rotary). Returns the new length; a no-op
    at or under the budget (host length: no sync)."""
    n = cache.get_seq_length()
    if n <= budget:
        return n
    for layer in cache.kv_layers:
        key = layer.key_buffer
        freq, rot = (inv_freq, None) if inv_freq is not None else \
            (key.new_zeros(0, dtype=torch.float32), 0)
        kv_compact(key.unsqueeze(0), layer.value_buffer.unsqueeze(0), n,
                   budget=budget, inv_freq=freq, prefix=prefix, tar_ratio=0.0,
                   rotary_dim=rot)
        layer.length = budget
        layer._refresh()
    return budget


__all__ = ["BudgetedKVCache", "compact_per_layer"]
