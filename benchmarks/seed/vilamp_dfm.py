"""Seed-style ViLAMP DFM ("SigPooling"), written the way the released code does it.

The ``seed`` baseline of the ``dfm`` benchmark (see /work/shared/methods/vilamp.md).
It reproduces the released code's *costs* with the same parameters (names and shapes) as
:class:`lvlm_fast.nn.DifferentialFeatureMerging`, so the two load the same weights and
their outputs can be compared:

* the per-frame reference is materialised as an (N, P, D) tensor: frames before the first
  keyframe are copied as themselves, then each keyframe segment repeats its reference frame
  with ``unsqueeze(0).repeat(len, 1, 1)`` and the pieces are ``torch.cat``-ed;
* the text embedding is repeated to (N, P, text_dim) with ``view(1, 1, -1).repeat(N, P, 1)``;
* all four projections run on (N, P, .) tensors at once (``linear_iq``/``linear_ik`` on X,
  ``linear_q`` on the repeated query, ``linear_k`` on the repeated reference);
* ``F.cosine_similarity`` twice over (N, P, D), ``(a - b) / tau``, ``F.softmax`` over patches,
  ``mask * X`` (another (N, P, D)) and ``.sum(1)``.

Deliberate differences from the release: (1) only the dense branch is kept (the release
switches, for N > 60, to cosines on the CPU in 60-frame chunks and a Python loop over frames
for the softmax; on a CPU-only benchmark the moves are no-ops and the dense branch is the
faster one, so the seed is if anything flattered); (2) ``released_slip=False`` (default)
uses each segment's own keyframe (the paper's intent, what the module computes by default);
``released_slip=True`` reproduces the release's ``img_embs[idx]`` (frame number idx for the
idx-th segment), the module's ``reference="released"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SeedSigPooling(nn.Module):
    """The released SigPooling layer (dense branch): four Linear projections and ``tau``."""

    def __init__(self, dim: int, text_dim: int = 512, tau: float = 0.01,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.linear_iq = nn.Linear(dim, dim, **fk)
        self.linear_ik = nn.Linear(dim, dim, **fk)
        self.linear_q = nn.Linear(text_dim, dim, **fk)
        self.linear_k = nn.Linear(dim, dim, **fk)
        self.tau = nn.Parameter(torch.tensor(float(tau), **fk))

    def forward(self, img_embs: torch.Tensor, key_frame_expanded: torch.Tensor,
                query_expanded: torch.Tensor) -> torch.Tensor:
        iq = self.linear_iq(img_embs)
        ik = self.linear_ik(img_embs)
        q = self.linear_q(query_expanded)
        k = self.linear_k(key_frame_expanded)
        score_i2q = F.cosine_similarity(q, iq, dim=-1)
        score_i2k = F.cosine_similarity(k, ik, dim=-1)
        score = (score_i2q - score_i2k) / self.tau
        mask = F.softmax(score, dim=-1).unsqueeze(-1)
        img_embs = mask * img_embs
        return img_embs.sum(1)


def expand_keyframes(img_embs: torch.Tensor, key_frame_positions: Sequence[int],
                     released_slip: bool = False) -> torch.Tensor:
    """The released (N, P, D) per-frame reference: prefix frames as themselves, then each
    segment's reference repeated over the segment."""
    bounds = [*list(key_frame_positions), img_embs.shape[0]]
    pieces = []
    if bounds[0] > 0:
        pieces.append(img_embs[: bounds[0]])
    for idx in range(len(bounds) - 1):
        frame = img_embs[idx] if released_slip else img_embs[bounds[idx]]
        pieces.append(frame.unsqueeze(0).repeat(bounds[idx + 1] - bounds[idx], 1, 1))
    return torch.cat(pieces)


def seed_dfm(layer: SeedSigPooling, img_embs: torch.Tensor, text_emb: torch.Tensor,
             key_frame_positions: Sequence[int], released_slip: bool = False) -> torch.Tensor:
    """img_embs (N, P, D); text_emb (text_dim,); sorted keyframe frame numbers -> (N, D)."""
    n, p, _ = img_embs.shape
    key_frame_expanded = expand_keyframes(img_embs, key_frame_positions, released_slip)
    query_expanded = text_emb.view(1, 1, -1).repeat(n, p, 1)
    return layer(img_embs, key_frame_expanded, query_expanded)


def seed_from_module(module: nn.Module) -> SeedSigPooling:
    """A SeedSigPooling holding the same weights as a learned DifferentialFeatureMerging."""
    w = module.linear_iq.weight
    seed = SeedSigPooling(module.dim, module.text_dim, device="meta", dtype=w.dtype)
    seed.load_state_dict(module.state_dict(), strict=True, assign=True)
    return seed
