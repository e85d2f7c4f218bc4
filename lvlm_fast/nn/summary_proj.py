"""Video-XL summary-token parameters: separate q/k/v projections for summary rows, and the
summary-token embedding.

Summary rows sit at a fixed stride inside a window (slot i is a summary iff
``i % (r+1) == r - c``), so they are the strided view ``x[:, first::stride]`` of the
window's hidden states: no boolean mask, no gather. :class:`SummaryLinear` computes the
base projection for every row, then overwrites the summary rows (a strided view of the
output) with the summary projection of the same strided view of the input.

Without checkpoint summary weights the summary projection starts equal to the base (the
released init) and SHARES the base's parameters (the same ``nn.Linear``, tied like an LM
head to its embedding): no copy of q/k/v (a deep copy was ~0.9 GB on a 7B model), and the
summary rows need no second matmul. Call :meth:`SummaryLinear.untie_summary` (or
``install_summary_projections(..., share_base=False)``) before training, perturbing or
loading separate summary weights into it, since writing a tied summary weight writes the
base. Outside a
window (prefix, question, generation) the layout is empty and it is exactly the base
layer. The layout is one shared mutable :class:`SummaryLayout` that the window driver sets
before a window's forward and clears after it (host ints; no device sync).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SummaryLayout:
    """Where the summary rows of the current chunk are: rows first, first+stride, ...
    (count of them). count = 0 means no summary rows (plain projections)."""

    first: int = 0
    stride: int = 1
    count: int = 0

    def set(self, first: int, stride: int, count: int) -> None:
        self.first, self.stride, self.count = first, stride, count

    def clear(self) -> None:
        self.count = 0


class SummaryLinear(nn.Module):
    """Drop-in replacement for an attention q/k/v ``nn.Linear``: summary rows use their own
    weights (``self.summary``), raw rows the base layer's (``self.base``).

    ``summary=None`` ties the summary projection to the base (``self.summary is
    self.base``: same parameters, no copy; see the module docstring); ``share_base=False``
    starts it as a separate copy instead (trainable on its own)."""

    def __init__(self, base: nn.Linear, layout: SummaryLayout,
                 summary: nn.Linear | None = None, *, share_base: bool = True) -> None:
        super().__init__()
        self.base = base
        # no checkpoint weights: the released init equals the base projection, so share it
        if summary is None:
            summary = base if share_base else copy.deepcopy(base)
        self.summary = summary
        if (self.summary.in_features, self.summary.out_features) != (base.in_features,
                                                                     base.out_features):
            raise ValueError("summary projection must have the base layer's shape")
        self.layout = layout
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def tied(self) -> bool:
        """True while the summary projection is the base layer itself (shared weights)."""
        return self.summary is self.base

    def untie_summary(self) -> nn.Linear:
        """Give the summary projection its own copy of the base weights (once; a no-op if
        already separate) and return it: do this before training or changing it."""
        if self.tied:
            self.summary = copy.deepcopy(self.base)
        return self.summary

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight still works
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lay = self.layout
        if lay.count > 0 and not self.tied:  # tied: the base rows already are the summary
            sl = slice(lay.first, lay.first + (lay.count - 1) * lay.stride + 1, lay.stride)
            y[:, sl] = self.summary(x[:, sl])  # strided views of rows, no mask
        return y


def install_summary_projections(
    model: nn.Module, weights: dict[int, dict[str, nn.Linear]] | None = None, *,
    share_base: bool = True,
) -> SummaryLayout:
    """Replace q/k/v of every decoder layer's ``self_attn`` by :class:`SummaryLinear`
    (idempotent). ``weights[layer][name]`` (name in q, k, v) are checkpoint summary
    projections; missing ones share the base's weights (``share_base=True``, no copy) or
    start as copies of it (``False``; also unties projections installed earlier). Returns
    the shared layout."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    layout = None
    for li, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:  # hybrid decoders (Qwen3.5): a linear-attention layer has no q/k/v
            continue  # projections; summary tokens pass it with its own weights
        for name in ("q", "k", "v"):
            cur = getattr(attn, f"{name}_proj")
            if isinstance(cur, SummaryLinear):
                layout = cur.layout
                if not share_base:
                    cur.untie_summary()
                continue
            if layout is None:
                layout = SummaryLayout()
            given = (weights or {}).get(li, {}).get(name)
            setattr(attn, f"{name}_proj",
                    SummaryLinear(cur, layout, given, share_base=share_base))
    if layout is None:
        raise ValueError("model has no decoder layers with self_attn.q_proj/k_proj/v_proj")
    for layer in layers:  # one layout object for every layer
        if getattr(layer, "self_attn", None) is None:
            continue
        for name in ("q", "k", "v"):
            getattr(layer.self_attn, f"{name}_proj").layout = layout
    return layout


def summary_weights(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """The summary q/k/v linears per layer (for the reference loop)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [{n: getattr(layer.self_attn, f"{n}_proj").summary for n in ("q", "k", "v")}
            if getattr(layer, "self_attn", None) is not None else {} for layer in layers]


class SummaryEmbedding(nn.Module):
    """The learned summary-token (VST) embedding: one vector, initialised from EOS."""

    def __init__(self, hidden: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        w = torch.zeros(hidden) if init is None else init.detach().clone().reshape(hidden)
        self.weight = nn.Parameter(w)

    @classmethod
    def from_model(cls, model: nn.Module, eos_token_id: int | None = None) -> SummaryEmbedding:
        emb = model.get_input_embeddings().weight
        eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        init = emb[eos] if eos is not None else None
        return cls(emb.shape[1], init).to(emb.device, emb.dtype)

    def forward(self, count: int) -> torch.Tensor:
        return self.weight.expand(count, -1)
