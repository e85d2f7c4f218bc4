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

Hybrid decoders (Qwen3.5: Gated DeltaNet linear-attention layers + full-attention layers,
``config.layer_types``): built with ``layer_types``, a cache holds a
:class:`PreallocatedLayer` (K/V rows) per full-attention layer and a
:class:`PreallocatedStateLayer` (the fixed-size conv window and recurrent state, updated
in place, never growing) per linear-attention layer. Capacity, ``get_seq_length``,
eviction and every KV budget concern the full-attention layers only: a linear-attention
layer has no per-token rows, its recurrent state has already absorbed every token it saw
(including raw tokens whose K/V rows :meth:`SummaryKVCache.evict_window` drops), so
eviction leaves it untouched. :meth:`PreallocatedKVCache.kv_bytes` and
:meth:`PreallocatedKVCache.state_bytes` report the two kinds of memory separately: the
first grows with the tokens held, the second is constant.

Generation API (both caches): beam-search reordering and ``crop`` (assisted /
prompt-lookup decoding) work in place in the preallocated buffers;
``batch_repeat_interleave``/``batch_select_indices`` reallocate (see
:class:`PreallocatedLayer`). ``model.generate(..., <cache>)`` checks the capacity against
the generation's length before the prompt runs. On a hybrid cache holding recurrent
state, ``crop`` raises: a recurrent state cannot be rewound to an earlier token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.modeling_utils import AttentionInterface

from lvlm_fast.ops import summary_attention
from lvlm_fast.ops._validate import is_meta_or_fake
from lvlm_fast.ops.evict_summaries import evict_summaries_layers

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
        _check_crop_count(tokens_to_remove)
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


def _check_crop_count(tokens_to_remove: object) -> None:
    """``crop``'s argument: an int <= 0 (transformers' convention: minus the rows to drop)."""
    if not isinstance(tokens_to_remove, int) or isinstance(tokens_to_remove, bool):
        raise TypeError(f"tokens_to_remove must be an int, got "
                        f"{type(tokens_to_remove).__name__}")
    if tokens_to_remove > 0:
        raise ValueError(f"crop takes a negative number of tokens to remove (as "
                         f"DynamicCache), got {tokens_to_remove}")


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


# layer_types (transformers' config.layer_types) whose layers cache per-token K/V rows;
# sliding/chunked layers are kept as full K/V (the "lvlm_summary" mask function refuses
# their masks at run time, with a message, rather than here).
KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
STATE_LAYER_TYPES = ("linear_attention",)


class PreallocatedStateLayer(LinearAttentionCacheLayerMixin):
    """One linear-attention layer's fixed-size states (Qwen3.5's Gated DeltaNet): per state
    index, a conv window ``(B, channels, kernel)`` (the last ``kernel`` inputs of the causal
    depthwise conv) and a recurrent state (``(B, heads, d_k, d_v)`` for Gated DeltaNet).

    The interface is transformers' (``update_conv_state`` / ``update_recurrent_state`` /
    ``has_previous_state``, read by the model through ``Cache.get_conv_state``): the
    buffers are allocated on the first update with the shapes the layer gives and from
    then on only written in place (``copy_``), so a prefill of any length, in any number
    of chunks, and every decode step reuse the same storage. ``update_conv_state`` returns
    ``[previous window ; new inputs]`` (a temporary the conv reads), exactly as
    transformers' ``LinearAttentionLayer`` does, so chunked prefill carries the states
    across chunks exactly.

    What it cannot do, it refuses (``ValueError``) before touching anything: ``crop`` of a
    layer holding state (a recurrent state cannot be rewound to an earlier token), past
    recording (it would grow the conv window), offloading, an update whose batch or state
    shape differs from the allocated one. Beam reordering is in place; batch ops reallocate
    (the batch dimension changes), as :class:`PreallocatedLayer`'s do."""

    is_compileable = False
    is_sliding = False

    def __init__(self, number_of_states: int = 1) -> None:
        if not isinstance(number_of_states, int) or isinstance(number_of_states, bool) \
                or number_of_states < 1:
            raise ValueError(f"number_of_states must be a positive int, got "
                             f"{number_of_states!r}")
        super().__init__(number_of_states=number_of_states)
        self.is_initialized = False  # read by transformers' generic cache code

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, conv_states: torch.Tensor | None = None,
                            recurrent_states: torch.Tensor | None = None, state_idx: int = 0,
                            conv_kernel_size: int | None = None) -> None:
        if conv_states is not None:
            if self.device is None:
                self.dtype, self.device = conv_states.dtype, conv_states.device
            k = conv_states.shape[-1] if conv_kernel_size is None else conv_kernel_size
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"conv_kernel_size must be a positive int, got {k!r}")
            self.conv_kernel_size[state_idx] = k
            self.conv_states[state_idx] = conv_states.new_zeros((*conv_states.shape[:-1], k))
            self.is_conv_states_initialized[state_idx] = True
        if recurrent_states is not None:
            if self.device is None:
                self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
            self.recurrent_states[state_idx] = torch.zeros_like(recurrent_states)
            self.is_recurrent_states_initialized[state_idx] = True
        self.is_initialized = True

    def _check_state_idx(self, state_idx: object) -> int:
        if not isinstance(state_idx, int) or isinstance(state_idx, bool) \
                or not 0 <= state_idx < self.number_of_states:
            raise ValueError(f"state_idx must be an int in [0, {self.number_of_states}), got "
                             f"{state_idx!r}")
        return state_idx

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Store the last ``kernel`` inputs in place; return the inputs with the previous
        window prepended (the first update: left-padded with zeros to ``kernel`` if
        shorter, as transformers' ``LinearAttentionLayer``)."""
        i = self._check_state_idx(state_idx)
        if not isinstance(conv_states, torch.Tensor) or conv_states.dim() != 3:
            got = tuple(conv_states.shape) if isinstance(conv_states, torch.Tensor) \
                else type(conv_states).__name__
            raise ValueError(f"conv_states must be a (batch, channels, length) tensor, got {got}")
        if not self.is_conv_states_initialized[i]:
            self.lazy_initialization(conv_states=conv_states, state_idx=i,
                                     conv_kernel_size=conv_kernel_size)
        buf = self.conv_states[i]
        if conv_states.shape[:2] != buf.shape[:2]:
            raise ValueError(
                f"conv_states has (batch, channels) = {tuple(conv_states.shape[:2])} but this "
                f"cache was allocated for {tuple(buf.shape[:2])}; a cache holds one batch "
                "(change it with batch_repeat_interleave / batch_select_indices)")
        k = buf.shape[-1]
        if not self.has_previous_state[i]:
            full = conv_states
            if full.shape[-1] < k:
                full = torch.nn.functional.pad(full, (k - full.shape[-1], 0), value=0)
            self.has_previous_state[i] = True
        else:
            full = torch.cat([buf, conv_states.to(buf.dtype)], dim=-1)
        buf.copy_(full[..., -k:])
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0,
                               **kwargs: Any) -> torch.Tensor:
        """Copy the new recurrent state into the buffer (in place); return the buffer."""
        i = self._check_state_idx(state_idx)
        if not isinstance(recurrent_states, torch.Tensor):
            raise ValueError(f"recurrent_states must be a tensor, got "
                             f"{type(recurrent_states).__name__}")
        if not self.is_recurrent_states_initialized[i]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=i)
        buf = self.recurrent_states[i]
        if recurrent_states.shape != buf.shape:
            raise ValueError(f"recurrent_states has shape {tuple(recurrent_states.shape)} but "
                             f"this cache was allocated for {tuple(buf.shape)}")
        buf.copy_(recurrent_states)
        return buf

    def _buffers(self) -> list[tuple[dict[int, torch.Tensor | None], int]]:
        """(dict, state index) of every allocated buffer."""
        out = []
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                out.append((self.conv_states, i))
            if self.is_recurrent_states_initialized[i]:
                out.append((self.recurrent_states, i))
        return out

    @property
    def batch_size(self) -> int:
        # read by transformers' ``Cache.batch_size``; absent (AttributeError) until allocated
        bufs = self._buffers()
        if not bufs:
            raise AttributeError("batch_size")
        d, i = bufs[0]
        return d[i].shape[0]

    @property
    def has_state(self) -> bool:
        """True once any token went through this layer (since the last ``reset``)."""
        return any(self.has_previous_state.values())

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return not self.has_state

    def nbytes(self) -> int:
        """Bytes of the allocated state buffers (constant in the number of tokens)."""
        return sum(d[i].nbytes for d, i in self._buffers())

    def get_seq_length(self) -> int:
        # no per-token rows: the cache's length is its full-attention layers' (transformers'
        # Cache.get_seq_length skips linear layers the same way)
        return 0

    def get_max_length(self) -> int:
        return -1

    # reset (inherited): zero the buffers in place, has_previous_state False

    def offload(self) -> None:
        raise NotImplementedError("PreallocatedKVCache does not support offloading")

    prefetch = offload

    def activate_past_recording(self) -> None:
        raise ValueError("PreallocatedStateLayer keeps fixed-size states in place: past "
                         "recording (a growing conv window for crop) is not supported; a "
                         "recurrent state cannot be rewound anyway")

    # ------------------------------------------------------------------ generation ops
    def crop(self, tokens_to_remove: int) -> None:
        """Refused once the layer holds state (``ValueError``): the recurrent state has
        absorbed every token and cannot be rewound. ``crop(0)`` and crops of an empty
        layer are no-ops."""
        _check_crop_count(tokens_to_remove)
        if tokens_to_remove and self.has_state:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} token(s) from a linear-attention layer: its "
                "recurrent state has absorbed them and cannot be rewound (assisted / "
                "prompt-lookup decoding is not supported on hybrid models with this cache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place."""
        bufs = self._buffers()
        if not bufs:
            return
        b = self.batch_size
        idx = _batch_index(beam_idx, b, "beam_idx", bufs[0][0][bufs[0][1]].device)
        if idx.shape[0] != b:
            raise ValueError(f"beam_idx must have one entry per cached row ({b}), got "
                             f"{idx.shape[0]}")
        for d, i in bufs:
            d[i].copy_(d[i].index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (new buffers: the batch changes)."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if repeats == 1:
            return
        for d, i in self._buffers():
            d[i] = d[i].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (int indices or a bool mask over the batch)."""
        bufs = self._buffers()
        if not bufs:
            return
        idx = _batch_index(indices, self.batch_size, "indices", bufs[0][0][bufs[0][1]].device)
        for d, i in bufs:
            d[i] = d[i].index_select(0, idx)


def _check_layer_types(layer_types: object, num_layers: int) -> list[str] | None:
    if layer_types is None:
        return None
    if isinstance(layer_types, str) or not isinstance(layer_types, Sequence):
        raise TypeError(f"layer_types must be a sequence of layer type names or None, got "
                        f"{type(layer_types).__name__}")
    types = list(layer_types)
    if len(types) != num_layers:
        raise ValueError(f"layer_types must name {num_layers} layers (num_layers), got "
                         f"{len(types)}")
    bad = sorted({t for t in types if t not in KV_LAYER_TYPES + STATE_LAYER_TYPES}, key=str)
    if bad:
        raise ValueError(f"layer_types holds unsupported layer type(s) {bad}; supported: "
                         f"{', '.join(KV_LAYER_TYPES + STATE_LAYER_TYPES)}")
    if not any(t in KV_LAYER_TYPES for t in types):
        raise ValueError("layer_types has no attention layer: a KV cache needs at least one")
    return types


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
    (``is_compileable`` is False).

    ``layer_types`` (the decoder config's ``layer_types``; None = every layer full
    attention): ``"linear_attention"`` layers get a :class:`PreallocatedStateLayer`
    (fixed-size conv/recurrent states, in place), every attention type a
    :class:`PreallocatedLayer` of ``capacity`` rows. ``capacity`` and the length are those
    of the attention layers (see the module doc); :meth:`for_config` reads both from a
    config."""

    def __init__(self, num_layers: int, capacity: int,
                 layer_types: Sequence[str] | None = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        types = _check_layer_types(layer_types, num_layers)
        layers: list[Any] = [
            PreallocatedStateLayer() if types is not None and types[i] in STATE_LAYER_TYPES
            else PreallocatedLayer(capacity) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.capacity = capacity
        self.layer_types = types

    @classmethod
    def for_config(cls, config: Any, capacity: int, **kwargs: Any) -> PreallocatedKVCache:
        """A cache for the decoder described by ``config`` (a text config, or a VLM config
        with ``text_config``): its layer count and ``layer_types``."""
        tc = getattr(config, "text_config", None) or config
        return cls(tc.num_hidden_layers, capacity, getattr(tc, "layer_types", None), **kwargs)

    @property
    def kv_layers(self) -> list[PreallocatedLayer]:
        """The full-attention layers (per-token K/V rows; what eviction and budgets act on)."""
        return [la for la in self.layers if isinstance(la, PreallocatedLayer)]

    @property
    def state_layers(self) -> list[PreallocatedStateLayer]:
        """The linear-attention layers (fixed-size recurrent states; never evicted)."""
        return [la for la in self.layers if isinstance(la, PreallocatedStateLayer)]

    def allocated_bytes(self) -> int:
        """Bytes of the allocated K/V buffers (all ``capacity`` rows; full-attention layers
        only, see :meth:`state_bytes` for the linear-attention layers)."""
        return sum(layer.key_buffer.nbytes + layer.value_buffer.nbytes
                   for layer in self.kv_layers if layer.is_initialized)

    def kv_bytes(self) -> int:
        """Bytes of the K/V rows held (``length`` rows per full-attention layer): memory
        that grows with the tokens kept."""
        return sum(layer.keys.nbytes + layer.values.nbytes
                   for layer in self.kv_layers if layer.is_initialized)

    def state_bytes(self) -> int:
        """Bytes of the linear-attention layers' conv and recurrent states: constant in the
        number of tokens (0 for a decoder without linear-attention layers)."""
        return sum(layer.nbytes() for layer in self.state_layers)

    def crop(self, tokens_to_remove: int) -> None:
        """As :meth:`PreallocatedLayer.crop` on every attention layer; refused
        (``ValueError``, nothing changed) when a linear-attention layer holds state."""
        for layer in self.layers:  # type and sign checks first: nothing cropped on error
            if isinstance(layer, PreallocatedStateLayer):
                layer.crop(tokens_to_remove)
        super().crop(tokens_to_remove)

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
    """Preallocated per-layer KV buffers with Video-XL eviction (see module doc). On a
    hybrid decoder (``layer_types``) the capacity, the eviction and the byte counts of
    :meth:`bytes` concern the full-attention layers only; the linear-attention layers'
    recurrent states are never evicted (they already summarise every token)."""

    def __init__(self, num_layers: int, capacity: int, inv_freq: torch.Tensor, *,
                 evict: bool = True, layer_types: Sequence[str] | None = None) -> None:
        super().__init__(num_layers, capacity, layer_types)
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
        half = (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) // 2
        if inv_freq.shape[0] < half:
            # partial rotary (Qwen3.5 rotates 1/4 of the head dim, pairing dims (i, i + rot/2)):
            # a re-rotation here pairs (i, i + D/2), so only keeping positions (zero
            # frequencies: no rotation at all) is defined; the rest are padded with zeros.
            # One host read at construction (skipped on meta, where nothing runs).
            if not is_meta_or_fake(inv_freq) and bool(inv_freq.any()):
                raise NotImplementedError(
                    f"SummaryKVCache: this decoder rotates {2 * inv_freq.shape[0]} of its "
                    f"{2 * half} head dims (partial rotary); re-rotating summaries is not "
                    "supported. Pass inv_freq=zeros (logical positions kept, as the videoxl "
                    "strategy does)")
            inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(half - inv_freq.shape[0])])
        return cls(cfg.num_hidden_layers, cap, inv_freq, evict=evict,
                   layer_types=getattr(cfg, "layer_types", None))

    def bytes(self) -> int:
        """Bytes of live K/V rows (``length`` rows per full-attention layer), i.e. what the
        cache holds of tokens (:meth:`kv_bytes`); a hybrid decoder's recurrent states are
        :meth:`state_bytes`."""
        return self.kv_bytes()

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
        Returns the number of summaries kept. Advances the carried remainder.

        Full-attention layers only: a hybrid decoder's linear-attention layers are left
        exactly as they are (their recurrent state has already absorbed the window's raw
        and summary tokens; there are no rows to drop)."""
        _check_ratio_window(ratio, max(n_raw, 1))
        count = (n_raw + self.carry) // ratio
        expect = window_start + n_raw + count
        for li, layer in enumerate(self.layers):
            if isinstance(layer, PreallocatedLayer) and layer.length != expect:
                raise ValueError(f"layer {li} holds {layer.length} rows, expected {expect} "
                                 "(window_start + raw tokens + summaries)")
        if self.evict:
            kv = list(self.kv_layers)
            # one validation and one launch for all layers (issue 14.2.4)
            evict_summaries_layers([la.key_buffer for la in kv], [la.value_buffer for la in kv],
                                   window_start=window_start, ratio=ratio, carry=self.carry,
                                   count=count, dst=window_start, inv_freq=self.inv_freq)
            for layer in kv:
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
