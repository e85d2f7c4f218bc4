"""``SummaryKVCache``: Video-XL's summary KV cache as a transformers ``Cache``.

One preallocated (B, Hkv, capacity, D) key and value buffer per layer. ``update`` (called
by the stock attention of any 1-D-RoPE decoder, Qwen2/Llama) copies the new rows in place
and returns *views* ``buf[:, :, :length]``; the attention function registered here under
the name ``"lvlm_summary"`` (transformers' ``AttentionInterface``) runs
:func:`lvlm_fast.ops.summary_attention` on those views (bottom-right causal, GQA, no mask
tensor, no copy of the cache). No mask function is registered for that name, so
transformers builds no mask at all.

Keys are cached *after* RoPE at position = buffer row (the model's default positions are
``get_seq_length() + arange``). After a window, :meth:`SummaryKVCache.evict_window` runs
:func:`lvlm_fast.ops.evict_summaries` on every layer: the window's summary rows move to
right after the retained summaries, keys re-rotated so the j-th summary sits at position
``sink + j``, and the length drops to ``sink + summaries``. That is the released model's
position scheme (it re-rotates a pre-RoPE cache at every call), at the cost of one
rotation per kept key. Question and answer tokens are appended raw.

Capacity (:meth:`SummaryKVCache.capacity_for`): ``prefix + N // r + max(window, tail)``
with eviction (the peak is inside a window or after the tail), ``prefix + N + N // r +
tail`` without. Over-filling raises ``ValueError`` before anything is written.
Batch: every row of the batch shares the layout (no padding support).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_utils import AttentionInterface

from lvlm_fast.ops import evict_summaries, summary_attention

ATTN_NAME = "lvlm_summary"


def summary_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, Hq, L, D), k/v (B, Hkv, S, D) -> (B, L, Hq, D)."""
    if dropout:
        raise ValueError(f"attention dropout is not supported by {ATTN_NAME!r}, got {dropout}")
    if attention_mask is not None:
        raise ValueError(f"{ATTN_NAME!r} takes no attention mask (bottom-right causal only)")
    out = summary_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, summary_attention_forward)


class PreallocatedLayer(CacheLayerMixin):
    """One layer's K/V buffer of ``capacity`` rows, allocated on the first update;
    ``keys``/``values`` are views of the filled rows."""

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty((b, h, self.capacity, d))
        self.value_buffer = value_states.new_empty((b, h, self.capacity, value_states.shape[3]))
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache capacity exceeded: {self.length} cached + {n} new > capacity "
                f"{self.capacity} (size a SummaryKVCache with SummaryKVCache.capacity_for)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.key_buffer[:, :, self.length : self.length + n].copy_(key_states)
        self.value_buffer[:, :, self.length : self.length + n].copy_(value_states)
        self.length += n
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh()


class PreallocatedKVCache(Cache):
    """A transformers ``Cache`` with one preallocated K/V buffer per layer.

    ``update`` copies the new rows in place and returns views of the filled rows, so the
    stock attention sees exactly the keys a ``DynamicCache`` would hold, without the
    copy-and-double of growing by concatenation. ``get_seq_length`` is a host int
    (positions never depend on device values)."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    def allocated_bytes(self) -> int:
        """Bytes of the allocated K/V buffers (all ``capacity`` rows)."""
        return sum(layer.key_buffer.nbytes + layer.value_buffer.nbytes
                   for layer in self.layers if layer.is_initialized)


class SummaryKVCache(PreallocatedKVCache):
    """Preallocated per-layer KV buffers with Video-XL eviction (see module doc)."""

    def __init__(self, num_layers: int, capacity: int, inv_freq: torch.Tensor, *,
                 evict: bool = True) -> None:
        super().__init__(num_layers, capacity)
        self.inv_freq = inv_freq
        self.evict = evict
        self.carry = 0
        self.num_summaries = 0
        self.sink_length: int | None = None

    # ----------------------------------------------------------------- sizing
    @staticmethod
    def capacity_for(prefix: int, num_visual: int, ratio: int, window: int, tail: int, *,
                     evict: bool = True) -> int:
        """Rows needed for a prefix, N visual tokens, ratio r, window W and a tail
        (question + generated tokens)."""
        _check_ratio_window(ratio, window)
        summaries = num_visual // ratio  # the carried remainder makes it exact overall
        if evict:
            return prefix + summaries + max(min(window, num_visual), tail)
        return prefix + num_visual + summaries + tail

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, prefix: int, num_visual: int, ratio: int,
                  window: int, tail: int, evict: bool = True) -> SummaryKVCache:
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(
                f"SummaryKVCache re-rotates keys with plain RoPE; rope_type "
                f"{rope.get('rope_type')!r} is not supported"
            )
        inner = model.model if hasattr(model, "model") else model
        cap = cls.capacity_for(prefix, num_visual, ratio, window, tail, evict=evict)
        return cls(cfg.num_hidden_layers, cap, inner.rotary_emb.inv_freq, evict=evict)

    def bytes(self) -> int:
        """Bytes of live K/V rows (``length`` rows per layer), i.e. what the cache holds."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def check_room(self, n: int) -> None:
        """Raise (before any write) if ``n`` more rows do not fit."""
        length = self.get_seq_length()
        if length + n > self.capacity:
            raise ValueError(
                f"SummaryKVCache capacity exceeded: {length} cached + {n} new > capacity "
                f"{self.capacity} (size the cache with SummaryKVCache.capacity_for)"
            )

    # ----------------------------------------------------------------- windows
    def mark_sink(self) -> None:
        self.sink_length = self.get_seq_length()

    def evict_window(self, window_start: int, n_raw: int, ratio: int) -> int:
        """After a window of ``n_raw`` raw tokens appended at ``window_start`` with this
        cache's carried remainder: keep its summaries (re-rotated), drop its raw rows.
        Returns the number of summaries kept. Advances the carried remainder."""
        _check_ratio_window(ratio, max(n_raw, 1))
        count = (n_raw + self.carry) // ratio
        expect = window_start + n_raw + count
        for li, layer in enumerate(self.layers):
            if layer.length != expect:
                raise ValueError(f"layer {li} holds {layer.length} rows, expected {expect} "
                                 "(window_start + raw tokens + summaries)")
        if self.evict:
            for layer in self.layers:
                evict_summaries(layer.key_buffer, layer.value_buffer, window_start=window_start,
                                ratio=ratio, carry=self.carry, count=count, dst=window_start,
                                inv_freq=self.inv_freq)
                layer.length = window_start + count
                layer._refresh()
        self.carry = (n_raw + self.carry) % ratio
        self.num_summaries += count
        return count


def _check_ratio_window(ratio: object, window: object) -> None:
    if not isinstance(ratio, int) or isinstance(ratio, bool):
        raise TypeError(f"ratio must be an int, got {type(ratio).__name__}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
