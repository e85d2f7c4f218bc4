"""Peak memory of the whole long-video pipeline vs frame count (measured or simulated).

One number per (model, strategy, frame count): the **peak bytes of live tensors during one
full pass, video in, first answer token out** (DESIGN.md "Memory accounting"), i.e.
``LongVideoVLM.first_token`` on a :class:`~lvlm_fast.models.strategies.base.VideoPrompt`.

What ``peak_bytes`` counts (exactly)
------------------------------------
``peak_bytes = weight_bytes + input_bytes + pass_peak_bytes`` where

- ``weight_bytes``: every parameter and buffer of the model (unique storages, so tied
  weights count once), on the model's device, in the profiled dtype. Live from the start.
- ``input_bytes``: the prompt as :class:`VideoPrompt` holds it for the whole call: the
  preprocessed frames ``pixel_values`` (T, 3, H, W) in the model dtype (H x W = a
  ``PROFILE_VIDEO_HW`` = 448 x 448 video resized by the family's video-processor rule,
  :func:`profile_frame_hw`: 384 x 384 on LLaVA-OneVision, 448 x 448 on Qwen2.5-VL) plus
  the prefix/question token ids (int64). Counted only if
  they live on the model's device (frames kept in host memory while the model runs on a
  GPU are not device memory). By default (``inputs_on_device=False``) they are left out of
  the sum (the row still reports them): frames are decoded into host memory and the
  wrapper moves one vision chunk at a time to the device, as ``lvlm-fast run`` does.
  ``inputs_on_device=True`` adds them, for pipelines that upload the whole video.
- ``pass_peak_bytes``: the peak, above the level at entry, of tensor storages allocated
  during the call and alive at the same time (activations, KV cache, visual tokens, the
  returned logits). CPU and meta/fake (simulated): the dispatch-level
  :class:`~lvlm_fast.profile.tracker.LiveTensorTracker`; CUDA: the caching allocator's
  peak (``torch.cuda.max_memory_allocated``), which also sees kernels' internal buffers.

Not counted: memory that is not a tensor storage (Python objects, CUDA context, allocator
caching/fragmentation), scratch a CPU kernel allocates and frees inside one op (invisible
at the dispatch level), the decoder's own buffers before preprocessing.

Simulated vs measured
---------------------
``simulate=True`` builds the model from its config on the ``meta`` device (no weights,
no RAM), makes meta frames and ids, and runs the *same* code under the same tracker: meta
storages report the bytes the real tensors would take, so the 7B can be profiled at 10,240
frames on a laptop. ``simulate=False`` builds the model with random weights on CPU (or
the given device) and runs it for real; the tier-0 tests check both agree within 5 % on
the tiny configs for every registered strategy.

Why the project's tracker and not ``torch.distributed._tools.mem_tracker.MemTracker``
-------------------------------------------------------------------------------------
Checked on torch 2.13: MemTracker works on CPU and meta tensors and, given
``track_external(model, inputs)``, reports parameters, buffers and activations with the
right totals on a single forward. It does not fit this pipeline: it raises
``NotImplementedError("MemTracker does not support memory tracking for multiple
iterative calls")`` as soon as a module runs twice inside one tracking session, and the
chunked pipeline calls every vision layer once per chunk and every decoder layer once per
prefill chunk (a tier-0 test pins this). It is also a private API of the distributed
package, and counts storages it was not told about as new the first time an op returns
them. ``torch.cuda.memory`` (the allocator's peak) is used for measured CUDA runs.

Simulation speed
----------------
A meta op costs ~0.3-1 ms on torch 2.13 (elementwise ops run Python reference
decompositions) and a 7B pass over 10,240 frames runs ~10^5-10^6 of them, so simulated
runs use :class:`SimulationTracker`: the live tracker plus a cache of meta shape inference
keyed by the op and its inputs' metadata (vision chunks repeat the same shapes). It
changes no accounting (tested: cached and uncached peaks are equal). On top of it,
:class:`VisionChunkReplay` replays whole vision chunks (``family.encode``) whose input
metadata was seen before: the chunk's peak above the live level and its output are
recorded on the first run and replayed afterwards (tested: equal peaks, token counts,
allocation counts and breakdowns for every strategy on every family). Qwen2.5-VL-7B's
windowed tower makes ~4,000 attention calls per 18-frame chunk; with replay a simulated
``full`` pass over 10,240 frames takes ~20 s on 2 shared cores.

API
---
``profile_pipeline(model, strategy, frames, *, dtype, simulate, ...) -> dict`` one row.
``VisionChunkReplay`` replays repeated simulated vision chunks.
``Profiler`` caches the built model/wrapper across calls (the sweep reuses one 7B meta
model) and offers ``sweep`` and ``largest_fitting`` (bisection between frame counts).
``PeakBreakdownTracker`` records which tensors were alive at the peak moment.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lvlm_fast.profile.tracker import LiveTensorTracker, _tensor_storages
from lvlm_fast.profile.tracker import _storages as _storages_of

__all__ = [
    "DEFAULT_FRAMES",
    "DEFAULT_MODEL",
    "GIB",
    "PROFILE_VIDEO_HW",
    "PeakBreakdownTracker",
    "Profiler",
    "VisionChunkReplay",
    "build_model",
    "make_prompt",
    "model_static_bytes",
    "profile_frame_hw",
    "profile_pipeline",
]

GIB = 1024**3
DEFAULT_MODEL = "llava-onevision-qwen2-7b"
DEFAULT_FRAMES = (128, 256, 512, 1024, 2048, 4096, 8192, 10240)
# Prompt around the video: a chat-template-sized prefix (system + user header) and a short
# question + assistant header. Their size barely matters next to the video.
PREFIX_TOKENS = 16
QUESTION_TOKENS = 32
# The video a profile feeds, before the family's resize (issue 10: 448 x 448 input).
PROFILE_VIDEO_HW = (448, 448)
# Config attributes holding multimodal special token ids (random prompt ids avoid them).
_SPECIAL_ID_ATTRS = ("image_token_index", "video_token_index", "image_token_id",
                     "video_token_id", "vision_start_token_id", "vision_end_token_id",
                     "vision_token_id")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------- model + inputs
def resolve_config(config: Any):
    """A shipped config name or a config object of a supported family -> the config."""
    if isinstance(config, str):
        from lvlm_fast.models.configs import get_config

        return get_config(config)
    return config


def apply_config_overrides(config: Any, overrides: dict[str, Any] | None) -> Any:
    """A deep copy of ``config`` with ``{"a.b": value}`` set (``lvlm-fast profile
    --model-set``): each dotted part is a config attribute or a dict key (a family's
    sub-config dict such as Video-LLaMA's ``video_qformer`` may gain a key; any other
    missing part is a ValueError naming it)."""
    import copy

    if not overrides:
        return config
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        parts = key.split(".")
        obj: Any = cfg
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(obj, dict):
                if last:
                    obj[part] = value
                elif part in obj:
                    obj = obj[part]
                else:
                    raise ValueError(f"model config has no {'.'.join(parts[:i + 1])!r}")
            elif part and hasattr(obj, part):
                if last:
                    setattr(obj, part, value)
                else:
                    obj = getattr(obj, part)
            else:
                raise ValueError(f"model config has no {'.'.join(parts[:i + 1])!r}")
    return cfg


def build_model(config: Any, *, dtype: torch.dtype = torch.bfloat16, simulate: bool = True,
                device: str | torch.device | None = None, seed: int = 0) -> torch.nn.Module:
    """The family's transformers model (``LlavaOnevisionForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration``, ...) from a config (name or object).

    ``simulate=True``: on the meta device (no weights, no memory). Else random init on
    ``device`` (default CPU), seeded, in ``dtype``, eval mode. A config no family supports
    is a TypeError listing the supported classes.
    """
    from lvlm_fast.models.families import family_for_config

    cfg = resolve_config(config)
    family = family_for_config(cfg)
    dev = torch.device("meta") if simulate else torch.device(device or "cpu")
    if not simulate:
        torch.manual_seed(seed)
    with dev:
        model = family.build(cfg)
    return model.to(dtype).eval()


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata in seen:
            continue
        seen.add(st._cdata)
        total += st.nbytes()
    return total


def model_static_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (unique storages: tied weights count once)."""
    return _unique_storage_bytes([*model.parameters(), *model.buffers()])


def profile_frame_hw(model_or_config: Any) -> tuple[int, int]:
    """(H, W) of the preprocessed frames a profile feeds: a ``PROFILE_VIDEO_HW`` video
    resized by the family's own video-processor rule (``ModelFamily.frame_size``):
    LLaVA-OneVision squares it to the tower's ``image_size`` (384); Qwen2.5-VL keeps
    448 x 448 (a multiple of 28 inside its default pixel bounds); Qwen3-VL and Qwen3.5 (one
    processor) get its long-video per-frame cap, :func:`long_video_frame_hw` (352 x 352; the
    per-frame rule alone would keep 448 x 448: ``--frame-size 448x448``)."""
    from lvlm_fast.models.families import family_for, family_for_config

    if isinstance(model_or_config, torch.nn.Module):
        family = family_for(model_or_config)
    else:  # a config: the family needs a model instance; a meta one allocates nothing
        cfg = resolve_config(model_or_config)
        with torch.device("meta"):
            family = family_for_config(cfg)(family_for_config(cfg).build(cfg))
    if family.name in LONG_VIDEO_FAMILIES:
        return long_video_frame_hw(*PROFILE_VIDEO_HW, max(DEFAULT_FRAMES))
    return tuple(family.frame_size(*PROFILE_VIDEO_HW, {}))


def long_video_frame_hw(height: int, width: int, num_frames: int) -> tuple[int, int]:
    """The frame size transformers' ``Qwen3VLVideoProcessor`` gives a long video with its
    per-frame cap on (``cap_pixels_per_frame=True``, the qwen-vl-utils rule): per-frame
    pixels ``max(min(max_video_tokens * f^2, longest_edge // T), int(1.05 * shortest_edge))``
    (f = patch 16 x merge 2 = 32; class defaults ``shortest_edge`` 128 x 32^2, ``longest_edge``
    768 x 32^2, ``max_video_tokens`` 768), then the processor's ``smart_resize`` over the
    T frames. From 448 x 448: 352 x 352 (121 merged tokens per temporal unit instead of 196)
    at every T >= 6; computed with transformers' own function and class defaults."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
        smart_resize,
    )

    proc = Qwen3VLVideoProcessor
    f = proc.patch_size * proc.merge_size
    lo, hi = proc.size["shortest_edge"], proc.size["longest_edge"]
    per_frame = max(min(proc.max_video_tokens * f * f, hi // num_frames), int(lo * 1.05))
    return tuple(smart_resize(num_frames, height, width, temporal_factor=proc.temporal_patch_size,
                              factor=f, min_pixels=lo, max_pixels=per_frame * num_frames))


# Families whose profile feeds the processor's long-video frame size (the profile's frame
# counts are thousands of frames); the others: the family's per-frame rule.
LONG_VIDEO_FAMILIES = ("qwen3_vl", "qwen3_5")


def _check_frame_hw(frame_hw: Any) -> tuple[int, int]:
    if not (isinstance(frame_hw, (tuple, list)) and len(frame_hw) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in frame_hw)):
        raise ValueError(f"frame_hw must be (height, width) positive ints, got {frame_hw!r}")
    return int(frame_hw[0]), int(frame_hw[1])


def _text_id_bound(cfg: Any) -> int:
    """Ids below every special multimodal id of the config and the vocabulary size."""
    ids = [getattr(cfg, a, None) for a in _SPECIAL_ID_ATTRS]
    return min([cfg.text_config.vocab_size,
                *(i for i in ids if isinstance(i, int) and not isinstance(i, bool))])


def make_prompt(config: Any, frames: int, *, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "meta", prefix_tokens: int = PREFIX_TOKENS,
                question_tokens: int = QUESTION_TOKENS, seed: int = 0,
                frame_hw: tuple[int, int] | None = None):
    """A :class:`VideoPrompt` of ``frames`` preprocessed frames (T, 3, H, W) in ``dtype``
    (``frame_hw``, default :func:`profile_frame_hw`) and random prompt ids that avoid every
    multimodal special id (image/video placeholders, vision start/end). On meta: shapes
    only."""
    from lvlm_fast.models.strategies.base import VideoPrompt

    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    cfg = resolve_config(config)
    h, w = profile_frame_hw(cfg) if frame_hw is None else frame_hw
    device = torch.device(device)
    if device.type == "meta":
        pixels = torch.empty(frames, 3, h, w, dtype=dtype, device=device)
        prefix = torch.zeros(1, prefix_tokens, dtype=torch.long, device=device)
        question = torch.zeros(1, question_tokens, dtype=torch.long, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randn(frames, 3, h, w, generator=gen).to(device=device, dtype=dtype)
        hi = _text_id_bound(cfg)
        prefix = torch.randint(0, hi, (1, prefix_tokens), generator=gen).to(device)
        question = torch.randint(0, hi, (1, question_tokens), generator=gen).to(device)
    kw: dict[str, Any] = {}
    if device.type != "meta":
        from lvlm_fast.models.families import family_for_config

        if hasattr(family_for_config(cfg), "unit_text"):
            # Qwen3-VL / Qwen3.5 frame each unit with timestamp text. The meta run counts it
            # with the family's nominal tokenizer (no tokenizer there); a measured run uses
            # the same one, so both read the same tokens (ids 0, a valid text id).
            from lvlm_fast.models.families.qwen3_vl import nominal_text_ids

            kw["text_ids"] = nominal_text_ids
    return VideoPrompt(pixel_values=pixels, prefix_ids=prefix, question_ids=question, **kw)


def prompt_bytes(prompt: Any) -> int:
    return _unique_storage_bytes([prompt.pixel_values, prompt.prefix_ids, prompt.question_ids])


# ---------------------------------------------------------------------- simulation speed
class _Uncacheable(Exception):
    pass


_SCALARS = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _key(x: Any, leaves: list[torch.Tensor]) -> Any:
    """Hashable key of an op argument (tensors: meta metadata); tensors appended to
    ``leaves`` in order. Raises _Uncacheable for anything else."""
    if isinstance(x, torch.Tensor):
        if not x.is_meta:
            raise _Uncacheable
        leaves.append(x)
        return (x.shape, x.stride(), x.storage_offset(), x.dtype)
    tx = type(x)
    if tx is tuple or tx is list:
        return (tx, *[_key(v, leaves) for v in x])
    if x is None or isinstance(x, _SCALARS):
        return (tx, x)
    raise _Uncacheable


def _cacheable_op(func: Any) -> bool:
    """Ops whose meta outputs depend only on the inputs' metadata and that change no
    input's metadata: not in-place view ops (``transpose_``, ``resize_``, ``set_``...),
    not ``out=`` variants (they resize ``out``), not mutable custom ops."""
    if torch.Tag.inplace_view in func.tags or "out" in func._overloadname:
        return False
    name = func.name()
    if name.startswith("aten::resize") or name.startswith("aten::set_"):
        return False
    return name.startswith("aten::") or not func._schema.is_mutable


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


class SimulationTracker(LiveTensorTracker):
    """:class:`LiveTensorTracker` plus a shape-inference cache for meta tensors.

    Why: on torch 2.13 a meta op costs ~0.3-1 ms in Python (most elementwise ops go
    through the Python reference decompositions), and a 7B pass over 10,240 frames runs
    hundreds of thousands of them (every vision chunk repeats the same shapes). Meta
    outputs depend only on the inputs' metadata, so the first call of an op with a given
    (op, input shapes/strides/offsets/dtypes, scalar arguments) records its outputs'
    metadata, and later identical calls build the outputs directly: a new meta storage of
    the same shape/stride for a fresh output, the same input object for an in-place
    result, ``as_strided`` on the same storage for a view. Storage accounting is
    unchanged (the outputs are the same storages the op would return). Only all-meta
    calls are cached; ops that mutate metadata (``*_`` view ops, ``resize_``, ``set_``,
    ``out=``) always run. ``hits``/``misses`` count cache use.
    """

    def __init__(self, *, cache: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self._use_cache = cache
        self._op_cache: dict[Any, Any] = {}
        self._op_ok: dict[Any, bool] = {}
        self.hits = 0
        self.misses = 0

    def _sdpa(self, func, types, args, kwargs):
        """SDPA as one op, as the fused kernels run it. Under ``inference_mode`` the meta
        call returns a contiguous (B, H, L, D) output; the fused kernels (flash on CPU,
        flash/memory-efficient on CUDA) return it in the *query's* memory order, which
        for transformers' ``view(B, L, H, D).transpose(1, 2)`` queries makes the later
        ``transpose(1, 2).contiguous()`` free. Build the output that way so the
        simulation does not count a copy the device never makes. (Kernel workspaces,
        e.g. the float bias CUDA's memory-efficient kernel makes from a boolean mask,
        are inside the op and not modelled.)"""
        q = args[0] if args else kwargs.get("query")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        if not (isinstance(q, torch.Tensor) and q.is_meta and q.dim() == 4
                and isinstance(v, torch.Tensor)):
            return super().__torch_dispatch__(func, types, args, kwargs)
        with self._lock:
            for st in _storages_of((args, kwargs)):
                self._note_input(st)
        shape = (*q.shape[:3], v.shape[-1])
        order = sorted(range(4), key=lambda i: -q.stride(i))  # outermost first
        out = torch.empty_permuted(shape, order, dtype=q.dtype, device="meta")
        with self._lock:
            self._note_output(out.untyped_storage())
        return out

    def _record(self, key: Any, leaves: list[torch.Tensor], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outs, kind = [out], None
        elif isinstance(out, (tuple, list)):
            outs, kind = list(out), type(out)
        else:
            return
        by_storage: dict[int, int] = {}
        for i, leaf in enumerate(leaves):
            by_storage.setdefault(leaf.untyped_storage()._cdata, i)
        recs, new_storages = [], set()
        for o in outs:
            if o is None:
                recs.append(("none", 0, None))
                continue
            if not isinstance(o, torch.Tensor) or o.device.type != "meta":
                return  # a Python number, a non-meta tensor: do not cache
            st = o.untyped_storage()
            src = by_storage.get(st._cdata)
            if src is not None:
                if o is leaves[src]:
                    recs.append(("same", src, None))
                else:
                    recs.append(("view", src, (tuple(o.shape), o.stride(), o.storage_offset())))
                continue
            # A fresh output: must be exactly what empty_strided would allocate, and not
            # share its storage with another output.
            if st._cdata in new_storages or o.storage_offset() != 0:
                return
            fresh = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device="meta")
            if fresh.untyped_storage().nbytes() != st.nbytes():
                return
            new_storages.add(st._cdata)
            recs.append(("new", 0, (tuple(o.shape), o.stride(), o.dtype)))
        self._op_cache[key] = (kind, recs)

    def _replay(self, rec: Any, leaves: list[torch.Tensor]) -> Any:
        kind, recs = rec
        outs = []
        for what, src, meta in recs:
            if what == "new":
                outs.append(torch.empty_strided(meta[0], meta[1], dtype=meta[2], device="meta"))
            elif what == "same":
                outs.append(leaves[src])
            elif what == "view":
                outs.append(leaves[src].as_strided(*meta))
            else:
                outs.append(None)
        return outs[0] if kind is None else kind(outs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ok = self._op_ok.get(func)
        if ok is None:
            ok = self._op_ok[func] = self._use_cache and _cacheable_op(func)
        if func is _SDPA:
            return self._sdpa(func, types, args, kwargs)
        if not ok:
            return super().__torch_dispatch__(func, types, args, kwargs)
        leaves: list[torch.Tensor] = []
        try:
            key = (func, _key(args, leaves), _key(tuple(kwargs.items()), leaves))
        except _Uncacheable:
            return super().__torch_dispatch__(func, types, args, kwargs)
        rec = self._op_cache.get(key)
        if rec is None:
            self.misses += 1
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self._record(key, leaves, out)
            return out
        self.hits += 1
        out = self._replay(rec, leaves)
        # Same bookkeeping as the parent, without running the op.
        with self._lock:
            for leaf in leaves:
                self._note_input(leaf.untyped_storage())
            for o in ((out,) if isinstance(out, torch.Tensor) else out):
                if o is not None:
                    self._note_output(o.untyped_storage())
        return out


# ---------------------------------------------------------------------- breakdown tracker
@dataclasses.dataclass
class LiveTensorInfo:
    """One storage alive at the peak moment."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    op: str
    where: str  # innermost lvlm_fast / transformers frames that allocated it

    def describe(self) -> str:
        return (f"{self.nbytes / GIB:8.3f} GiB  {self.dtype:>8}  {list(self.shape)!s:<28} "
                f"{self.op:<32} {self.where}")


def _call_site(limit: int = 3) -> str:
    """Innermost frames of the package or transformers (where an allocation came from)."""
    keep = []
    for fr in reversed(traceback.extract_stack()[:-3]):
        f = fr.filename
        if "/profile/" in f or "/torch/" in f:
            continue
        if "lvlm_fast" in f or "transformers" in f:
            short = f.split("lvlm_fast/")[-1] if "lvlm_fast/" in f else f.split("/")[-1]
            keep.append(f"{short}:{fr.lineno}:{fr.name}")
            if len(keep) == limit:
                break
    return " < ".join(keep)


class PeakBreakdownTracker(SimulationTracker):
    """A :class:`LiveTensorTracker` that also remembers *which* storages were alive at the
    (pass) peak: op, shape, dtype and, for storages of at least ``site_min_bytes``, the
    package/transformers source line that allocated them. Slower: use for diagnosis."""

    def __init__(self, *, site_min_bytes: int = 16 * 2**20, **kw: Any) -> None:
        super().__init__(**kw)
        self._info: dict[int, LiveTensorInfo] = {}
        self._site_min = site_min_bytes
        self._peak_keys: list[int] = []
        self.peak_live: list[LiveTensorInfo] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.peak_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for leaf, st in _tensor_storages(out):
            key = st._cdata
            if key in self._live and key not in self._info:
                nbytes = self._live[key][0]
                where = _call_site() if nbytes >= self._site_min else ""
                self._info[key] = LiveTensorInfo(nbytes, tuple(leaf.shape),
                                                 str(leaf.dtype).replace("torch.", ""),
                                                 str(func.overloadpacket.__name__), where)
        if self.peak_bytes > before:  # new peak: remember who is alive now
            self._peak_keys = list(self._live)
            self.peak_live = [self._info.get(k) or LiveTensorInfo(self._live[k][0], (), "?",
                                                                   "?", "")
                              for k in self._peak_keys]
        return out

    def _on_free(self, key: int, _ref: Any) -> None:
        super()._on_free(key, _ref)
        self._info.pop(key, None)

    def top(self, n: int = 10) -> list[LiveTensorInfo]:
        return sorted(self.peak_live, key=lambda i: -i.nbytes)[:n]


# ---------------------------------------------------------------------- vision chunk replay
@dataclasses.dataclass
class _ChunkRecord:
    """What one simulated vision chunk did to the live total: its peak above the level at
    entry, its output (one fresh storage, the only thing left alive), the allocation
    counters, and (breakdown runs) the chunk's own storages alive at its peak."""

    inner_peak: int
    out_shape: tuple[int, ...]
    out_stride: tuple[int, ...]
    out_offset: int
    out_dtype: torch.dtype
    out_numel: int  # elements of the output's storage
    num_allocations: int
    allocated_bytes: int
    peak_infos: list[LiveTensorInfo] | None
    out_info: LiveTensorInfo | None  # breakdown runs: op/shape/site that made the output


def _strided_numel(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Elements of the storage ``empty_strided(shape, stride)`` allocates."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))


def _replay_key(x: Any) -> Any:
    """Hashable key of a replayed call's argument: a meta tensor by its metadata (shape,
    strides, dtype; not its storage offset: chunks are slices of one frame tensor and
    recording checks the output never aliases an input), a host tensor (Qwen2.5-VL's
    ``cu_seqlens``) by its values, scalars by value. Anything else: _Uncacheable."""
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            return ("meta", tuple(x.shape), x.stride(), x.dtype)
        if x.device.type == "cpu" and x.numel() <= 1 << 20:
            return ("host", x.dtype, tuple(x.shape), x.contiguous().numpy().tobytes()
                    if x.dtype != torch.bfloat16 else x.float().numpy().tobytes())
        raise _Uncacheable
    tx = type(x)
    if tx is tuple or tx is list:
        return (tx, *[_replay_key(v) for v in x])
    if tx is dict:
        return (tx, *[(k, _replay_key(v)) for k, v in x.items()])
    if x is None or isinstance(x, _SCALARS):
        return (tx, x)
    raise _Uncacheable


def _module_signature(module: torch.nn.Module) -> Any:
    """What makes two modules compute the same shapes: class, parameter/buffer shapes and
    dtypes, training flag."""
    return (type(module), module.training,
            tuple((n, tuple(t.shape), t.dtype) for n, t in module.named_parameters()),
            tuple((n, tuple(t.shape), t.dtype) for n, t in module.named_buffers()))


def vision_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the model's vision tower: the elements of every
    ``nn.ModuleList`` under a submodule named ``visual`` (Qwen-VL) or ``vision_tower``
    (LLaVA). Replaying them (:class:`VisionChunkReplay`) makes one all-frames vision call
    (``vilamp-seed``'s released-style pass) cost one block of each kind."""
    out: list[torch.nn.Module] = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if isinstance(mod, torch.nn.ModuleList) and ("visual" in parts
                                                      or "vision_tower" in parts):
            out.extend(mod)
    return out


class VisionChunkReplay:
    """Replays simulated vision calls (a chunk through ``family.encode``, one vision block)
    whose inputs were seen before.

    Why: a 10,240-frame simulation sends hundreds of identical vision chunks through the
    tower (Qwen2.5-VL-7B at 448 x 448: 16 windows per temporal patch, one attention call
    each, in 28 of its 32 blocks: ~4,000 attention calls per chunk), every strategy and
    frame count repeats them, and a released-style all-frames vision call (``vilamp-seed``)
    runs the same windowed block 28 times over every frame. On meta tensors such a call is
    a function of its inputs' metadata (shape, strides, dtype), its host-side arguments
    (``cu_seqlens``) and the module's parameter shapes, and it leaves nothing alive but its
    output. So the first call with a given key runs for real under the tracker and
    records (a) its peak above the live level at entry, (b) its output's metadata and
    storage size, (c) the allocation counters; a later identical call raises the tracker's
    peak to ``live + (a)`` if that is higher and allocates an output of (b). The
    accounting is the one the real call gives: the peak of a call does not depend on what
    is alive beside it, and nothing else changes the live total meanwhile. A recorded call
    that leaves anything alive besides its output (state kept by the module), returns
    something other than one fresh tensor, or takes an argument that cannot be keyed, is
    never replayed: it runs for real every time. Only meta inputs are replayed (measured
    runs always run); tested: replayed and fully run peaks, token counts, allocation counts
    and breakdowns are equal for every strategy on every family.
    """

    def __init__(self) -> None:
        self.records: dict[Any, _ChunkRecord | None] = {}
        self.hits = 0
        self.misses = 0

    def wrap(self, encode: Callable[..., torch.Tensor], tracker: LiveTensorTracker,
             tag: Any = "encode") -> Callable[..., torch.Tensor]:
        """``encode`` with replay under ``tracker`` (the tracker active during the call);
        ``tag`` tells apart functions that compute different things from the same inputs
        (a module's :func:`_module_signature`)."""
        breakdown = isinstance(tracker, PeakBreakdownTracker)

        def replayed(*args: Any, **kwargs: Any) -> torch.Tensor:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not (isinstance(first, torch.Tensor) and first.is_meta):
                return encode(*args, **kwargs)
            try:
                key = (tag, _replay_key(args), _replay_key(kwargs), breakdown)
            except _Uncacheable:
                return encode(*args, **kwargs)
            if key not in self.records:
                self.misses += 1
                return self._record(key, lambda: encode(*args, **kwargs), tracker,
                                    breakdown)
            rec = self.records[key]
            if rec is None:  # left state behind when recorded: always run
                return encode(*args, **kwargs)
            self.hits += 1
            return self._replay(rec, tracker, breakdown)

        return replayed

    def wrap_modules(self, modules: Sequence[torch.nn.Module],
                     tracker: LiveTensorTracker) -> Callable[[], None]:
        """Replay every module of ``modules`` (their ``forward``); returns the undo."""
        for m in modules:
            m.forward = self.wrap(m.forward, tracker, _module_signature(m))

        def undo() -> None:
            for m in modules:
                m.__dict__.pop("forward", None)
        return undo

    def _record(self, key: Any, call: Callable[[], Any], tr: LiveTensorTracker,
                breakdown: bool) -> Any:
        with tr._lock:
            entry = tr.current_bytes
            saved_peak = tr.peak_bytes
            saved_live = (tr._peak_keys, tr.peak_live) if breakdown else None
            entry_keys = set(tr._live)
            n0, a0 = tr.num_allocations, tr.allocated_bytes
            tr.peak_bytes = entry  # follow the chunk's own peak from here
        try:
            out = call()
        finally:
            with tr._lock:
                inner_peak = tr.peak_bytes - entry
                infos = None
                if breakdown:
                    infos = [i for k, i in zip(tr._peak_keys, tr.peak_live, strict=True)
                             if k not in entry_keys]
                if tr.peak_bytes < saved_peak:  # not a new overall peak: restore
                    tr.peak_bytes = saved_peak
                    if saved_live is not None:
                        tr._peak_keys, tr.peak_live = saved_live
        st = out.untyped_storage() if isinstance(out, torch.Tensor) else None
        left = tr.current_bytes - entry
        if st is None or not out.is_meta or st._cdata in entry_keys or left != st.nbytes():
            self.records[key] = None
            return out
        self.records[key] = _ChunkRecord(
            inner_peak, tuple(out.shape), out.stride(), out.storage_offset(), out.dtype,
            st.nbytes() // out.element_size(), tr.num_allocations - n0,
            tr.allocated_bytes - a0, infos, tr._info.get(st._cdata) if breakdown else None)
        return out

    def _replay(self, rec: _ChunkRecord, tr: LiveTensorTracker,
                breakdown: bool) -> torch.Tensor:
        with tr._lock:
            n0, a0 = tr.num_allocations, tr.allocated_bytes
            cand = tr.current_bytes + rec.inner_peak
            if cand > tr.peak_bytes:
                tr.peak_bytes = cand
                if breakdown:
                    keys = list(tr._live)
                    tr.peak_live = [tr._info.get(k) or LiveTensorInfo(tr._live[k][0], (), "?",
                                                                      "?", "")
                                    for k in keys] + list(rec.peak_infos or ())
                    # the replayed call's own storages have no key (None: never "at entry")
                    tr._peak_keys = keys + [None] * len(rec.peak_infos or ())
            dev_cur = tr._by_device.get("meta", 0) + rec.inner_peak
            if dev_cur > tr.peak_by_device.get("meta", 0):
                tr.peak_by_device["meta"] = dev_cur
        # allocated through the tracker (it counts the output storage as live from here)
        if rec.out_offset == 0 and rec.out_numel == _strided_numel(rec.out_shape,
                                                                    rec.out_stride):
            out = torch.empty_strided(rec.out_shape, rec.out_stride, dtype=rec.out_dtype,
                                      device="meta")
        else:  # a view into a larger storage: allocate the storage, view it the same way
            base = torch.empty(rec.out_numel, dtype=rec.out_dtype, device="meta")
            out = base.as_strided(rec.out_shape, rec.out_stride, rec.out_offset)
        with tr._lock:
            tr.num_allocations = n0 + rec.num_allocations
            tr.allocated_bytes = a0 + rec.allocated_bytes
            if rec.out_info is not None:  # the op that really made it, for --breakdown
                tr._info[out.untyped_storage()._cdata] = rec.out_info
        return out


# ---------------------------------------------------------------------- the pipeline
def _default_overrides(name: str) -> dict[str, Any]:
    return {}


def _make_wrapper(model: torch.nn.Module, strategy: Any, vlm_kwargs: dict[str, Any]):
    from lvlm_fast.models.wrapper import LongVideoVLM

    return LongVideoVLM(model, strategy=strategy, **vlm_kwargs)


def _run_first_token(vlm: Any, prompt: Any) -> tuple[torch.Tensor, Any]:
    """``vlm.first_token(prompt)`` plus the strategy's PrefillResult counts if exposed."""
    logits = vlm.first_token(prompt)
    return logits, getattr(vlm, "last_prefill", None)


def cache_split(info: Any) -> tuple[int | None, int | None]:
    """(KV bytes, recurrent-state bytes) of the cache a pass leaves (``PrefillResult.cache``):
    the allocated K/V buffers of the full-attention layers (they grow with the tokens kept)
    and a hybrid decoder's linear-attention conv + recurrent states (Qwen3.5: constant in
    tokens; 0 for attention-only decoders). (None, None) where the result holds no
    preallocated cache. Shape arithmetic only (meta-safe); no accounting changes."""
    cache = getattr(info, "cache", None)
    if not (hasattr(cache, "allocated_bytes") and hasattr(cache, "state_bytes")):
        return None, None
    return int(cache.allocated_bytes()), int(cache.state_bytes())


class Profiler:
    """Profiles one model (built once) under many strategies and frame counts.

    ``model``: a shipped config name, a config of a supported family
    (``LlavaOnevisionConfig``, ``Qwen2_5_VLConfig``), or a model instance (meta ->
    simulated). ``frame_hw``: the preprocessed frame size (default
    :func:`profile_frame_hw`: a 448 x 448 video resized by the family's rule).
    ``vlm_kwargs``: passed to ``LongVideoVLM`` (chunk sizes, budget...).
    ``strategy_overrides``: ``{strategy name: {knob: value}}``.
    ``model_overrides``: ``{"dotted.config.key": value}`` applied to a config before the
    build (:func:`apply_config_overrides`; e.g. ``{"video_qformer.position": "clamp"}``).
    ``kernel_standins`` (simulated runs; default True): count the GPU kernels a deployment
    runs where transformers' meta path is another algorithm
    (:mod:`lvlm_fast.profile.kernel_standins`: FLA's gated delta rule, FlashAttention-2 at
    head dims the fused kernel lacks); :attr:`kernel_models` records which were used.
    """

    def __init__(self, model: Any = DEFAULT_MODEL, *, dtype: str | torch.dtype = torch.bfloat16,
                 simulate: bool = True, device: str | torch.device | None = None,
                 vlm_kwargs: dict[str, Any] | None = None,
                 strategy_overrides: dict[str, dict[str, Any]] | None = None,
                 inputs_on_device: bool = False, seed: int = 0,
                 frame_hw: tuple[int, int] | None = None,
                 model_overrides: dict[str, Any] | None = None,
                 kernel_standins: bool = True) -> None:
        self.dtype = parse_dtype(dtype)
        self._shared_model: torch.nn.Module | None = None
        if model_overrides and isinstance(model, torch.nn.Module):
            raise ValueError("model_overrides apply to a config, not to a built model")
        if isinstance(model, torch.nn.Module):
            # A user's instance is shared by every strategy (it cannot be rebuilt).
            self._shared_model = model
            self.model_name = getattr(model.config, "name_or_path", "") or type(model).__name__
            p = next(model.parameters())
            simulate = p.device.type == "meta"
            self.dtype = p.dtype
            self.model = model
        else:
            self.model_name = model if isinstance(model, str) else type(model).__name__
            self._model_spec = apply_config_overrides(resolve_config(model), model_overrides)
            self.model = build_model(self._model_spec, dtype=self.dtype, simulate=simulate,
                                     device=device, seed=seed)
        self.config = self.model.config
        self.simulate = simulate
        self.device = next(self.model.parameters()).device
        self.vlm_kwargs = dict(vlm_kwargs or {})
        self.strategy_overrides = {k: dict(v) for k, v in (strategy_overrides or {}).items()}
        self.inputs_on_device = inputs_on_device
        self.seed = seed
        self.weight_bytes = model_static_bytes(self.model)
        self.op_cache = simulate  # SimulationTracker's shape cache (meta runs only)
        # meta runs: the GPU kernels' allocations where transformers' meta path is another
        # algorithm (Qwen3.5: FLA's gated delta rule, FA2 at head dim 256; kernel_standins.py)
        self.kernel_standins = simulate and kernel_standins
        self.kernel_models: dict[str, str] = {}
        # vision chunks replayed from their first run (meta runs only; VisionChunkReplay)
        self.replay_chunks = simulate
        self.chunk_replay = VisionChunkReplay()
        # repeated decoder windows of the budgeted cache (stream strategy, issue 12)
        from lvlm_fast.profile.window_replay import DecoderWindowReplay

        self.replay_windows = simulate
        self.window_replay = DecoderWindowReplay()
        # the preprocessed frame size fed to the model (a 448 x 448 video, family resize)
        from lvlm_fast.models.families import family_for

        self.family = family_for(self.model)
        self.frame_hw = profile_frame_hw(self.model) if frame_hw is None else \
            _check_frame_hw(frame_hw)
        self._cache: dict[tuple[int, str], dict[str, Any]] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self.unsupported: dict[str, str] = {}  # strategy -> why it cannot run (sweep)

    def model_for(self, strategy: str) -> torch.nn.Module:
        """The model a strategy runs on: a fresh build per strategy (same seed), because
        a strategy may install modules on it (``videoxl`` adds its summary q/k/v
        projections), which must not count as another strategy's weights."""
        if self._shared_model is not None:
            return self._shared_model
        if strategy not in self._models:
            if not self._models:
                self._models[strategy] = self.model
            else:
                self._models[strategy] = build_model(
                    self._model_spec, dtype=self.dtype, simulate=self.simulate,
                    device=self.device, seed=self.seed)
        return self._models[strategy]

    # -- one run -------------------------------------------------------------
    def strategy(self, name: str) -> Any:
        from lvlm_fast.models.strategies import get_strategy

        return get_strategy(name, **{**_default_overrides(name),
                                     **self.strategy_overrides.get(name, {})})

    def run(self, strategy: str, frames: int, *, breakdown: int = 0) -> dict[str, Any]:
        """One row (cached per (frames, strategy) unless ``breakdown``)."""
        key = (frames, strategy)
        if key in self._cache and not breakdown:
            return self._cache[key]
        strat = self.strategy(strategy)
        model = self.model_for(strategy)
        weight_bytes = model_static_bytes(model)
        vlm = _make_wrapper(model, strat, self.vlm_kwargs)
        prompt = make_prompt(self.config, frames, dtype=self.dtype, device=self.device,
                             seed=self.seed, frame_hw=self.frame_hw)
        in_bytes = prompt_bytes(prompt)
        cuda = self.device.type == "cuda"
        gc.collect()
        tracker_cls = PeakBreakdownTracker if breakdown else SimulationTracker
        t0 = time.perf_counter()
        tr = tracker_cls(cache=self.op_cache)
        hits0 = self.chunk_replay.hits
        whits0 = self.window_replay.hits
        if self.simulate and self.replay_windows:
            vlm.run_llm = self.window_replay.wrap(vlm.run_llm, tr)
        undo = None
        if self.simulate and self.replay_chunks:
            vlm.family.encode = self.chunk_replay.wrap(vlm.family.encode, tr)
            undo = self.chunk_replay.wrap_modules(vision_blocks(model), tr)
        from lvlm_fast.profile.kernel_standins import simulation_kernels

        try:
            with torch.inference_mode(), simulation_kernels(
                    model, gdn=self.kernel_standins, flash=self.kernel_standins) as used, tr:
                self.kernel_models.update(used)
                logits, info = _run_first_token(vlm, prompt)
                if cuda:
                    torch.cuda.synchronize()
        finally:
            if undo is not None:  # the model outlives this run and its tracker
                undo()
        seconds = time.perf_counter() - t0
        pass_peak = tr.cuda_allocator_peak_bytes if cuda and tr.cuda_allocator_peak_bytes \
            is not None else tr.peak_bytes
        counted_inputs = in_bytes if self.inputs_on_device else 0
        row: dict[str, Any] = {
            "model": self.model_name,
            "strategy": strategy,
            "frames": frames,
            "frame_size": f"{self.frame_hw[0]}x{self.frame_hw[1]}",
            "dtype": dtype_name(self.dtype),
            "simulated": self.simulate,
            "device": str(self.device),
            "method": ("meta-live-tracker" if self.simulate else
                       "cuda-allocator" if cuda else "cpu-live-tracker"),
            "peak_bytes": int(weight_bytes + counted_inputs + pass_peak),
            "weight_bytes": int(weight_bytes),
            # Parameters the strategy installed on the model during the pass (counted in
            # pass_peak_bytes from their creation on; weights in later runs).
            "weights_added_bytes": int(model_static_bytes(model) - weight_bytes),
            "input_bytes": int(in_bytes),
            "inputs_counted": self.inputs_on_device,
            "pass_peak_bytes": int(pass_peak),
            "llm_tokens": getattr(info, "llm_tokens", None),
            "visual_tokens": getattr(info, "visual_tokens", None),
            "frames_encoded": getattr(info, "frames_encoded", None),
            "vision_chunk_frames": getattr(vlm, "vision_chunk_frames", None),
            "prefill_chunk_tokens": getattr(vlm, "prefill_chunk_tokens", None),
            "allocations": tr.num_allocations,
            "op_cache_hits": tr.hits,
            "op_cache_misses": tr.misses,
            "vision_chunks_replayed": self.chunk_replay.hits - hits0,
            "windows_replayed": self.window_replay.hits - whits0,
            "seconds": round(seconds, 3),
            # the cache's split: K/V (grows with tokens) vs recurrent states (constant)
            **dict(zip(("kv_bytes", "state_bytes"), cache_split(info), strict=True)),
        }
        if tuple(logits.shape[-1:]) != (self.config.text_config.vocab_size,):
            raise RuntimeError(f"first_token returned logits of shape {tuple(logits.shape)}")
        del logits, info, prompt, vlm, model
        if breakdown:
            row["breakdown"] = [dataclasses.asdict(i) for i in tr.top(breakdown)]
        else:
            self._cache[key] = row
        return row

    # -- sweeps and searches ----------------------------------------------------
    def sweep(self, strategies: Sequence[str], frames: Sequence[int], *,
              stop_above_bytes: int | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Rows for every strategy x frame count (ascending). A strategy whose peak passed
        ``stop_above_bytes`` is not run at larger frame counts (its rows are left out). A
        strategy that raises NotImplementedError (not supported on this model family) has
        no rows; :attr:`unsupported` maps it to the reason."""
        rows = []
        for name in strategies:
            for n in sorted(frames):
                try:
                    row = self.run(name, n)
                except NotImplementedError as exc:
                    # the strategy does not support this model family (e.g. a 1-D-RoPE
                    # only rule on an M-RoPE decoder): no rows, the reason kept
                    self.unsupported[name] = f"{type(exc).__name__}: {exc}"
                    break
                rows.append(row)
                if on_row:
                    on_row(row)
                if stop_above_bytes is not None and row["peak_bytes"] > stop_above_bytes:
                    break
        return rows

    def largest_fitting(self, strategy: str, budget_bytes: int, frames: Sequence[int], *,
                        lo: int = 1) -> tuple[int | None, bool]:
        """The largest frame count in ``[lo, max(frames)]`` whose peak is ``<= budget_bytes``
        (assumes the peak grows with frames). The sweep points bracket it; then secant
        steps (peaks are close to linear in frames between sweep points) with a bisection
        step whenever the bracket did not halve, down to adjacent frame counts, so the
        answer is exact: ``peak(n) <= budget < peak(n + 1)``.
        Returns ``(n, capped)``; ``capped`` is True if even ``max(frames)`` fits; ``n`` is
        None if ``lo`` frames do not fit."""
        def peak(n: int) -> int:
            return self.run(strategy, n)["peak_bytes"]

        pts = sorted({lo, *(f for f in frames if f >= lo)})
        fit = None
        for n in pts:
            if peak(n) <= budget_bytes:
                fit = n
            else:
                break
        else:
            return pts[-1], True
        if fit is None:
            return None, False
        bad = pts[pts.index(fit) + 1]
        secant = True
        while bad - fit > 1:
            width = bad - fit
            pf, pb = peak(fit), peak(bad)
            if secant and pb > pf:
                guess = fit + int((budget_bytes - pf) * width // (pb - pf))
            else:
                guess = (fit + bad) // 2
            guess = min(max(guess, fit + 1), bad - 1)
            if peak(guess) <= budget_bytes:
                fit = guess
                if guess + 1 < bad and peak(guess + 1) > budget_bytes:
                    bad = guess + 1
            else:
                bad = guess
                if guess - 1 > fit and peak(guess - 1) <= budget_bytes:
                    fit = guess - 1
            secant = (bad - fit) * 2 <= width
        return fit, False


def profile_pipeline(model: Any, strategy: str, frames: int, *,
                     dtype: str | torch.dtype = torch.bfloat16, simulate: bool = True,
                     device: str | torch.device | None = None,
                     vlm_kwargs: dict[str, Any] | None = None,
                     strategy_overrides: dict[str, Any] | None = None,
                     inputs_on_device: bool = False, breakdown: int = 0,
                     seed: int = 0) -> dict[str, Any]:
    """Peak memory of one pass (video in, first answer token out) as a row dict:
    ``frames, strategy, peak_bytes, llm_tokens, simulated, weight_bytes, input_bytes,
    pass_peak_bytes, ...`` (see the module docstring for what is counted).

    ``model``: a shipped config name (``lvlm_fast.models.MODEL_CONFIGS``), a config of a
    supported family or a model instance (a meta model is simulated).
    ``breakdown=n`` adds the n largest storages alive at the pass peak.
    """
    prof = Profiler(model, dtype=dtype, simulate=simulate, device=device, vlm_kwargs=vlm_kwargs,
                    strategy_overrides={strategy: dict(strategy_overrides or {})},
                    inputs_on_device=inputs_on_device, seed=seed)
    return prof.run(strategy, frames, breakdown=breakdown)
