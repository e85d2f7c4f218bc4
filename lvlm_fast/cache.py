"""``SummaryKVCache``: Video-XL's summary KV cache as a transformers ``Cache``.

One preallocated (B, Hkv, capacity, D) key and value buffer per layer. ``update`` (called
by the stock attention of any 1-D-RoPE decoder, Qwen2/Llama) copies the new rows in place
and returns *views* ``buf[:, :, :length]``; the attention function registered here under
the name ``"lvlm_summary"`` (transformers' ``AttentionInterface``) runs
:func:`lvlm_fast.ops.summary_attention` on those views (bottom-right causal, GQA, no mask
tensor, no copy of the cache). The mask function registered under the same name
(:func:`summary_attention_mask`) builds no mask but refuses, before any layer runs, a
padded batch or any mask other than plain causal (sliding windows, packed sequences):
the kernel has no padding, and silently attending to pad tokens is not an option.

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

Generation API (both caches): beam-search reordering and ``crop`` (assisted /
prompt-lookup decoding) work in place in the preallocated buffers;
``batch_repeat_interleave``/``batch_select_indices`` reallocate (see
:class:`PreallocatedLayer`). ``model.generate(..., <cache>)`` checks the capacity against
the generation's length before the prompt runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
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


def summary_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> None:
    """transformers mask function for ``"lvlm_summary"``: builds nothing (the kernel is
    bottom-right causal by construction) but refuses, before any layer runs, every mask it
    cannot honour. Without a registered mask function transformers skips mask creation and
    a left-padded batch would silently attend to its pad tokens.

    * ``attention_mask`` is the 2-D (B, past + L) padding mask; any zero is a padded row.
      (``generate`` drops an all-ones mask, so an unpadded batch costs no host sync.)
    * ``mask_function`` other than the plain causal one means sliding windows, packed
      sequences, bidirectional blocks or a custom overlay, none of which the kernel has."""
    if mask_function is not None and mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise ValueError(
            f"attn_implementation {ATTN_NAME!r} is plain bottom-right causal attention; this "
            f"model needs the mask {name!r} (sliding window, packed sequences or an overlay). "
            "Use attn_implementation='sdpa'"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attn_implementation {ATTN_NAME!r} does not support padded batches: attention_mask "
            f"has padding (zeros) in a ({', '.join(map(str, attention_mask.shape))}) mask. Run "
            "the rows one at a time, or use attn_implementation='sdpa' for padded batches"
        )
    return None


AttentionInterface.register(ATTN_NAME, summary_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, summary_attention_mask)


def check_cache_room(cache: Cache, needed: int, what: str = "the next step") -> None:
    """Raise a ``ValueError`` naming capacity and need if ``cache`` (any transformers
    ``Cache``; unbounded ones pass) cannot hold ``needed`` rows in total."""
    if not cache.layers:  # a DynamicCache before its first update: unbounded
        return
    cap = cache.get_max_length()
    if cap is not None and cap >= 0 and needed > cap:
        raise ValueError(
            f"KV cache too small for {what}: needs {needed} rows, capacity is {cap} "
            f"(currently holding {cache.get_seq_length()}); allocate a larger cache"
        )


class PreallocatedLayer(CacheLayerMixin):
    """One layer's K/V buffer of ``capacity`` rows, allocated on the first update;
    ``keys``/``values`` are views of the filled rows.

    Every operation keeps ``keys``/``values`` views of ``key_buffer``/``value_buffer`` and
    writes the buffers in place: beam reordering and ``crop`` never allocate a buffer (a
    rebound copy, as transformers' generic ``reorder_cache`` makes, would be silently
    overwritten by the next ``update``). Batch ops change the batch dimension, so they
    allocate new (B', H, capacity, D) buffers, copy the filled rows and drop the old ones
    (freed when nothing else references them; peak = old + new buffers)."""

    is_compileable = False  # the length is a host int (positions never read the device)
    is_croppable = True
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

    @property
    def batch_size(self) -> int:
        # read by transformers' ``Cache.batch_size``; absent (AttributeError) until allocated
        if self.key_buffer is None:
            raise AttributeError("batch_size")
        return self.key_buffer.shape[0]

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (batch, heads, length, head_dim) tensor, "
                                 f"got {got}")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states "
                             f"{tuple(value_states.shape)} differ in batch, heads or length")
        if not self.is_initialized:
            return
        for name, t, buf in (("key_states", key_states, self.key_buffer),
                             ("value_states", value_states, self.value_buffer)):
            want = (buf.shape[0], buf.shape[1], buf.shape[3])
            got = (t.shape[0], t.shape[1], t.shape[3])
            if got != want:
                raise ValueError(
                    f"{name} has (batch, heads, head_dim) = {got} but this cache was allocated "
                    f"for {want}; a cache holds one batch (change it with "
                    "batch_repeat_interleave / batch_select_indices, or use a new cache)"
                )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_states(key_states, value_states)
        n = key_states.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache capacity exceeded: {self.length} cached + {n} new > capacity "
                f"{self.capacity} (size the cache for the whole prompt and answer; a "
                "SummaryKVCache with SummaryKVCache.capacity_for)"
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
        """Empty the layer; the buffers (and their batch) are kept for reuse."""
        self.length = 0
        if self.is_initialized:
            self._refresh()

    def offload(self) -> None:
        # transformers' offload rebinds ``keys`` to a CPU copy that the next in-place
        # update would not see; a preallocated cache is sized to stay on its device.
        raise NotImplementedError("PreallocatedKVCache does not support offloading")

    prefetch = offload

    # ------------------------------------------------------------ generation ops
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` of the batch becomes old row ``beam_idx[i]``, in place."""
        if not self.is_initialized or self.length == 0:
            return
        idx = _batch_index(beam_idx, self.key_buffer.shape[0], "beam_idx", self.key_buffer.device)
        if idx.shape[0] != self.key_buffer.shape[0]:
            raise ValueError(f"beam_idx must have one entry per cached row "
                             f"({self.key_buffer.shape[0]}), got {idx.shape[0]}")
        # gather into a temporary of the filled rows, then write back into the same storage
        self.keys.copy_(self.keys.index_select(0, idx))
        self.values.copy_(self.values.index_select(0, idx))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` rows (transformers' convention: a negative
        count; 0 is a no-op). Nothing is freed or copied: the rows are overwritten later."""
        if not isinstance(tokens_to_remove, int) or isinstance(tokens_to_remove, bool):
            raise TypeError(f"tokens_to_remove must be an int, got "
                            f"{type(tokens_to_remove).__name__}")
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove (as "
                             f"DynamicCache), got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._refresh()

    def _rebatch(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New (B', H, capacity, D) buffers holding ``keys``/``values`` (B', H, length, D)."""
        kb = self.key_buffer.new_empty((keys.shape[0], *self.key_buffer.shape[1:]))
        vb = self.value_buffer.new_empty((values.shape[0], *self.value_buffer.shape[1:]))
        kb[:, :, : self.length].copy_(keys)
        vb[:, :, : self.length].copy_(values)
        self.key_buffer, self.value_buffer = kb, vb
        self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (rows b, b, ..., b+1, ...)."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if not self.is_initialized or repeats == 1:
            return
        b = self.key_buffer.shape[0]
        kb = self.key_buffer.new_empty((b * repeats, *self.key_buffer.shape[1:]))
        vb = self.value_buffer.new_empty((b * repeats, *self.value_buffer.shape[1:]))
        # broadcast copy into a (B, repeats, ...) view: no repeated temporary
        n = self.length
        kb.view(b, repeats, *kb.shape[1:])[:, :, :, :n].copy_(self.keys.unsqueeze(1))
        vb.view(b, repeats, *vb.shape[1:])[:, :, :, :n].copy_(self.values.unsqueeze(1))
        self.key_buffer, self.value_buffer = kb, vb
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (int indices or a bool mask over the batch)."""
        if not self.is_initialized:
            return
        idx = _batch_index(indices, self.key_buffer.shape[0], "indices", self.key_buffer.device)
        self._rebatch(self.keys.index_select(0, idx), self.values.index_select(0, idx))


def _batch_index(indices: Any, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """``indices`` (ints, a 1-D int tensor or a (batch,) bool mask) as a 1-D int64 tensor
    on ``device``, range-checked against ``batch``."""
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices)
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")
    if indices.dtype == torch.bool:
        if indices.shape[0] != batch:
            raise ValueError(f"{name} as a bool mask must have {batch} entries (the cached "
                             f"batch), got {indices.shape[0]}")
        indices = indices.nonzero().flatten()
    elif indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TypeError(f"{name} must hold integer indices or a bool mask, got {indices.dtype}")
    if indices.numel() and not (-batch <= int(indices.min()) and int(indices.max()) < batch):
        raise ValueError(f"{name} must index the cached batch of {batch} rows, got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return indices.to(device=device, dtype=torch.long) % batch


class PreallocatedKVCache(Cache):
    """A transformers ``Cache`` with one preallocated K/V buffer per layer.

    ``update`` copies the new rows in place and returns views of the filled rows, so the
    stock attention sees exactly the keys a ``DynamicCache`` would hold, without the
    copy-and-double of growing by concatenation. ``get_seq_length`` is a host int
    (positions never depend on device values).

    Supports what ``generate`` needs of a cache: beam search (``reorder_cache``, in place),
    assisted / prompt-lookup decoding (``crop``), ``batch_repeat_interleave`` and
    ``batch_select_indices``, ``reset`` (keeps the buffers). One batch per cache: an update
    with another batch size raises. Given to ``model.generate``, it checks its capacity
    against the generation's ``max_length`` before the prompt runs (see
    :meth:`_check_generate`); ``torch.compile`` of the decode step is not supported
    (``is_compileable`` is False)."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    def allocated_bytes(self) -> int:
        """Bytes of the allocated K/V buffers (all ``capacity`` rows)."""
        return sum(layer.key_buffer.nbytes + layer.value_buffer.nbytes
                   for layer in self.layers if layer.is_initialized)

    def check_room(self, n: int) -> None:
        """Raise (before any write) if ``n`` more rows do not fit."""
        length = self.get_seq_length()
        if length + n > self.capacity:
            raise ValueError(
                f"{type(self).__name__} capacity exceeded: {length} cached + {n} new > "
                f"capacity {self.capacity} (size the cache for the whole prompt and answer)"
            )

    # transformers' ``generate`` gives a user cache no sight of the target length, except
    # in ``_prepare_cache_for_generation``, which marks it ``_is_user_defined`` right after
    # computing ``max_cache_length`` (= max_length - 1, the most rows the decode will hold)
    # and the batch size. Setting that flag is the one hook that runs before the prefill,
    # so the capacity is checked there; a transformers that renames those locals simply
    # loses this early check (the per-update check remains).
    @property
    def _is_user_defined(self) -> bool:
        return getattr(self, "_user_defined_flag", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        self._user_defined_flag = value
        if value:
            self._check_generate(sys._getframe(1))

    def _check_generate(self, frame: Any) -> None:
        if frame.f_code.co_name != "_prepare_cache_for_generation":
            return
        need = frame.f_locals.get("max_cache_length")
        batch = frame.f_locals.get("batch_size")
        config = frame.f_locals.get("generation_config")
        if isinstance(need, int) and need > self.capacity:
            raise ValueError(
                f"{type(self).__name__} capacity {self.capacity} is too small for this "
                f"generate call: it needs {need} rows (prompt + max_new_tokens - 1); "
                f"allocate a cache with capacity >= {need}"
            )
        if isinstance(batch, int) and config is not None and self.is_initialized:
            rows = batch * max(getattr(config, "num_beams", 1) or 1,
                               getattr(config, "num_return_sequences", 1) or 1)
            if rows != self.batch_size:
                raise ValueError(
                    f"{type(self).__name__} holds a batch of {self.batch_size} rows but this "
                    f"generate call runs {rows} (batch x beams / return sequences)"
                )


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
        # rows up to here (sink + kept summaries) carry the window bookkeeping above;
        # ``crop`` may only remove rows appended after them (question, answer)
        self.frozen_length = 0

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
                  window: int, tail: int, evict: bool = True,
                  inv_freq: torch.Tensor | None = None) -> SummaryKVCache:
        """``inv_freq``: the rotation applied to kept summaries on eviction; None = the
        decoder's own 1-D RoPE frequencies (summaries re-rotated to ``sink + j``). A caller
        that keeps logical positions (M-RoPE families, explicit position ids) passes zeros:
        summaries are then moved without rotation."""
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise NotImplementedError(
                f"SummaryKVCache re-rotates keys with plain RoPE; rope_type "
                f"{rope.get('rope_type')!r} is not supported"
            )
        if inv_freq is None and "mrope_section" in rope:
            raise NotImplementedError(
                "SummaryKVCache: this decoder uses M-RoPE (mrope_section); a 1-D re-rotation "
                "of its summaries would be wrong. Pass inv_freq (zeros keep logical positions, "
                "as the videoxl strategy does through the model family)"
            )
        inner = model.model if hasattr(model, "model") else model
        cap = cls.capacity_for(prefix, num_visual, ratio, window, tail, evict=evict)
        if inv_freq is None:
            inv_freq = inner.rotary_emb.inv_freq
        return cls(cfg.num_hidden_layers, cap, inv_freq, evict=evict)

    def bytes(self) -> int:
        """Bytes of live K/V rows (``length`` rows per layer), i.e. what the cache holds."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def reset(self) -> None:
        """Empty the cache and its window bookkeeping (buffers kept)."""
        super().reset()
        self.carry = 0
        self.num_summaries = 0
        self.sink_length = None
        self.frozen_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """As :meth:`PreallocatedLayer.crop`, but never into the sink or the summaries."""
        if isinstance(tokens_to_remove, int) and tokens_to_remove < 0 \
                and self.get_seq_length() + tokens_to_remove < self.frozen_length:
            room = self.get_seq_length() - self.frozen_length
            raise ValueError(
                f"crop({tokens_to_remove}) would cut into the sink and summaries "
                f"({self.frozen_length} rows); at most {room} appended rows can be removed"
            )
        super().crop(tokens_to_remove)

    def _check_generate(self, frame: Any) -> None:
        # after eviction a row is no longer a token: generate's length arithmetic (and its
        # positions) do not apply, so only an uncompressed cache is checked
        if self.evict and self.sink_length is not None:
            return
        super()._check_generate(frame)

    # ----------------------------------------------------------------- windows
    def mark_sink(self) -> None:
        self.sink_length = self.get_seq_length()
        self.frozen_length = self.sink_length

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
        self.frozen_length = self.get_seq_length()
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
