"""Qwen3.5: ``Qwen3_5ForConditionalGeneration``, Qwen3-VL's vision side on a hybrid decoder.

Everything before the decoder is Qwen3-VL's (:class:`Qwen3VLFamily`, subclassed): the same
vision tower (patch 16, 2 frames per temporal patch, 2x2 merger, learned position embedding
interpolated per grid, no windows) minus DeepStack (``Qwen3_5VisionModel`` has no
DeepStack mergers, so :meth:`deepstack_levels` is 0 and a strategy's rows are plain
``hidden``-wide features), the same processor (transformers maps ``qwen3_5`` to
``Qwen3VLProcessor`` / ``Qwen3VLVideoProcessor``: ``<t seconds><|vision_start|> ...
<|vision_end|>`` per temporal unit) and the same position rule (``Qwen3_5Model.get_rope_index``
is Qwen3-VL's: one grid per frame with temporal index 0, a block at ``(cur, cur + y,
cur + x)`` then ``cur += max(h, w)``). So every strategy has exactly its Qwen3-VL semantics
here (keyframes, pooled grids, timestamps of kept units), without the DeepStack part.

The decoder is the difference. ``text_config.layer_types`` mixes Gated DeltaNet
linear-attention layers (3 of every 4 on the 9B) with gated full-attention layers (head dim
256, partial rotary: 1/4 of the head dim rotated, interleaved M-RoPE sections 11/11/10).
The wrapper's cache (:meth:`lvlm_fast.cache.PreallocatedKVCache.for_config`) gives the
full-attention layers preallocated K/V rows and the linear-attention layers their
fixed-size conv window and recurrent state, updated in place; chunked prefill carries those
states from chunk to chunk exactly (tested against ``generate``). Consequences:

* **Memory**: only the full-attention layers' KV grows with tokens (8 of 32 layers on the
  9B); the recurrent states are constant (``state_bytes``).
* **videoxl**: eviction and the cache's capacity act on the full-attention layers only. The
  linear-attention layers have no rows to evict: their recurrent state has absorbed every
  token of every window, raw and summary alike, and is never touched by eviction. So on
  Qwen3.5 an evicted raw token still reaches later tokens through the recurrent state (a
  property of the hybrid decoder, not of Video-XL). Summary tokens pass the
  linear-attention layers with their ordinary weights (Video-XL's summary projections are
  q/k/v of attention layers; a linear-attention layer has none). Summaries keep logical
  positions (moved unrotated), as on every M-RoPE family, with or without ``kv_budget``
  (whose compaction also moves the kept rows unrotated, full-attention layers only).
* **stream** (and ``kv_budget`` on any strategy): the budgeted cache holds K/V rows for
  the full-attention layers only and compacts only those; the linear-attention states
  carry across every window and are never touched by a compaction. Re-rotation to slots
  acts on the temporal pairs of the rotated quarter of each key (partial rotary), the
  rest of the key moves as is (:func:`lvlm_fast.ops.kv_compact`, ``rotary_dim``).
* **Fused attention**: head dim 256 is not one of the fused kernel's (64, 80, 96, 128), so
  ``attention="auto"`` keeps the model's own attention on the 9B; the tiny test config
  (head dim 64) runs the fused kernel.
* ``crop`` (assisted decoding) is refused once the recurrent state exists: it cannot be
  rewound.
"""

from __future__ import annotations

from typing import Any

from lvlm_fast.models.families.base import register_family
from lvlm_fast.models.families.qwen3_vl import Qwen3VLFamily


@register_family
class Qwen35Family(Qwen3VLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    class_names = ("Qwen3_5ForConditionalGeneration",)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        types = getattr(self.text_config, "layer_types", None) or []
        if "full_attention" not in types:
            # the KV cache, positions and every strategy's prompt need attention layers
            raise ValueError("Qwen3.5 text_config.layer_types has no full_attention layer")

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen3_5ForConditionalGeneration

        return Qwen3_5ForConditionalGeneration

    def deepstack_levels(self) -> int:
        """Qwen3.5's vision tower has no DeepStack mergers (``Qwen3_5VisionModel``)."""
        return 0

    def num_state_layers(self) -> int:
        """Linear-attention layers: fixed-size recurrent state, no per-token KV."""
        return sum(t == "linear_attention" for t in self.text_config.layer_types)

    def num_kv_layers(self) -> int:
        """Full-attention layers: the only ones whose KV grows with tokens."""
        return sum(t != "linear_attention" for t in self.text_config.layer_types)


__all__ = ["Qwen35Family"]
