"""``LongVideoVLM``: a transformers VLM driven for long videos.

The wrapper owns the model, the chunked vision encoder and the chunked LLM prefill; a
strategy (:mod:`lvlm_fast.models.strategies`) decides which frames are encoded and how
their features reach the LLM. Everything model-specific (vision tower, pooling, token
layout, positions, preprocessing) sits behind the model's family
(:mod:`lvlm_fast.models.families`, ``vlm.family``). Supported classes:
:data:`SUPPORTED_MODEL_CLASSES` (``LlavaOnevisionForConditionalGeneration``, also used by
LLaVA-Video and Video-XL checkpoints in the transformers layout;
``Qwen2_5_VLForConditionalGeneration``).

What the wrapper guarantees (the contract strategies rely on):

- **Vision in chunks.** :meth:`LongVideoVLM.iter_patch_features` yields the family's
  LLM-space features (:meth:`ModelFamily.encode`) one chunk of ``vision_chunk_frames``
  frames (rounded up to whole temporal units) at a time as (t_units, h, w, hidden); this
  equals the family's all-frames transformers path exactly (tested per family).
- **Chunked prefill into a preallocated cache.** :meth:`LongVideoVLM.prefill_embeds`
  feeds ``[prefix ; visual ; question]`` through the decoder ``prefill_chunk_tokens`` at a
  time into a :class:`PreallocatedKVCache` sized ``prefix + N + question + reserve`` (one
  allocation; no ``torch.cat`` growth). Chunks are cut from the three segments without
  materialising their concatenation. The decoder output of every chunk but the last
  position is dropped at once; the LM head never runs on the prompt except at its last
  position (in :meth:`first_token` / :meth:`generate`).
- **Fused LLM attention.** Prefill chunks and decode steps attend to everything cached
  plus causally within the chunk: bottom-right causal attention, which is exactly
  :func:`lvlm_fast.ops.summary_attention` (no mask tensor, no score matrix; C++ on CPU,
  Triton on CUDA, shape-only on meta). ``attention="auto"`` (default) switches the
  decoder to it (transformers attention name ``"lvlm_summary"``) for the call when the
  head dim is supported (64, 80, 96, 128: every shipped 7B config) and keeps the
  model's own attention (e.g. SDPA with transformers' causal mask) otherwise (the toy
  configs, head dim 16); ``"fused"`` requires it, ``"model"`` never uses it. On meta
  tensors this matters: SDPA there falls back to its math path and would simulate a
  (heads, chunk, context) score matrix that no real flash kernel allocates.
- **Greedy decoding without host syncs.** :meth:`generate` writes each argmax into a
  preallocated device tensor and feeds it back as a device tensor; positions come from
  the cache's host-side length. Tokens after the first ``eos_token_id`` are replaced by
  it (masking on device, no early stop), so the loop always runs ``max_new_tokens`` steps.
- **Meta tensors.** Nothing reads device values (no ``.item()``, ``.tolist()``, no
  branching on tensor contents), so the whole pipeline runs on a model built on the meta
  device (the profiler simulates 7B models that way).

Chunk sizes. ``vision_chunk_frames`` and ``prefill_chunk_tokens`` default from
``memory_budget_bytes`` (default :data:`DEFAULT_MEMORY_BUDGET` = 1 GiB), the working
memory one chunk may use on top of the weights and the KV cache, using the estimates of
:meth:`LongVideoVLM.vision_bytes_per_frame` (activations of one encoder layer, the
attention score matrix in fp32 as a worst case for non-flash attention, and the
projector) and :meth:`LongVideoVLM.prefill_bytes_per_token` (one decoder layer's
activations incl. the MLP). A budget smaller than one frame (or one token) raises
``ValueError`` stating the bytes needed. ``prefill_chunk_tokens`` is capped at
:data:`MAX_PREFILL_CHUNK` (attention masks grow with chunk x context).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import numbers
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoConfig

from lvlm_fast.cache import ATTN_NAME, PreallocatedKVCache, check_cache_room
from lvlm_fast.models._compat import cache_kwargs
from lvlm_fast.models.families import (
    TokenBlocks,
    family_for,
    family_for_config,
    family_for_model_type,
    supported_class_names,
)
from lvlm_fast.models.families.base import HOLD_KWARG
from lvlm_fast.models.strategies.base import (
    PrefillResult,
    Strategy,
    VideoPrompt,
    VisualStream,
    get_strategy,
)
from lvlm_fast.ops._validate import is_meta_or_fake
from lvlm_fast.ops.summary_attention import HEAD_DIMS

# Class names (for messages and docs); the check is the families' isinstance.
SUPPORTED_MODEL_CLASSES: tuple[str, ...] = supported_class_names()
DEFAULT_MEMORY_BUDGET = 1 << 30
MAX_PREFILL_CHUNK = 4096

# Config attribute names of the multimodal placeholder tokens (transformers 5 / 4 names).
_PLACEHOLDER_ATTRS = ("video_token_id", "image_token_id", "video_token_index",
                      "image_token_index")


def _values_readable(t: torch.Tensor) -> bool:
    """Value checks need a device read; meta/fake tensors have no values (the profiler's
    simulation) and tracing must not branch on data, so those skip them."""
    return not torch.compiler.is_compiling() and not is_meta_or_fake(t)


def check_count(name: str, value: object) -> int:
    """A positive int count (``max_new_tokens``): a bool is not a count."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def check_token_id(name: str, value: object, vocab: int) -> int:
    """One token id (``eos_token_id``): an int (not a bool) in ``[0, vocab)``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int token id in [0, {vocab}) or None, got "
                        f"{type(value).__name__} {value!r}")
    if not 0 <= value < vocab:
        raise ValueError(f"{name} must be a token id in [0, {vocab}) (the vocabulary size), "
                         f"got {value}")
    return int(value)


def check_token_ids(name: str, ids: object, vocab: int,
                    placeholders: dict[str, int] | None = None) -> None:
    """(1, L>=1) integer ids in ``[0, vocab)`` holding none of ``placeholders``.

    The wrapper embeds ids itself, so a ``<video>``/``<image>`` placeholder left in the
    text would be embedded as an ordinary token (transformers rejects it instead).
    Values are read once for the whole tensor (one ``aminmax`` + one ``isin``, one host
    read); meta/fake ids skip the value part."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a (1, L>=1) int64 token id tensor, got "
                        f"{type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must be a (1, L>=1) token id tensor, got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (int64), got {ids.dtype}")
    if not _values_readable(ids):
        return
    lo, hi = torch.aminmax(ids)
    checks = [lo, hi]
    ph = dict(placeholders or {})
    if ph:
        checks.append(torch.isin(ids, torch.tensor(list(ph.values()), device=ids.device)).any())
    vals = torch.stack([c.to(torch.int64) for c in checks]).tolist()  # one host read
    if vals[0] < 0 or vals[1] >= vocab:
        bad = vals[0] if vals[0] < 0 else vals[1]
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the vocabulary size), "
                         f"got {bad}")
    if ph and vals[2]:
        row = ids[0].tolist()
        found = {k: v for k, v in ph.items() if v in row}
        raise ValueError(
            f"{name} holds the multimodal placeholder token(s) "
            + ", ".join(f"{k}={v} at position {row.index(v)}" for k, v in found.items())
            + "; the wrapper places the video itself: remove the <video>/<image> placeholder "
            "from the text")


def check_finite_frames(name: str, pixel_values: torch.Tensor) -> None:
    """Reject NaN/inf frames: one ``aminmax`` over the whole video (NaN and inf propagate
    to min/max; no (T, 3, H, W) temporary) and one host read; the offending frame is
    located only on error. Meta/fake frames skip it."""
    if not _values_readable(pixel_values) or not pixel_values.dtype.is_floating_point:
        return
    lo, hi = torch.aminmax(pixel_values)
    if bool(torch.isfinite(torch.stack([lo.float(), hi.float()])).all()):
        return
    first = -1
    for s in range(0, pixel_values.shape[0], 64):  # error path only: locate the frame
        bad = ~torch.isfinite(pixel_values[s:s + 64]).flatten(1).all(1)
        if bool(bad.any()):
            first = s + int(bad.nonzero()[0, 0])
            break
    raise ValueError(f"{name} must be finite: frame {first} holds NaN or inf values "
                     "(check the decoder / preprocessing)")


# --------------------------------------------------------------------------- wrapper
class LongVideoVLM:
    """A LLaVA-OneVision-class model plus a long-video strategy (see module doc).

    ``LongVideoVLM(model, strategy="full", **knobs)`` wraps a model instance;
    :meth:`from_pretrained` loads a local checkpoint; :meth:`from_config` builds one
    from a config (or a shipped config name) with random weights or on the meta device.
    ``strategy`` is a registered name or a :class:`Strategy`; extra keyword arguments
    override that strategy's config fields.
    """

    def __init__(self, model: torch.nn.Module, strategy: str | Strategy = "full", *,
                 memory_budget_bytes: int | None = None,
                 vision_chunk_frames: int | None = None,
                 prefill_chunk_tokens: int | None = None,
                 attention: str = "auto",
                 **strategy_overrides: Any) -> None:
        # TypeError listing the supported classes for anything no family handles
        self.family = family_for(model)
        self.model = model
        self.config = model.config
        if attention not in ("auto", "fused", "model"):
            raise ValueError(f"attention must be 'auto', 'fused' or 'model', got {attention!r}")
        tc = self.config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        if attention == "fused" and head_dim not in HEAD_DIMS:
            raise ValueError(f"attention='fused' needs a head dim in {HEAD_DIMS}, this model's "
                             f"is {head_dim} (use attention='auto' or 'model')")
        self.fused_attention = attention == "fused" or (attention == "auto"
                                                        and head_dim in HEAD_DIMS)
        if memory_budget_bytes is None:
            memory_budget_bytes = DEFAULT_MEMORY_BUDGET
        if not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be a positive int, got "
                             f"{memory_budget_bytes!r}")
        self.memory_budget_bytes = memory_budget_bytes
        self.vision_chunk_frames = self._chunk_from_budget(
            "vision_chunk_frames", vision_chunk_frames, self.vision_bytes_per_frame(),
            "frame", "vision chunk", cap=None)
        self.prefill_chunk_tokens = self._chunk_from_budget(
            "prefill_chunk_tokens", prefill_chunk_tokens, self.prefill_bytes_per_token(),
            "token", "prefill chunk", cap=MAX_PREFILL_CHUNK)
        # Tokens to reserve in the KV cache after the prompt (generate sets it to
        # max_new_tokens - 1 while its prefill runs; strategies that size their own cache
        # read it too).
        self.decode_reserve = 0
        # Seconds per stage of the last call; CUDA syncs only if ``sync_timings``.
        self.timings: dict[str, float] = {}
        self.sync_timings = False
        self.last_prefill: PrefillResult | None = None
        self.strategy = get_strategy(strategy, **strategy_overrides)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, strategy: str | Strategy = "full", *,
                        dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None,
                        **kwargs: Any) -> LongVideoVLM:
        """Load a local transformers checkpoint folder (``config.json`` + weights).

        ``dtype`` None keeps the checkpoint's dtype. Errors: ``FileNotFoundError`` if the
        folder or its ``config.json`` is missing, ``ValueError`` if the config or the
        weights cannot be read or weights are missing, ``TypeError`` for a model class
        other than :data:`SUPPORTED_MODEL_CLASSES`; each names ``path``."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {path!r} is not a folder (expected a "
                                    "transformers checkpoint folder with config.json)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"checkpoint {path!r} has no config.json (not a "
                                    "transformers checkpoint folder)")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ValueError(f"cannot read the config of checkpoint {path!r}: {exc}") from exc
        model_type = getattr(config, "model_type", None)
        archs = getattr(config, "architectures", None) or [model_type]
        family = family_for_model_type(
            model_type, f"checkpoint {path!r} ({', '.join(map(str, archs))})")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        try:
            model, info = family.model_class().from_pretrained(
                path, dtype=dtype if dtype is not None else "auto", output_loading_info=True)
        except Exception as exc:
            raise ValueError(f"cannot load the weights of checkpoint {path!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
        missing = list(info.get("missing_keys", ()))
        if missing:
            raise ValueError(f"checkpoint {path!r} is incomplete: {len(missing)} weights "
                             f"missing (e.g. {', '.join(sorted(missing)[:3])})")
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), strategy, **kwargs)

    @classmethod
    def from_config(cls, config: Any, strategy: str | Strategy = "full", *,
                    dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None,
                    **kwargs: Any) -> LongVideoVLM:
        """Random weights from a supported family's config (``LlavaOnevisionConfig``,
        ``Qwen2_5_VLConfig``) or a shipped config name
        (:data:`lvlm_fast.models.MODEL_CONFIGS`); ``device="meta"`` allocates nothing."""
        if isinstance(config, str):
            from lvlm_fast.models.configs import get_config

            config = get_config(config)
        family = family_for_config(config)
        with torch.device(device if device is not None else "cpu"):
            model = family.build(config)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model.eval(), strategy, **kwargs)

    def set_strategy(self, strategy: str | Strategy, **overrides: Any) -> Strategy:
        """Switch the default strategy (name + config overrides, or an instance)."""
        self.strategy = get_strategy(strategy, **overrides)
        return self.strategy

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def feature_size(self) -> int:
        """Channels of the visual rows strategies build (hidden, or hidden x (1 + DeepStack
        levels) on Qwen3-VL: :meth:`ModelFamily.feature_size`)."""
        return self.family.feature_size()

    @property
    def vocab_size(self) -> int:
        return self.config.text_config.vocab_size

    @property
    def image_newline(self) -> torch.nn.Parameter:
        """LLaVA-OneVision's newline vector (families without one raise AttributeError)."""
        return self.family.image_newline

    def _fixed_grid(self) -> int:
        g = getattr(self.family, "patch_grid", None)
        if g is None:
            raise AttributeError(f"the {self.family.name} family has no fixed frame size: use "
                                 "vlm.family.feature_grid / token_grid with the frame size")
        return g

    @property
    def patch_grid(self) -> int:
        """Patches per side of one frame (LLaVA-OneVision: image_size // patch_size)."""
        return self._fixed_grid()

    @property
    def pooled_grid(self) -> int:
        return math.ceil(self._fixed_grid() / 2)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame after 2x2 pooling (LLaVA-OneVision; newline excluded)."""
        return self.pooled_grid ** 2

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    # ------------------------------------------------------------------ sizing
    def vision_bytes_per_frame(self) -> int:
        """Estimated working bytes to encode one frame (see module doc; per family)."""
        return self.family.vision_bytes_per_frame()

    def prefill_bytes_per_token(self) -> int:
        """Estimated working bytes per prefill token (one decoder layer's activations)."""
        tc = self.config.text_config
        return int((6 * tc.hidden_size + 3 * tc.intermediate_size) * self.dtype.itemsize)

    def _chunk_from_budget(self, name: str, given: int | None, per_item: int, unit: str,
                           what: str, cap: int | None) -> int:
        if given is not None:
            if not isinstance(given, int) or given < 1:
                raise ValueError(f"{name} must be a positive int, got {given!r}")
            return given
        n = self.memory_budget_bytes // per_item
        if n < 1:
            raise ValueError(f"memory_budget_bytes={self.memory_budget_bytes} is too small for "
                             f"even one {what}: one {unit} needs {per_item} bytes "
                             f"(pass memory_budget_bytes >= {per_item} or set {name})")
        return min(n, cap) if cap is not None else n

    # ------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # stages nest when a prefill pulls vision chunks on demand (VisualStream): an inner
        # stage's time counts for it alone, not for the enclosing one too
        stack = self.__dict__.setdefault("_open_stages", [])
        stack.append(0.0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_timings and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            inner = stack.pop()
            self.timings[name] = self.timings.get(name, 0.0) + dt - inner
            if stack:
                stack[-1] += dt

    # ------------------------------------------------------------------ vision
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        self.family.check_pixels(pixel_values)

    @torch.no_grad()
    def encode_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(f, 3, H, W) frames -> the family's LLM-space grid (units, h, w, hidden).

        ``pixels`` may live on the host: the chunk is moved to the model's device by the
        family, so a long video's frames never need to sit in device memory all at once."""
        return self.family.encode(pixels)

    def iter_patch_features(self, pixel_values: torch.Tensor,
                            frame_index: torch.Tensor | None = None
                            ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, feats)`` per chunk of ``vision_chunk_frames`` frames, rounded up
        to whole temporal units of the family (``family.frames_per_unit``).

        ``feats``: (t_units, h, w, hidden) LLM-space features before the family's pooling,
        model dtype. ``frame_index``: optional int64 tensor of frames to encode
        (``index_select``, no host sync); ``start`` is the chunk's first unit in the
        selected sequence (= its first frame on a one-frame-per-unit family)."""
        self._check_pixels(pixel_values)
        total = pixel_values.shape[0] if frame_index is None else frame_index.shape[0]
        fpu = self.family.frames_per_unit
        step = -(-self.vision_chunk_frames // fpu) * fpu
        for start in range(0, total, step):
            with self._stage("vision"):
                if frame_index is None:
                    px = pixel_values[start : start + step]
                else:
                    idx = frame_index[start : start + step].to(pixel_values.device)
                    px = pixel_values.index_select(0, idx)
                feats = self.encode_patches(px)
                del px
            out = [(start // fpu, feats)]
            del feats
            # no local keeps the chunk while suspended: the caller's last reference frees it,
            # and the next chunk is not encoded beside this one
            yield out.pop()

    def pool_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """The family's own pooling of a (t, h, w, D) grid (LLaVA-OneVision: transformers'
        ``apply_pooling``, 2x2 bilinear; Qwen2.5-VL: identity, its merger already merged)."""
        return self.family.pool(feats)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, L) ids -> (1, L, hidden) input embeddings."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ------------------------------------------------------------------ LLM
    @contextlib.contextmanager
    def llm_attention(self) -> Iterator[None]:
        """Run the decoder with the fused bottom-right causal attention if enabled
        (restores the model's attention implementation afterwards)."""
        if not self.fused_attention:
            yield
            return
        lm = self.language_model
        old = lm.config._attn_implementation
        if old == ATTN_NAME:  # already switched (nested call)
            yield
            return
        lm.set_attn_implementation(ATTN_NAME)
        try:
            yield
        finally:
            lm.set_attn_implementation(old)

    def make_cache(self, capacity: int):
        """A :class:`PreallocatedKVCache` with ``capacity`` rows for this model's LLM
        (hybrid decoders: K/V rows in the full-attention layers, fixed-size states in the
        linear-attention ones, from ``text_config.layer_types``)."""
        return PreallocatedKVCache.for_config(self.config.text_config, capacity)

    @torch.no_grad()
    def run_llm(self, embeds: torch.Tensor, cache: Any,
                position_ids: torch.Tensor | None = None, **decoder_kwargs: Any
                ) -> torch.Tensor:
        """One decoder forward of (1, L, hidden) embeddings appended to ``cache``;
        returns the final-normed hidden states (1, L, hidden). No LM head.
        ``position_ids``: None = the decoder's default (cache length + arange), else the
        family's ids (M-RoPE: (3, 1, L)). ``decoder_kwargs``: the family's extra inputs
        (Qwen3-VL's DeepStack rows, :meth:`ModelFamily.decoder_kwargs`)."""
        kw = dict(decoder_kwargs)
        held = kw.pop(HOLD_KWARG, None)  # alive for the call, not a model input (families)
        if position_ids is not None:
            kw["position_ids"] = position_ids
        out = self.language_model(inputs_embeds=embeds, **kw,
                                  **cache_kwargs(self.language_model, cache),
                                  use_cache=True).last_hidden_state
        del held
        return out

    def placeholder_token_ids(self) -> dict[str, int]:
        """The config's ``<video>``/``<image>`` placeholder ids (by attribute name)."""
        out: dict[str, int] = {}
        for attr in _PLACEHOLDER_ATTRS:
            v = getattr(self.config, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v not in out.values():
                out[attr] = v
        return out

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        check_token_ids(name, ids, self.vocab_size, self.placeholder_token_ids())

    @torch.no_grad()
    def segment_inputs(self, pieces: list[Any], starts: list[int], lengths: list[int],
                       visual: torch.Tensor | VisualStream, a: int, b: int
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Decoder inputs for tokens ``[a, b)`` of a prompt laid out as ``pieces`` (starting
        at ``starts``, ``lengths`` long): an id tensor ((k,) or (1, k), embedded here) or a
        ``(lo, hi)`` range of ``visual`` rows (a (1, N, feature_size) tensor, or a
        :class:`VisualStream` read in order). Returns the (1, b - a, hidden) embeddings and
        the family's decoder kwargs for the visual rows' extra channels (DeepStack levels:
        :meth:`ModelFamily.decoder_kwargs`; empty when rows are hidden-wide). One place for
        the chunked prefill and the budgeted stream (strategies/stream.py)."""
        hid, fs = self.hidden_size, self.feature_size
        stream = isinstance(visual, VisualStream)
        embs, marks, extra = [], [], []
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        while i < len(pieces) and starts[i] < b:
            lo, hi = max(a - starts[i], 0), min(b - starts[i], lengths[i])
            if lo < hi:
                seg = pieces[i]
                if isinstance(seg, tuple):
                    rows = visual.take(seg[0] + lo, seg[0] + hi) if stream else \
                        visual[:, seg[0] + lo : seg[0] + hi]
                    embs.append(rows[..., :hid].to(self.dtype))
                    if fs != hid:
                        extra.append(rows[0, :, hid:])
                    marks.append((True, hi - lo))
                else:
                    embs.append(self.embed_tokens(seg.view(1, -1)[:, lo:hi]))
                    marks.append((False, hi - lo))
            i += 1
        x = embs[0] if len(embs) == 1 else torch.cat(embs, dim=1)
        del embs
        kw: dict[str, Any] = {}
        if extra:
            mask = torch.cat([torch.full((k,), m, dtype=torch.bool, device=x.device)
                              for m, k in marks]).view(1, -1)
            kw = self.family.decoder_kwargs(mask, torch.cat(extra))
        return x, kw

    def prefill_embeds(self, prefix_ids: torch.Tensor, visual: torch.Tensor,
                       question_ids: torch.Tensor, *, frames_encoded: int,
                       reserve: int | None = None,
                       blocks: TokenBlocks | None = None,
                       text_ids: Any = None) -> PrefillResult:
        """Chunked prefill of ``[prefix ; visual ; question]`` (see module doc).

        ``visual`` (1, N, feature_size) or a :class:`VisualStream` of such rows (made on
        demand as the prefill reaches them), N >= 0 (``feature_size`` = hidden, or hidden x (1 +
        DeepStack levels) on Qwen3-VL: the extra channels are split off per chunk and given
        to the decoder by the family, :meth:`ModelFamily.decoder_kwargs`). ``reserve``:
        extra cache rows for decoding (default :attr:`decode_reserve`). ``blocks``: where
        each visual token sits, for a family with grid positions (M-RoPE; required there
        when N > 0, ignored by 1-D families); each prefill chunk gets its ids from the
        family's :class:`~lvlm_fast.models.families.PositionPlan`. A family that frames
        units with text (Qwen3-VL timestamps, :meth:`ModelFamily.visual_layout`) gets it
        inserted between the visual rows here, tokenized with ``text_ids``."""
        self._check_ids("prefix_ids", prefix_ids)
        self._check_ids("question_ids", question_ids)
        fs = self.feature_size
        stream = isinstance(visual, VisualStream)
        if not (isinstance(visual, torch.Tensor) or stream) or visual.dim() != 3 \
                or visual.shape[0] != 1 or visual.shape[2] != fs:
            got = tuple(visual.shape) if isinstance(visual, (torch.Tensor, VisualStream)) \
                else type(visual)
            raise ValueError(f"visual must be (1, N, feature_size={fs}), got {got}")
        reserve = self.decode_reserve if reserve is None else reserve
        p, n, q = prefix_ids.shape[1], visual.shape[1], question_ids.shape[1]
        fam = self.family
        layout = fam.visual_layout(blocks, n, text_ids=text_ids)
        if layout is None:
            plan = fam.position_plan(p, blocks, n, q)
            mid: list[Any] = [(0, n)] if n else []
            n_llm = n
        else:
            plan = fam.position_plan(p, blocks, n, q, layout=layout)
            mid, n_llm = list(layout.pieces), layout.length
        total = p + n_llm + q
        # segments of the LLM sequence: a (1, k) id tensor (embedded when reached) or a
        # (lo, hi) range of visual rows
        pieces: list[Any] = [prefix_ids] + [m if isinstance(m, tuple) else m.view(1, -1)
                                            for m in mid] + [question_ids]
        lengths = [x[1] - x[0] if isinstance(x, tuple) else x.shape[1] for x in pieces]
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        with self._stage("prefill"), self.llm_attention():
            cache = self.make_cache(total + reserve)
            step = self.prefill_chunk_tokens
            last = None
            for a in range(0, total, step):
                b = min(a + step, total)
                x, kw = self.segment_inputs(pieces, starts, lengths, visual, a, b)
                out = self.run_llm(x, cache, None if plan is None else plan.chunk(a, b), **kw)
                del x, kw
                last = out[:, -1:].clone() if b == total else None
                del out
        return PrefillResult(last_hidden=last, cache=cache, llm_tokens=total, visual_tokens=n,
                             frames_encoded=frames_encoded, positions=plan)

    # ------------------------------------------------------------------ end to end
    def _check_prompt(self, prompt: VideoPrompt) -> None:
        if not isinstance(prompt, VideoPrompt):
            raise TypeError(f"prompt must be a VideoPrompt, got {type(prompt).__name__}")
        self._check_pixels(prompt.pixel_values)
        check_finite_frames("prompt.pixel_values", prompt.pixel_values)
        self._check_ids("prompt.prefix_ids", prompt.prefix_ids)
        self._check_ids("prompt.question_ids", prompt.question_ids)

    @torch.no_grad()
    def prefill(self, prompt: VideoPrompt, strategy: str | Strategy | None = None,
                **overrides: Any) -> PrefillResult:
        """Run a strategy's prefill on ``prompt`` (the default strategy if None)."""
        self._check_prompt(prompt)
        strat = self.strategy if strategy is None and not overrides else \
            get_strategy(strategy if strategy is not None else self.strategy.name, **overrides)
        res = self.family.run_strategy(strat, self, prompt)
        if res.positions is None and self.family.needs_blocks():
            # decoding would silently fall back to 1-D positions on an M-RoPE decoder
            raise ValueError(f"strategy {strat.name!r} returned PrefillResult.positions=None "
                             f"on the {self.family.name} family, whose decoder needs explicit "
                             "position ids: set it to the family's PositionPlan "
                             "(vlm.family.position_plan / the plan prefill_embeds returns)")
        self.last_prefill = res
        return res

    @torch.no_grad()
    def first_token(self, prompt: VideoPrompt, strategy: str | Strategy | None = None,
                    **overrides: Any) -> torch.Tensor:
        """Video in, logits of the first answer token out: (1, vocab) fp32."""
        self.timings = {}
        res = self.prefill(prompt, strategy, **overrides)
        with self._stage("lm_head"):
            return self.model.lm_head(res.last_hidden[:, -1]).float()

    @torch.no_grad()
    def generate(self, prompt: VideoPrompt, max_new_tokens: int = 32,
                 eos_token_id: int | None = None, strategy: str | Strategy | None = None,
                 **overrides: Any) -> torch.Tensor:
        """Greedy answer (1, max_new_tokens) int64; tokens after the first EOS are EOS.

        ``max_new_tokens``: an int >= 1 (TypeError for a bool or a float); ``eos_token_id``:
        None or an int in ``[0, vocab)``."""
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        if eos_token_id is not None:
            eos_token_id = check_token_id("eos_token_id", eos_token_id, self.vocab_size)
        self.timings = {}
        old = self.decode_reserve
        self.decode_reserve = max_new_tokens - 1
        try:
            res = self.prefill(prompt, strategy, **overrides)
        finally:
            self.decode_reserve = old
        tokens = self.decode(res, max_new_tokens)
        if eos_token_id is not None:
            is_eos = tokens == eos_token_id
            after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            tokens = torch.where(after, torch.full_like(tokens, eos_token_id), tokens)
        return tokens

    @torch.no_grad()
    def decode(self, res: PrefillResult, max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens (1, max_new_tokens) continuing a prefill (no host sync)."""
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        if res.positions is None and self.family.needs_blocks():
            raise ValueError(f"res.positions is None but the {self.family.name} family's "
                             "decoder needs explicit position ids (a custom strategy must set "
                             "PrefillResult.positions to the family's PositionPlan)")
        # all rows checked up front: a cache that fills mid-answer would lose the tokens made
        check_cache_room(res.cache, res.cache.get_seq_length() + max_new_tokens - 1,
                         f"decoding {max_new_tokens} tokens after this prefill (set "
                         f"decode_reserve >= {max_new_tokens - 1} before it, or use generate)")
        with self._stage("decode"), self.llm_attention():
            h = res.last_hidden
            tokens = torch.empty((1, max_new_tokens), dtype=torch.long, device=h.device)
            for t in range(max_new_tokens):
                tok = self.model.lm_head(h[:, -1]).float().argmax(-1)  # (1,)
                tokens[:, t] = tok
                if t + 1 < max_new_tokens:
                    pos = None if res.positions is None else res.positions.decode(t)
                    h = self.run_llm(self.embed_tokens(tok.view(1, 1)), res.cache, pos)
        return tokens
