"""``vilamp``: ViLAMP (differential keyframe selection + differential feature merging), streamed.

What reaches the LLM, in time order: every patch token of each of the K keyframes (196 on
LLaVA-OneVision with ``keyframe_tokens="pooled"``: the model's own 2x2 bilinear pooling of
the 27x27 grid; 729 with ``"full"``), ONE token for every other frame (DFM), then one
``image_newline``. Tokens per frame: keyframe 196 (or h*w), non-keyframe 1; in total
``(N - K) + K * T_k + 1`` with ``K = min(num_keyframes, N)`` (the released budget fill
always returns exactly ``min(K, N)`` keyframes, so the count is static: meta-safe).

Held in memory (``holds_all_patch_features = False``):

* pass 1 (selection): per frame one embedding, ``(N, E)`` float32 (E = LLM width D without
  a selector, the selector's width with one) -- 147 MB at N = 10,240, D = 3,584;
* pass 2 (merging): the preallocated output ``(N - K + K*T_k + 2, D)`` (one spare row that
  absorbs masked writes), one vision chunk's patch features and its working copies
  (bank, pooled grid, DFM projections when learned), and ONE carried frame (the latest
  keyframe before the chunk, ``(1, P, D)``). Never ``(N, P, D)``. On a family whose rows
  are wider than the LLM (Qwen3-VL: ``D`` x (1 + 3 DeepStack levels)) the prefill
  instead pulls pass 2 chunk by chunk (:class:`VisualStream`): each vision chunk's rows
  are one block, freed once the prefill has read it, so no tensor holds every kept row
  with its DeepStack levels (Qwen3-VL-8B, 10,240 frames: 8,962 x 16,384 bf16, 0.27 GiB).

Vision cost: without a selector every frame goes through the vision tower twice (pass 1 for
the selection embeddings, pass 2 for the features), so ``frames_encoded = 2 N``. With a
selector, pass 1 runs the selector instead and the vision tower once (``frames_encoded = N``).

Keyframe selection (:func:`lvlm_fast.ops.keyframe_select`, on device, no host sync):

* With ``selector`` (a CLIP-style model with ``get_image_features``/``get_text_features``,
  or a plain callable ``frames -> (t, E)``): frame embeddings = the selector's image
  features of the frames (converted from the vision tower's normalisation to the
  selector's by ``selector_transform``, default: un-normalise with ``vision_mean/std``,
  resize bilinearly to the selector's image size, normalise with ``selector_mean/std``);
  query = ``query_embedding`` if given, else the selector's text features of ``question``
  (tokenised by ``selector_processor``, max 77 tokens). Relevance floor ``floor`` applies.
* Without a selector, or with no question/query: **selection by diversity alone**. Frame
  embedding = mean over patches of the frame's projected patch features (LLM space).
  ``diversity_query="video_mean"`` (default): the pseudo-query is the mean embedding of
  the whole video, so the greedy walk visits the most typical frames first and the
  redundancy rule (``cos > tau_f`` to an already chosen frame) keeps only mutually
  dissimilar ones; ``"none"``: a zero query, every relevance is exactly 0, and the walk
  goes in time order (ties go to the lower frame index) -- beware: with K = 32 and a
  long, varied video this keeps the first 32 dissimilar frames (early bias). The floor is
  disabled in both (there is no relevance to threshold). The budget fill then spreads the
  remaining keyframes through the gaps, as released.

Differential feature merging (one token per non-keyframe; reference = the nearest keyframe
at or before the frame, same patch index; frames before the first keyframe compare with
themselves, the released convention):

* learned (released ``SigPooling`` weights): ``dfm`` = a
  :class:`~lvlm_fast.nn.dfm.DifferentialFeatureMerging`, or a path loaded with
  :meth:`~lvlm_fast.nn.dfm.DifferentialFeatureMerging.from_released_checkpoint`, or
  ``"auto"`` (default) which uses one found inside the wrapped model (any submodule that is
  a ``DifferentialFeatureMerging``) -- learned DFM needs the selector's text query
  (``t`` is the CLIP text embedding), so ``"auto"`` falls back to the parameter-free form
  when there is no query. ``dfm="learned"`` demands the model's module.
* parameter-free (``"free"``, or ``"auto"`` without weights/query): ``A = B = X``,
  ``Kr = R``, no query term (zero query; the LLM-space has no CLIP text vector), and
  ``tau = dfm_tau`` (default 2.0: ``softmax(-cos/2)`` is the paper's parameter-free
  ablation ``softmax(1 - (0.5 + 0.5 cos))``); a ``DifferentialFeatureMerging(learned=False)``
  passed as ``dfm`` uses its own ``tau`` instead.

Other families (:mod:`lvlm_fast.models.families`): "frame" above is the family's temporal
unit. On Qwen2.5-VL keyframes are selected over temporal patches (2 frames each, N = units):
the selection embedding of a unit is the mean of its merged grid (or, with a selector, the
mean of its frames' selector embeddings), a keyframe keeps its whole merged grid
(``"pooled"`` and ``"full"`` coincide there), the DFM compares merged-grid tokens, and no
end token follows. M-RoPE positions (stated here, built by :func:`keyframe_blocks`): a
keyframe's tokens are its grid at its temporal patch's time, ``(P + floor(n * interval),
P + row, P + col)``, exactly as in ``full``; a non-keyframe's DFM token is a 1 x 1 grid at
its temporal patch's time, ``(P + floor(n * interval), P, P)``.

The DFM of a chunk runs as one fused :func:`lvlm_fast.ops.diff_weighted_pool` call whose
reference bank is ``[carried keyframe ; the chunk's own frames]`` and whose per-frame bank
row is computed on device from the keyframe indices; keyframe rows are computed and then
overwritten by the keyframe's patch tokens (as in the paper, DFM tokens at keyframe
positions are discarded).

Qwen3-VL: a keyframe is its own frame of the prompt with its own timestamp (``<t
seconds><|vision_start|> grid <|vision_end|>``); each maximal run of consecutive
non-keyframes is ONE frame holding their DFM tokens in time order, framed with the timestamp
of the run's first unit (each token 1 x 1 at the running position ``(cur, cur, cur)``), so
every timestamp precedes exactly the tokens of the units from that time on, up to the next
timestamp. (Framing each DFM token with its own timestamp costs ~9 text tokens per 1-token
unit: 61,288 vs ~12,000 LLM tokens at 10,240 frames on Qwen3-VL-8B.) On meta tensors (the
profiler) the keyframes are nominally evenly spread. DeepStack: selection embeddings, DFM
relevance and redundancy read the main channels only; the same softmax weights over patches
pool every DeepStack level (``diff_weighted_pool`` with ``rel``/``red`` = main channels,
values = all channels), and a keyframe keeps all its levels' rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.families.base import CLIP_MEAN, CLIP_STD
from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    PrefillResult,
    StrategyConfig,
    VideoPrompt,
    VisualEmbeds,
    VisualStream,
    register,
)
from lvlm_fast.models.strategies.full import end_blocks, stream_prefill, streams
from lvlm_fast.models.strategies.stream import check_kv_budget
from lvlm_fast.nn.dfm import DifferentialFeatureMerging
from lvlm_fast.ops import diff_weighted_pool, keyframe_select

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
KEYFRAME_TOKENS = ("pooled", "full")
DIVERSITY_QUERIES = ("video_mean", "none")
DFM_MODES = ("auto", "free", "learned")


def _check_int(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_float(name: str, value: object, lo: float | None = None, hi: float | None = None,
                 *, strict_lo: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if strict_lo else value < lo):
        raise ValueError(f"{name} must be {'>' if strict_lo else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class ViLAMPConfig(StrategyConfig):
    """ViLAMP knobs (defaults: the paper / released code, see shared/methods/vilamp.md).

    ``num_keyframes`` K (32); ``tau_f`` redundancy cosine (0.85); ``floor`` relevance floor
    (paper 0.2; only used with a real query; None = no floor); ``keyframe_tokens``
    ``"pooled"`` (2x2 bilinear, 196 on LLaVA-OneVision) or ``"full"`` (every patch);
    ``diversity_query`` for selection without a query (see the module docstring);
    ``selector``/``selector_processor``/``question``/``query_embedding``/
    ``selector_transform``/``selector_chunk_frames``/``vision_mean``/``vision_std``/
    ``selector_mean``/``selector_std``: query-aware selection; ``dfm``: ``"auto"``,
    ``"free"``, ``"learned"``, a DifferentialFeatureMerging or a released checkpoint path;
    ``dfm_tau``: temperature of the parameter-free form; ``newline``: append the model's
    ``image_newline`` after the video (as LLaVA-OneVision does).
    """

    num_keyframes: int = 32
    tau_f: float = 0.85
    floor: float | None = 0.2
    keyframe_tokens: str = "pooled"
    diversity_query: str = "video_mean"
    selector: Any = None
    selector_processor: Any = None
    question: str | None = None
    query_embedding: torch.Tensor | None = None
    selector_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    selector_chunk_frames: int = 64
    vision_mean: tuple[float, float, float] = SIGLIP_MEAN
    vision_std: tuple[float, float, float] = SIGLIP_STD
    selector_mean: tuple[float, float, float] = CLIP_MEAN
    selector_std: tuple[float, float, float] = CLIP_STD
    dfm: Any = "auto"
    dfm_tau: float = 2.0
    newline: bool = True
    # hard KV cap (issue 12): rows per layer; None = off. Set: the visual tokens are
    # streamed through the budgeted cache (strategies/stream.py, composed_prefill)
    kv_budget: int | None = None

    def __post_init__(self) -> None:
        check_kv_budget(self.kv_budget)
        _check_int("num_keyframes", self.num_keyframes, 1)
        _check_float("tau_f", self.tau_f, -1.0, 1.0)
        if self.floor is not None:
            _check_float("floor", self.floor)
        _check_choice("keyframe_tokens", self.keyframe_tokens, KEYFRAME_TOKENS)
        _check_choice("diversity_query", self.diversity_query, DIVERSITY_QUERIES)
        _check_int("selector_chunk_frames", self.selector_chunk_frames, 1)
        _check_float("dfm_tau", self.dfm_tau, 0.0, strict_lo=True)
        for name in ("vision_mean", "vision_std", "selector_mean", "selector_std"):
            val = getattr(self, name)
            if len(tuple(val)) != 3:
                raise ValueError(f"{name} must hold 3 per-channel values, got {val!r}")
        if not (isinstance(self.dfm, (DifferentialFeatureMerging, os.PathLike))
                or (isinstance(self.dfm, str) and (self.dfm in DFM_MODES
                                                    or os.path.exists(self.dfm)))):
            raise ValueError(f"dfm must be one of {DFM_MODES}, a DifferentialFeatureMerging or "
                             f"the path of a released ViLAMP checkpoint, got {self.dfm!r}")
        if self.selector is not None and not (hasattr(self.selector, "get_image_features")
                                              or callable(self.selector)):
            raise TypeError("selector must be a CLIP-style model (get_image_features / "
                            "get_text_features) or a callable frames -> (t, E), got "
                            f"{type(self.selector).__name__}")
        if self.question is not None and self.query_embedding is None:
            if self.selector is None:
                raise ValueError("question is only used with a selector (the selector embeds "
                                 "it); without one, selection is by diversity alone")
            if self.selector_processor is None or not hasattr(self.selector,
                                                              "get_text_features"):
                raise ValueError("question needs a selector with get_text_features and its "
                                 "selector_processor (tokeniser); or pass query_embedding")
        if self.query_embedding is not None:
            q = self.query_embedding
            if not isinstance(q, torch.Tensor) or q.dim() not in (1, 2) or (
                    q.dim() == 2 and q.shape[0] != 1):
                raise ValueError("query_embedding must be an (E,) or (1, E) tensor in the "
                                 f"selector's embedding space, got {q!r:.80}")
            if self.selector is None:
                raise ValueError("query_embedding lives in the selector's space: give the "
                                 "selector too")


# --------------------------------------------------------------------------- selection
def _features_of(out: Any) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor (transformers 4) or an output
    object whose ``pooler_output`` is the projected embedding (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read embeddings from a {type(out).__name__}")


def _selector_param(selector: Any) -> torch.Tensor | None:
    params = getattr(selector, "parameters", None)
    if params is None:
        return None
    return next(iter(params()), None)


def _default_selector_transform(cfg: ViLAMPConfig, frames: torch.Tensor) -> torch.Tensor:
    """Vision-tower-normalised frames -> the selector's normalisation and image size."""
    size = 224
    vcfg = getattr(getattr(cfg.selector, "config", None), "vision_config", None)
    if vcfg is not None and isinstance(getattr(vcfg, "image_size", None), int):
        size = vcfg.image_size
    x = frames.float()
    shape = (1, 3, 1, 1)
    vm = torch.tensor(cfg.vision_mean, device=x.device).view(shape)
    vs = torch.tensor(cfg.vision_std, device=x.device).view(shape)
    sm = torch.tensor(cfg.selector_mean, device=x.device).view(shape)
    ss = torch.tensor(cfg.selector_std, device=x.device).view(shape)
    x = x * vs + vm
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - sm) / ss


def selector_embeddings(cfg: ViLAMPConfig, vlm: LongVideoVLM, pixel_values: torch.Tensor
                        ) -> torch.Tensor:
    """(N, E) float32 selector image features on the model's device, chunk by chunk."""
    n = pixel_values.shape[0]
    sel = cfg.selector
    p = _selector_param(sel)
    emb = None
    for s in range(0, n, cfg.selector_chunk_frames):
        chunk = pixel_values[s:s + cfg.selector_chunk_frames]
        x = (cfg.selector_transform(chunk) if cfg.selector_transform is not None
             else _default_selector_transform(cfg, chunk))
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        feats = (_features_of(sel.get_image_features(pixel_values=x))
                 if hasattr(sel, "get_image_features") else _features_of(sel(x)))
        if feats.dim() != 2 or feats.shape[0] != chunk.shape[0]:
            raise ValueError(f"the selector must return (frames, E) embeddings, got shape "
                             f"{tuple(feats.shape)} for {chunk.shape[0]} frames")
        if emb is None:
            emb = torch.empty((n, feats.shape[1]), dtype=torch.float32, device=vlm.device)
        emb[s:s + chunk.shape[0]] = feats.to(device=emb.device, dtype=torch.float32)
    return emb


def selector_query(cfg: ViLAMPConfig, device: torch.device) -> torch.Tensor | None:
    """(E,) float32 query in the selector's space, or None (selection by diversity)."""
    if cfg.query_embedding is not None:
        return cfg.query_embedding.reshape(-1).to(device=device, dtype=torch.float32)
    if cfg.question is None:
        return None
    sel = cfg.selector
    tok = cfg.selector_processor(text=[cfg.question], return_tensors="pt", padding=True,
                                 truncation=True, max_length=77)
    p = _selector_param(sel)
    dev = p.device if p is not None else device
    kw = {"input_ids": tok["input_ids"].to(dev)}
    if "attention_mask" in tok:
        kw["attention_mask"] = tok["attention_mask"].to(dev)
    return _features_of(sel.get_text_features(**kw)).reshape(-1).to(device, torch.float32)


def patch_mean_embeddings(vlm: LongVideoVLM, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pass 1 without a selector: (N, D) float32 means of each unit's projected patches
    (N = temporal units: frames on LLaVA-OneVision, temporal patches on Qwen2.5-VL)."""
    n = vlm.family.units(pixel_values.shape[0])
    d = vlm.hidden_size
    emb = torch.empty((n, d), dtype=torch.float32, device=vlm.device)
    for start, feats in vlm.iter_patch_features(pixel_values):
        # main channels only (DeepStack levels, if any, never drive the selection)
        emb[start:start + feats.shape[0]] = feats[..., :d].mean(dim=(1, 2)).float()
    return emb


def select_keyframes(cfg: ViLAMPConfig, emb: torch.Tensor, query: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (K,), ref_pos (N,)) from :func:`keyframe_select` (see the module docstring
    for the query-free rule); K = min(num_keyframes, N), time order, on device."""
    floor = cfg.floor
    if query is None:
        floor = None
        if cfg.diversity_query == "video_mean":
            query = emb.mean(dim=0)
        else:  # zero query: every relevance is exactly 0 -> time order
            query = emb.new_zeros(emb.shape[1])
    elif query.shape[-1] != emb.shape[1]:
        raise ValueError(f"query_embedding has width {query.shape[-1]} but the selector's "
                         f"image features have {emb.shape[1]}")
    return keyframe_select(emb, query, cfg.num_keyframes, threshold=float(cfg.tau_f),
                           min_relevance=None if floor is None else float(floor), fill=True)


# --------------------------------------------------------------------------- merging
def find_model_dfm(vlm: LongVideoVLM) -> DifferentialFeatureMerging | None:
    for mod in vlm.model.modules():
        if isinstance(mod, DifferentialFeatureMerging):
            return mod
    return None


def place_dfm(mod: DifferentialFeatureMerging, vlm: LongVideoVLM
              ) -> DifferentialFeatureMerging:
    """``mod`` on the model's device: the ONE place a DFM (its projections and ``tau``) is
    moved. A module loaded from a checkpoint path comes on the CPU and one passed in may
    live anywhere, while :func:`diff_weighted_pool` needs every input on the features'
    device. ``nn.Module.to`` moves in place (as ``model.to`` does), so this happens once per
    module, and is a no-op for the model's own DFM. The dtype is kept (the released ``tau``
    is tiny; the projections are cast to the model dtype once per call by
    :func:`dfm_inputs`)."""
    if mod.tau.device != vlm.device:
        mod.to(device=vlm.device)
    return mod


def resolve_dfm(cfg: ViLAMPConfig, vlm: LongVideoVLM, text_query: torch.Tensor | None,
                cache: dict) -> DifferentialFeatureMerging | None:
    """The DFM module to use (learned, or a parameter-free one whose ``tau`` is used), on
    the model's device (:func:`place_dfm`), or None for the parameter-free form with
    ``dfm_tau``."""
    spec = cfg.dfm
    if isinstance(spec, DifferentialFeatureMerging):
        mod = spec
    elif isinstance(spec, (str, os.PathLike)) and str(spec) not in DFM_MODES:
        key = os.fspath(spec)
        if key not in cache:
            cache[key] = DifferentialFeatureMerging.from_released_checkpoint(key)
        mod = cache[key]
    elif spec == "free":
        return None
    else:
        mod = find_model_dfm(vlm)
        if mod is None and spec == "learned":
            raise ValueError("dfm='learned' but the model holds no DifferentialFeatureMerging; "
                             "pass dfm=<module or released checkpoint path> or dfm='free'")
        if mod is None or (spec == "auto" and text_query is None):
            return None
    if not mod.learned:  # a parameter-free module: its tau, no query term
        return place_dfm(mod, vlm)
    if mod.dim != vlm.hidden_size:
        raise ValueError(f"the DFM module has dim {mod.dim} but the model's hidden size is "
                         f"{vlm.hidden_size}")
    if text_query is None:
        raise ValueError("learned DFM needs the question's text embedding from the selector "
                         "(selector + question, or query_embedding); or use dfm='free'")
    if text_query.shape[-1] != mod.text_dim:
        raise ValueError(f"the DFM module expects a text embedding of width {mod.text_dim}, "
                         f"the selector's query has {text_query.shape[-1]}")
    return place_dfm(mod, vlm)


def dfm_inputs(cfg: ViLAMPConfig, vlm: LongVideoVLM, dfm: DifferentialFeatureMerging | None,
               text_query: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """(query (D,), tau 0-d fp32, projections) for pass 2, built once per call on the
    model's device: ``tau`` as a device tensor (a Python float would become a new tensor,
    i.e. a host-to-device copy, in every chunk's op call) and the learned projections'
    (weight, bias) in the model dtype (cast once, not per chunk; empty when parameter-free).
    ``dfm`` comes from :func:`resolve_dfm`, already on the model's device."""
    if dfm is None or not dfm.learned:
        query = torch.zeros(vlm.hidden_size, dtype=vlm.dtype, device=vlm.device)
        tau = (torch.tensor(float(cfg.dfm_tau), dtype=torch.float32, device=vlm.device)
               if dfm is None else dfm.tau.detach().float())
        return query, tau, {}
    query = dfm.project_query(text_query.to(dfm.linear_q.weight.device)).to(vlm.dtype)
    projs = {name: (m.weight.detach().to(vlm.dtype), m.bias.detach().to(vlm.dtype))
             for name in ("linear_k", "linear_iq", "linear_ik")
             for m in (getattr(dfm, name),)}
    return query, dfm.tau.detach().float(), projs


class KeyframeLayout:
    """Where each frame's tokens go in the output, all on device.

    Frame n starts at row ``n + (keyframes before n) * (T_k - 1)``; a keyframe takes T_k
    rows, any other frame one. Row ``total`` is the newline and ``total + 1`` a spare row
    that absorbs the writes masked out (a keyframe's DFM token is overwritten in place;
    a non-keyframe's patch tokens go to the spare row), so every write has a static shape.
    """

    def __init__(self, indices: torch.Tensor, ref_pos: torch.Tensor, n: int,
                 tokens_per_keyframe: int) -> None:
        k = indices.shape[0]
        dev = indices.device
        self.n, self.k, self.tk = n, k, tokens_per_keyframe
        self.total = n - k + k * tokens_per_keyframe
        self.spare = self.total + 1
        is_key = torch.zeros(n, dtype=torch.int64, device=dev)
        is_key.index_fill_(0, indices, 1)
        self.is_key = is_key.bool()
        frames = torch.arange(n, dtype=torch.int64, device=dev)
        self.start = frames + (torch.cumsum(is_key, 0) - is_key) * (tokens_per_keyframe - 1)
        # frame number of each frame's reference keyframe, -1 before the first keyframe
        self.ref_frame = torch.where(ref_pos >= 0, indices[ref_pos.clamp_min(0)],
                                     torch.full_like(ref_pos, -1))

    def bank_index(self, s: int, t: int) -> torch.Tensor:
        """Row of the chunk bank ``[carry ; chunk frames]`` each frame of [s, s+t) compares
        with: 1 + local for a reference inside the chunk or the frame itself (before the
        first keyframe), 0 for the carried keyframe."""
        rf = self.ref_frame[s:s + t]
        local = torch.arange(t, dtype=torch.int64, device=rf.device)
        return torch.where(rf < 0, local + 1, torch.where(rf >= s, rf - s + 1, 0))

    def keyframe_rows(self, s: int, t: int) -> torch.Tensor:
        """(t * T_k,) destination rows of each frame's patch tokens (spare if not a key)."""
        start = self.start[s:s + t].unsqueeze(1)
        off = torch.arange(self.tk, dtype=torch.int64, device=start.device).unsqueeze(0)
        rows = torch.where(self.is_key[s:s + t].unsqueeze(1), start + off, self.spare)
        return rows.reshape(-1)


def unit_embeddings(vlm: LongVideoVLM, emb: torch.Tensor) -> torch.Tensor:
    """Per-frame selector embeddings (F, E) -> per-unit (N, E): the mean over the unit's
    frames (the last frame repeated to fill the last unit, as the family's encoder does);
    the identity on one-frame-per-unit families."""
    fpu = vlm.family.frames_per_unit
    if fpu == 1:
        return emb
    if pad := -emb.shape[0] % fpu:
        emb = torch.cat([emb, emb[-1:].expand(pad, -1)])
    return emb.view(-1, fpu, emb.shape[1]).mean(dim=1)


def keyframe_tokens_of(cfg: ViLAMPConfig, vlm: LongVideoVLM, feats: torch.Tensor
                       ) -> torch.Tensor:
    """(t, T_k, D) tokens a keyframe contributes: the model's own pooling (LLaVA-OneVision
    2x2 bilinear; identity on Qwen2.5-VL), or all patches."""
    grid = vlm.pool_2x2(feats) if cfg.keyframe_tokens == "pooled" else feats
    return grid.reshape(grid.shape[0], -1, grid.shape[-1])


def keyframe_grid(cfg: ViLAMPConfig, vlm: LongVideoVLM, frame_hw: tuple[int, int]
                  ) -> tuple[int, int]:
    """(h, w) of a keyframe's tokens: the family's token grid (pooled) or feature grid."""
    fam = vlm.family
    return fam.token_grid(frame_hw) if cfg.keyframe_tokens == "pooled" else \
        fam.feature_grid(frame_hw)


def tokens_per_keyframe(cfg: ViLAMPConfig, vlm: LongVideoVLM, frame_hw: tuple[int, int]
                        ) -> int:
    kh, kw = keyframe_grid(cfg, vlm, frame_hw)
    return kh * kw


def patch_grid(vlm: LongVideoVLM, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the family's feature grid for these frames."""
    return vlm.family.feature_grid((pixel_values.shape[-2], pixel_values.shape[-1]))


def _end_rows(vlm: LongVideoVLM, newline: bool) -> int:
    n_end = vlm.family.num_end_tokens() if newline else 0
    if n_end > 1:  # the layout keeps one row for the end token and one spare row
        raise ValueError(f"vilamp supports at most one end token, the {vlm.family.name} "
                         f"family has {n_end}")
    return n_end


def new_output(vlm: LongVideoVLM, layout: KeyframeLayout, newline: bool) -> torch.Tensor:
    out = torch.empty((layout.total + 2, vlm.feature_size), dtype=vlm.dtype,
                      device=vlm.device)
    if _end_rows(vlm, newline):
        out[layout.total] = vlm.family.end_tokens()[0].to(out.dtype)
    return out


def finish_output(out: torch.Tensor, layout: KeyframeLayout, newline: bool,
                  vlm: LongVideoVLM | None = None) -> torch.Tensor:
    n_end = _end_rows(vlm, newline) if vlm is not None else int(newline)
    return out[: layout.total + n_end].unsqueeze(0)


def host_is_key(layout: KeyframeLayout) -> list[bool]:
    """Whether each unit is a keyframe, on the host (one device sync). On meta tensors (the
    profiler's simulation) the selection has no values: keyframes are nominally spread
    evenly (the budget fill's tendency); K, and so every token count, is exact."""
    if layout.is_key.device.type != "meta":
        return layout.is_key.tolist()
    host = [False] * layout.n
    for u in torch.linspace(0, layout.n - 1, layout.k, dtype=torch.float64).round().long():
        host[int(u)] = True
    return host


def keyframe_blocks(cfg: ViLAMPConfig, vlm: LongVideoVLM, layout: KeyframeLayout,
                    frame_hw: tuple[int, int], fps: float | None, newline: bool,
                    num_frames: int | None = None, times: list[float] | None = None
                    ) -> TokenBlocks | None:
    """Positions (families with grid positions only): unit n is a keyframe grid block
    ``(kh, kw)`` if it is a keyframe, else its DFM token is a 1 x 1 block at unit n (on
    Qwen2.5-VL: M-RoPE ``(P + floor(n * interval), P, P)``, the time of its temporal
    patch, row 0, column 0); the end tokens (if any) 1 x 1 at the last unit."""
    if not vlm.family.needs_blocks():
        return None
    kh, kw = keyframe_grid(cfg, vlm, frame_hw)
    is_key = layout.is_key
    if is_key.device.type == "meta":
        is_key = torch.tensor(host_is_key(layout), dtype=torch.bool)
    one = torch.ones_like(is_key, dtype=torch.int64)
    # prompt frames (families that frame units with text, Qwen3-VL): a keyframe alone, each
    # maximal run of consecutive non-keyframes' DFM tokens together
    starts = is_key.clone()
    starts[1:] |= is_key[:-1]
    starts[0] = True
    frames = torch.cumsum(starts.long(), 0) - 1
    blocks = TokenBlocks(torch.arange(layout.n, dtype=torch.int64, device=one.device),
                         torch.where(is_key, kh, one), torch.where(is_key, kw, one),
                         frame_hw, fps, num_frames, times=times, frames=frames)
    if layout.is_key.device.type == "meta":  # host values (frames stay on the host)
        dev = layout.is_key.device
        blocks = TokenBlocks(blocks.t.to(dev), blocks.h.to(dev), blocks.w.to(dev), frame_hw,
                             fps, num_frames, (blocks.t.tolist(), blocks.h.tolist(),
                                               blocks.w.tolist()), times, frames)
    return end_blocks(vlm, blocks, layout.n - 1) if newline else blocks


def merged_chunks(cfg: ViLAMPConfig, vlm: LongVideoVLM, pv: torch.Tensor,
                  layout: KeyframeLayout, dfm: DifferentialFeatureMerging | None,
                  text_query: torch.Tensor | None, grid: tuple[int, int]
                  ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Pass 2, one vision chunk at a time: ``(s, t, dfm_tokens (t, fs), keyframe_tokens
    (t * T_k, fs))`` for units ``[s, s + t)``, the DFM against ``[carried keyframe ;
    chunk]``. Nothing of a chunk stays referenced here once yielded (a consumer may hold
    the generator suspended across an LLM prefill chunk), which is also why it is not
    wrapped in ``@torch.no_grad()``: torch's generator wrapper keeps the last yielded
    value; ``no_grad`` is entered around the work of each chunk instead."""
    d, fs = vlm.hidden_size, vlm.feature_size
    with torch.no_grad():
        query, tau, projs = dfm_inputs(cfg, vlm, dfm, text_query)
        carry = torch.zeros((1, grid[0] * grid[1], d), dtype=vlm.dtype, device=vlm.device)
    for s, feats in vlm.iter_patch_features(pv):
        with torch.no_grad():
            t = feats.shape[0]
            x = feats.reshape(t, -1, fs)
            # DeepStack families: the weights come from the main channels only and pool
            # every level alike (the same softmax over patches for all levels)
            xm = x if fs == d else x[..., :d].contiguous()
            bank = torch.cat([carry, xm])
            ri = layout.bank_index(s, t)
            if not projs:
                tok = diff_weighted_pool(x, query, bank, ri, tau=tau,
                                         **({} if fs == d else {"rel": xm, "red": xm}))
            else:
                tok = diff_weighted_pool(x, query, F.linear(bank, *projs["linear_k"]), ri,
                                         rel=F.linear(xm, *projs["linear_iq"]),
                                         red=F.linear(xm, *projs["linear_ik"]), tau=tau)
            # the latest keyframe at or before the chunk's end (a copy: the chunk can go)
            carry = bank.index_select(0, ri[-1:])
            kt = keyframe_tokens_of(cfg, vlm, feats).reshape(-1, fs)
        del bank, x, xm, feats
        out = [(s, t, tok, kt)]
        del tok, kt
        yield out.pop()


def streamed_blocks(vlm: LongVideoVLM, layout: KeyframeLayout,
                    merged: Iterator[tuple[int, int, torch.Tensor, torch.Tensor]],
                    newline: bool) -> Iterator[torch.Tensor]:
    """Pass 2's tokens placed into one ``(1, rows, fs)`` block per vision chunk, in order
    (the rows of units ``[s, s + t)`` are ``[start[s], start[s + t])``, from the host
    keyframe mask), then the end token if any. Each block has one spare row that absorbs
    the masked keyframe writes, as the held output does. No local keeps a block once it is
    yielded, so the prefill's read of it is the last reference."""
    fs = vlm.feature_size
    key = host_is_key(layout)
    start = [0]
    for k in key:
        start.append(start[-1] + (layout.tk if k else 1))
    for item in merged:
        s, t, tok, kt = item
        del item
        lo, hi = start[s], start[s + t]
        block = torch.empty((hi - lo + 1, fs), dtype=vlm.dtype, device=vlm.device)
        block.index_copy_(0, layout.start[s:s + t] - lo, tok)
        rows = layout.keyframe_rows(s, t)
        block.index_copy_(0, torch.where(rows == layout.spare, hi - lo, rows - lo), kt)
        del tok, kt, rows
        out = [block[: hi - lo].unsqueeze(0)]
        del block
        yield out.pop()
    if _end_rows(vlm, newline):
        yield vlm.family.end_tokens()[:1].to(vlm.dtype).unsqueeze(0)


# --------------------------------------------------------------------------- strategy
@register
class ViLAMP(EmbeddingStrategy):
    """ViLAMP streamed: keyframes keep their patch tokens, other frames 1 DFM token each.

    ``holds_all_patch_features = False``: frames are streamed chunk by chunk through the
    vision tower (twice without a selector); only one chunk's patch features, one carried
    keyframe (1, P, D), the (N, E) selection embeddings and the output are alive.
    """

    name = "vilamp"
    config_class = ViLAMPConfig
    holds_all_patch_features = False

    def __init__(self, config: ViLAMPConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._dfm_cache: dict = {}

    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        return self._embeds(vlm, prompt, stream=False)

    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        """Rows wider than the LLM (DeepStack levels) go to the prefill as a
        :class:`VisualStream` of per-vision-chunk blocks, each freed once the prefill has
        read it (see :meth:`_embeds`); otherwise (and with ``kv_budget``) the held tensor."""
        if self.config.kv_budget is None and streams(vlm):
            return stream_prefill(vlm, prompt, self._embeds(vlm, prompt, stream=True))
        return super().prefill(vlm, prompt)

    @torch.no_grad()
    def _embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt, *, stream: bool) -> VisualEmbeds:
        """Pass 1 (selection) runs here; pass 2 (merging) writes one preallocated output, or
        with ``stream`` runs here too but into one block of rows per vision chunk, handed to
        the prefill as a :class:`VisualStream` that drops each block once read: the
        prefill's first chunk then no longer sits beside every later chunk's rows (on
        Qwen3-VL-8B at 10,240 frames the held output is 8,962 x 16,384 bf16, 0.27 GiB).
        The blocks' row ranges come from the keyframe mask on the host (one sync of N
        bools; the Qwen3-VL prompt layout needs it on the host anyway)."""
        cfg: ViLAMPConfig = self.config
        pv = prompt.pixel_values
        frame_hw = (pv.shape[-2], pv.shape[-1])
        n_frames = pv.shape[0]
        n = vlm.family.units(n_frames)  # selection and merging run over temporal units
        # ---- pass 1: selection embeddings (selector, or the projected patch means)
        if cfg.selector is not None:
            emb = unit_embeddings(vlm, selector_embeddings(cfg, vlm, pv))
            text_query = selector_query(cfg, emb.device)
            encoded = n_frames
        else:
            emb = patch_mean_embeddings(vlm, pv)
            text_query = None
            encoded = 2 * n_frames
        indices, ref_pos = select_keyframes(cfg, emb, text_query)
        del emb
        dfm = resolve_dfm(cfg, vlm, text_query, self._dfm_cache)
        h, w = patch_grid(vlm, pv)
        layout = KeyframeLayout(indices, ref_pos, n, tokens_per_keyframe(cfg, vlm, frame_hw))
        blocks = keyframe_blocks(cfg, vlm, layout, frame_hw, prompt.fps, cfg.newline,
                                 n_frames, prompt.frame_times)
        merged = merged_chunks(cfg, vlm, pv, layout, dfm, text_query, (h, w))
        if stream:
            rows = layout.total + _end_rows(vlm, cfg.newline)
            visual = VisualStream(rows, vlm.feature_size,
                                  streamed_blocks(vlm, layout, merged, cfg.newline))
            return VisualEmbeds(visual, encoded, blocks)
        out = new_output(vlm, layout, cfg.newline)
        for s, t, tok, kt in merged:
            out.index_copy_(0, layout.start[s:s + t], tok)
            out.index_copy_(0, layout.keyframe_rows(s, t), kt)
            del tok, kt
        return VisualEmbeds(finish_output(out, layout, cfg.newline, vlm), encoded, blocks)
