"""The model-family interface: everything the wrapper and the strategies need to know about
one transformers VLM class, behind one small object.

A family (one file in this package, registered with :func:`register_family`) answers four
questions for a wrapped model:

(a) **Vision.** How a chunk of frames becomes LLM-space features on the family's grid:
    :meth:`ModelFamily.encode` maps ``(f, 3, H, W)`` frames to ``(t, h, w, D)`` where ``t``
    counts the family's *temporal units* (:attr:`ModelFamily.frames_per_unit` frames each:
    1 for LLaVA-OneVision, ``temporal_patch_size`` = 2 for Qwen2.5-VL, whose 3-D patch
    embedding merges two frames into one temporal patch). :meth:`ModelFamily.pool` is the
    family's own reduction of that grid into the tokens it feeds a video with (LLaVA-OV's
    2x2 bilinear pooling; identity for Qwen2.5-VL, whose merger already merged 2x2).
    Strategies work in units: "frame" in a strategy's docstring means one temporal unit.
(b) **Token layout.** :meth:`ModelFamily.end_tokens` are the rows appended after the video
    (LLaVA-OV: one ``image_newline``; Qwen2.5-VL: none) and :meth:`ModelFamily.separator`
    the vector some strategies put between frames (None where the family has none). The
    text around the video is the caller's: ``prefix_ids`` / ``question_ids`` are the prompt
    split around the video placeholder, so Qwen's ``<|vision_start|>`` ends the prefix and
    ``<|vision_end|>`` starts the question, exactly as its chat template renders them.
(c) **Positions.** :meth:`ModelFamily.position_plan` returns None for a 1-D RoPE family
    (the decoder's default positions = cache length + arange are right), or a
    :class:`PositionPlan` whose :meth:`PositionPlan.chunk` gives the ``(3, 1, L)`` M-RoPE ids
    of any slice of ``[prefix ; visual ; question]`` and :meth:`PositionPlan.decode` those of
    a generated token, computed from a compact description of the visual tokens
    (:class:`TokenBlocks`), never from the whole sequence's ids at once.
(d) **Preprocessing.** :meth:`ModelFamily.frame_size` (the resize rule of the family's
    video processor), :meth:`ModelFamily.normalization` (mean/std from a checkpoint folder)
    and :meth:`ModelFamily.split_prompt` (the chat template rendered around a video
    placeholder, split into prefix and question ids); :meth:`ModelFamily.sample_indices`
    (which frames ``frames=N`` / ``fps=F`` read: the package's rule by default, the video
    processor's own where a family's differs, e.g. Qwen2.5-VL's and Qwen3-VL's).

Adding a family = one new module here that subclasses :class:`ModelFamily` and calls
:func:`register_family`, plus its shipped configs in :mod:`lvlm_fast.models.configs`.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# OpenAI CLIP image normalisation: the default of CLIP-tower processors (LLaVA-OneVision
# checkpoints without a preprocessor file, Qwen2.5-VL, BLIP-2/Video-LLaMA, ViLAMP's selector).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A ``decoder_kwargs`` entry the wrapper keeps alive for one decoder call but never passes to
# the model: on the meta device a family that cannot hand its extra inputs to the decoder
# (transformers adds DeepStack rows by boolean indexing, which has no meta kernel) still
# holds them for the call, so the simulated peak counts them as a real device does.
HOLD_KWARG = "_lvlm_hold"

VIDEO_SENTINEL = "<lvlm_fast_video>"
_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json",
                       "processor_config.json")


# --------------------------------------------------------------------------- token blocks
@dataclass
class TokenBlocks:
    """A family-agnostic description of a strategy's visual tokens, for positions.

    The visual tokens are a sequence of blocks, in order; block ``i`` is an ``h[i] x w[i]``
    grid of tokens, flattened row-major, that belongs to temporal unit ``t[i]`` of the
    video (the family's unit: one frame on LLaVA-OV, one temporal patch on Qwen2.5-VL).
    A single token (a DFM token, a LLaMA-VID context token) is a 1 x 1 block; a pooled grid
    (SlowFast's slow 14 x 7) is a block of the pooled size. ``t``, ``h``, ``w``: (B,) int64
    on one device (``t`` may come from device-side selections, e.g. ViLAMP's keyframes).
    The tokens a block covers: ``h[i] * w[i]``; the whole description covers
    ``sum(h * w)`` tokens, which must equal the visual segment's length. ``frame_hw``: the
    video's frame size in pixels and ``fps``: its sampling rate (None = unknown), which
    some families' positions depend on. ``num_frames``: frames in the sequence the units
    number (None = unknown: every unit taken as full); Qwen3-VL's timestamp of a padded
    last unit depends on it. ``host``: the same ``(t, h, w)`` as host int lists when the
    strategy built them from host values (None when they come from device selections):
    a family that needs the values (Qwen3-VL's timestamp text) reads them here without a
    device sync, and on meta tensors at all. ``times``: the seconds of each frame of the
    sequence (:attr:`VideoPrompt.frame_times`, selected like the frames), None = frame
    ``i`` at ``i / fps``. ``frames``: (B,) int64, which frame of the prompt each block sits
    in, for families that frame units with text (equal consecutive ids = one frame, with
    the timestamp of its first block's unit); None = every maximal run of blocks of one
    unit is a frame. Kept by :meth:`to`, dropped by :meth:`cat` / :meth:`per_unit`.
    """

    t: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    frame_hw: tuple[int, int] | None = None
    fps: float | None = None
    num_frames: int | None = None
    host: tuple[list[int], list[int], list[int]] | None = None
    times: list[float] | None = None  # seconds of each frame of the sequence (None: i / fps)
    frames: torch.Tensor | None = None  # (B,) prompt frame of each block (None: unit runs)

    @classmethod
    def grid(cls, units: torch.Tensor | int, h: int, w: int, *,
             device: torch.device | str | None = None, frame_hw: tuple[int, int] | None = None,
             fps: float | None = None, num_frames: int | None = None,
             times: list[float] | None = None) -> TokenBlocks:
        """One ``h x w`` block per unit of ``units`` (an int n = units 0..n-1)."""
        host = None
        if isinstance(units, int):
            host = (list(range(units)), [h] * units, [w] * units)
            units = torch.arange(units, dtype=torch.int64, device=device)
        n = units.shape[0]
        full = lambda v: torch.full((n,), v, dtype=torch.int64, device=units.device)
        return cls(units.to(torch.int64), full(h), full(w), frame_hw, fps, num_frames, host,
                   times)

    @classmethod
    def from_host(cls, t: list[int], h: list[int], w: list[int], *,
                  device: torch.device | str | None = None,
                  frame_hw: tuple[int, int] | None = None, fps: float | None = None,
                  num_frames: int | None = None, times: list[float] | None = None
                  ) -> TokenBlocks:
        """Blocks from host int lists (kept as :attr:`host` too)."""
        tab = torch.tensor([t, h, w], dtype=torch.int64, device=device).view(3, -1)
        return cls(tab[0], tab[1], tab[2], frame_hw, fps, num_frames,
                   (list(t), list(h), list(w)), times)

    @classmethod
    def per_unit(cls, parts: list[TokenBlocks]) -> TokenBlocks:
        """Interleave equally long block lists: ``p0[0], p1[0], ..., p0[1], p1[1], ...``."""
        def mix(attr: str) -> torch.Tensor:
            return torch.stack([getattr(p, attr) for p in parts], dim=1).reshape(-1)
        host = None
        if all(p.host is not None for p in parts):
            host = tuple([v for row in zip(*(p.host[i] for p in parts), strict=True)
                          for v in row] for i in range(3))
        return cls(mix("t"), mix("h"), mix("w"), parts[0].frame_hw, parts[0].fps,
                   parts[0].num_frames, host, parts[0].times)

    @classmethod
    def cat(cls, parts: list[TokenBlocks]) -> TokenBlocks:
        host = None
        if all(p.host is not None for p in parts):
            host = tuple([v for p in parts for v in p.host[i]] for i in range(3))
        return cls(torch.cat([p.t for p in parts]), torch.cat([p.h for p in parts]),
                   torch.cat([p.w for p in parts]), parts[0].frame_hw, parts[0].fps,
                   parts[0].num_frames, host, parts[0].times)

    def to(self, device: torch.device | str) -> TokenBlocks:
        return TokenBlocks(self.t.to(device), self.h.to(device), self.w.to(device),
                           self.frame_hw, self.fps, self.num_frames, self.host, self.times,
                           None if self.frames is None else self.frames.to(device))

    @property
    def num_blocks(self) -> int:
        return self.t.shape[0]

    def sizes(self) -> torch.Tensor:
        return self.h * self.w

    def coords(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit, row, col) of visual tokens ``lo .. hi-1`` (int64 (hi-lo,) each), found by
        a binary search over the blocks' end offsets: O(B + L log B), no per-token table
        of the whole video."""
        ends = torch.cumsum(self.sizes(), 0)
        idx = torch.arange(lo, hi, dtype=torch.int64, device=ends.device)
        b = torch.searchsorted(ends, idx, right=True)
        start = ends[b] - self.sizes()[b]
        local = idx - start
        w = self.w[b]
        return self.t[b], local // w, local % w


@dataclass
class VisualLayout:
    """Where the visual tokens sit in the LLM sequence when a family puts text between
    them (Qwen3-VL: ``<t seconds><|vision_start|> ... <|vision_end|>`` per frame).

    ``pieces``: in order, each an int64 ``(k,)`` CPU tensor of text ids (the wrapper embeds
    them) or a ``(lo, hi)`` range of rows of the strategy's visual tensor. ``items``: the
    same sequence as ``(tokens, h, w)`` runs for positions (``h = 0``: text; else one
    ``h x w`` visual block). ``length``: tokens the region takes in the LLM."""

    pieces: list[Any]
    items: list[tuple[int, int, int]]
    length: int


class PositionPlan(abc.ABC):
    """Position ids of one prompt ``[prefix (P) ; visual (N) ; question (Q)]`` for a family
    whose decoder takes explicit position ids."""

    total: int

    @abc.abstractmethod
    def chunk(self, lo: int, hi: int) -> torch.Tensor:
        """Position ids of prompt tokens ``lo .. hi-1`` in the decoder's layout."""

    @abc.abstractmethod
    def decode(self, step: int) -> torch.Tensor:
        """Position ids of the ``step``-th generated token fed back (step 0 = the first
        token after the prompt)."""

    # the ``stream`` strategy's bounded rule (``lvlm_fast.models.strategies.stream``)
    def stream_chunk(self, lo: int, hi: int, slot: int) -> torch.Tensor:
        """Position ids of prompt tokens ``lo .. hi-1`` (prefix or visual) appended to a
        budgeted KV cache at slots ``slot .. slot + hi - lo - 1``: the temporal id is the
        slot (what ``kv_compact``'s temporal re-rotation keeps true), the other axes are
        :meth:`chunk`'s. NotImplementedError where the family has no such rule."""
        raise NotImplementedError(
            f"{type(self).__name__} has no bounded stream position rule (a budgeted KV cache "
            "needs one; see lvlm_fast.models.strategies.stream)")

    def stream_tail(self, length: int) -> PositionPlan:
        """The question and answer after a budgeted cache holding ``length`` rows: a plan
        whose :meth:`chunk` (0 .. question) and :meth:`decode` continue from the bounded
        maximum (see :meth:`stream_chunk`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no bounded stream position rule")


class TextRunPlan(PositionPlan):
    """``question`` text tokens at ``start + i`` on all three M-RoPE axes, then generated
    tokens at ``start + question + step`` (a :meth:`PositionPlan.stream_tail`)."""

    def __init__(self, start: int, question: int, device: torch.device) -> None:
        self.start, self.total, self.device = start, question, device

    def chunk(self, lo: int, hi: int) -> torch.Tensor:
        idx = torch.arange(self.start + lo, self.start + hi, device=self.device)
        return idx.view(1, 1, -1).expand(3, 1, -1)

    def decode(self, step: int) -> torch.Tensor:
        return torch.full((3, 1, 1), self.start + self.total + step, dtype=torch.int64,
                          device=self.device)


# --------------------------------------------------------------------------- family
class ModelFamily(abc.ABC):
    """One transformers VLM class seen by the wrapper (see module doc). Instances wrap one
    model; class attributes describe the family."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type of its checkpoints
    class_names: ClassVar[tuple[str, ...]]  # transformers class names it wraps
    frames_per_unit: ClassVar[int] = 1

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------ classes
    @classmethod
    @abc.abstractmethod
    def model_class(cls) -> type:
        """The transformers model class (imported lazily)."""

    @classmethod
    def handles(cls, model: object) -> bool:
        return isinstance(model, cls.model_class())

    @classmethod
    def build(cls, config: Any) -> torch.nn.Module:
        """A model with random weights from ``config`` (under the caller's device context)."""
        return cls.model_class()(config)

    # ------------------------------------------------------------------ LLM pieces
    @property
    def text_config(self) -> Any:
        return self.config.text_config

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    # ------------------------------------------------------------------ DeepStack
    def deepstack_levels(self) -> int:
        """Extra vision feature levels the decoder adds at the visual positions (Qwen3-VL's
        DeepStack: one per early decoder layer); 0 for most families."""
        return 0

    def feature_size(self) -> int:
        """Channels of :meth:`encode`'s rows and of a strategy's visual tensor:
        ``(1 + deepstack_levels()) * hidden_size`` (main features first; strategies score
        and compare on the first ``hidden_size`` channels and reduce all channels alike)."""
        return (1 + self.deepstack_levels()) * self.hidden_size

    def decoder_kwargs(self, visual_mask: torch.Tensor, extra: torch.Tensor
                       ) -> dict[str, Any]:
        """Extra decoder keyword arguments for one prefill chunk: ``visual_mask`` (1, L)
        bool marks the chunk's visual tokens, ``extra`` (n_visual, feature_size -
        hidden_size) their channels past the main ones. None of that for most families."""
        return {}

    # ------------------------------------------------------------------ (a) vision
    def units(self, num_frames: int) -> int:
        """Temporal units of a ``num_frames``-frame video (the last unit is padded by
        repeating the last frame when the count does not divide, as the processors do)."""
        return -(-num_frames // self.frames_per_unit)

    @abc.abstractmethod
    def check_pixels(self, pixel_values: Any) -> None:
        """ValueError naming ``pixel_values`` if the frames do not fit the vision tower."""

    @abc.abstractmethod
    def feature_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of :meth:`encode`'s grid for frames of ``frame_hw`` pixels."""

    @abc.abstractmethod
    def token_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of :meth:`pool`'s grid: the tokens one unit feeds the LLM with."""

    @abc.abstractmethod
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, 3, H, W) frames (f a multiple of ``frames_per_unit`` except for the video's
        last chunk) -> (units, h, w, D) LLM-space features, model dtype, model device."""

    @abc.abstractmethod
    def encode_all_at_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) -> (units, h, w, D): every frame through transformers' own vision
        path in ONE call, the way released code does it (seed baselines measure its
        memory); equals :meth:`encode` on the whole video."""

    @abc.abstractmethod
    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """(t, h, w, D) -> the family's own per-unit token grid (t, h', w', D)."""

    @abc.abstractmethod
    def vision_bytes_per_frame(self) -> int:
        """Estimated working bytes to encode one frame (sizes the vision chunk)."""

    def run_strategy(self, strategy: Any, vlm: Any, prompt: Any) -> Any:
        """Run ``strategy``'s prefill for this family (the wrapper calls this). Default:
        ``strategy.prefill(vlm, prompt)``. A family whose LLM does not read per-frame tokens
        (Video-LLaMA: a Video Q-Former over all frames) builds its tokens here for the
        strategies that apply to it and raises NotImplementedError for the rest."""
        return strategy.prefill(vlm, prompt)

    # ------------------------------------------------------------------ (b) layout
    @abc.abstractmethod
    def end_tokens(self) -> torch.Tensor:
        """(n_end, D) rows appended after the video (n_end may be 0)."""

    def num_end_tokens(self) -> int:
        return self.end_tokens().shape[0]

    def separator(self) -> torch.Tensor | None:
        """(D,) vector some strategies insert between frames/streams, or None."""
        return None

    # ------------------------------------------------------------------ (c) positions
    def needs_blocks(self) -> bool:
        """True if :meth:`position_plan` reads the visual tokens' :class:`TokenBlocks`."""
        return False

    def position_plan(self, prefix: int, blocks: TokenBlocks | None, num_visual: int,
                      question: int) -> PositionPlan | None:
        """None: the decoder's default 1-D positions (cache length + arange) are right.
        (A family with a :meth:`visual_layout` takes it as the keyword ``layout``.)"""
        return None

    def visual_layout(self, blocks: TokenBlocks | None, num_visual: int, *,
                      text_ids: Any = None) -> VisualLayout | None:
        """None: the visual tokens go to the LLM as one run. Else the text the family puts
        around temporal units (timestamps), from the strategy's :class:`TokenBlocks` (each
        maximal run of blocks of one unit is framed as one frame) and ``text_ids`` (the
        caller's tokenizer: text -> ids)."""
        return None

    # ------------------------------------------------------------------ (d) preprocessing
    @abc.abstractmethod
    def frame_size(self, height: int, width: int, preprocessing: dict[str, Any]
                   ) -> tuple[int, int]:
        """(H, W) the family's video processor resizes an ``height x width`` video to."""

    @abc.abstractmethod
    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) when the checkpoint folder has no preprocessing config."""

    def preprocessing(self, path: str | os.PathLike) -> dict[str, Any]:
        """The checkpoint's video preprocessing config (first of
        ``video_preprocessor_config.json``, ``preprocessor_config.json``,
        ``processor_config.json``), with ``image_mean``/``image_std``/``rescale_factor``
        always present (family defaults where missing)."""
        cfg = read_preprocessing(path)
        mean, std = self.default_normalization()
        cfg.setdefault("image_mean", list(mean))
        cfg.setdefault("image_std", list(std))
        cfg.setdefault("rescale_factor", 1 / 255)
        return cfg

    @abc.abstractmethod
    def video_text(self) -> str:
        """The user-turn text standing for the video in the chat template."""

    def split_prompt(self, tokenizer: Any, question: str) -> tuple[list[int], list[int]]:
        """Render the chat template (generation prompt added) with the video replaced by a
        sentinel and split the ids there: ``(prefix_ids, question_ids)``."""
        text = self.video_text().replace("{video}", VIDEO_SENTINEL) + question
        messages = [{"role": "user", "content": text}]
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True)
        else:
            rendered = self.fallback_template(text)
        if VIDEO_SENTINEL not in rendered:
            raise ValueError("the chat template dropped the video placeholder")
        pre, post = rendered.split(VIDEO_SENTINEL, 1)
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        return enc(pre), enc(post)

    def fallback_template(self, user_text: str) -> str:
        """ChatML (every shipped family's LLM is a Qwen2)."""
        return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"

    # ------------------------------------------------------------------ frame sampling
    @classmethod
    def sample_indices(cls, total_frames: int, video_fps: float | None,
                       frames: int | None = None, fps: float | None = None,
                       pre: dict[str, Any] | None = None) -> tuple[list[int], float | None]:
        """Frame numbers to read from a ``total_frames``-frame video recorded at
        ``video_fps`` (None or 0 = unknown), and the rate they are taken at (the
        :attr:`VideoPrompt.fps` of the prompt; None = unknown), for ``frames=N`` or
        ``fps=F`` (exclusive; neither = the package default). ``pre``: the checkpoint's
        preprocessing config (:meth:`preprocessing`), for families whose video processor
        reads its sampling bounds there.

        This default is the package's rule (:func:`lvlm_fast.video.sample_indices`):
        ``frames``: N frames at ``round(linspace(0, total - 1, N))`` (ValueError if the
        video has fewer), rate ``N / duration``; ``fps``: one frame every ``1 / F`` s from
        t = 0, rate F; neither: :data:`DEFAULT_FRAMES` uniform frames, or every frame of a
        shorter video. Families whose processor samples otherwise override it."""
        from lvlm_fast import video as lv

        total = _check_sampling_args(total_frames, video_fps, frames, fps)
        if fps is not None:
            return (lv.sample_indices(total, "fps", fps=float(fps), source_fps=video_fps),
                    float(fps))
        indices = lv.sample_indices(total, "uniform", count=frames or DEFAULT_FRAMES,
                                    on_short="error" if frames else "all")
        return indices, sampled_fps(indices, total, video_fps)


DEFAULT_FRAMES = 32  # frames read when neither frames nor fps is given


def sampled_fps(indices: list[int], total_frames: int, video_fps: float | None
                ) -> float | None:
    """The rate ``indices`` of a ``total_frames``-frame video at ``video_fps`` are
    taken at: ``len(indices) / duration`` (transformers' ``VideoMetadata.sampled_fps``);
    None when the video's rate is unknown."""
    if not video_fps or video_fps <= 0:
        return None
    return len(indices) / total_frames * float(video_fps)


def read_preprocessing(path: str | os.PathLike) -> dict[str, Any]:
    """The raw video preprocessing config of a checkpoint folder: the first of
    ``video_preprocessor_config.json``, ``preprocessor_config.json``,
    ``processor_config.json`` (its ``video_processor`` part), {} if none."""
    cfg: dict[str, Any] = {}
    for name in _PREPROCESSOR_FILES:
        f = os.path.join(os.fspath(path), name)
        if os.path.isfile(f):
            with open(f) as fh:
                cfg = json.load(fh)
            cfg = cfg.get("video_processor", cfg) if isinstance(cfg, dict) else {}
            break
    return cfg


def _check_sampling_args(total_frames: Any, video_fps: Any, frames: Any, fps: Any) -> int:
    """ValueError naming the bad argument; returns ``total_frames``."""
    from lvlm_fast.models.pipeline import check_sampling

    if isinstance(total_frames, bool) or not isinstance(total_frames, int) or total_frames < 1:
        raise ValueError(f"total_frames must be an int >= 1, got {total_frames!r}")
    if video_fps is not None and (isinstance(video_fps, bool)
                                  or not isinstance(video_fps, (int, float))):
        raise ValueError(f"video_fps must be a number or None, got {video_fps!r}")
    check_sampling(frames, fps)
    return total_frames


# --------------------------------------------------------------------------- registry
FAMILIES: dict[str, type[ModelFamily]] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``cls`` a supported family."""
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise ValueError(f"model family {cls.name!r} is already registered")
    FAMILIES[cls.name] = cls
    return cls


def _load_all() -> None:
    from lvlm_fast.models import families  # noqa: F401  (imports register every family)


def supported_class_names() -> tuple[str, ...]:
    _load_all()
    return tuple(n for f in FAMILIES.values() for n in f.class_names)


def family_for(model: object) -> ModelFamily:
    """The family instance wrapping ``model``; TypeError listing the supported classes."""
    _load_all()
    for fam in FAMILIES.values():
        if fam.handles(model):
            return fam(model)
    raise TypeError(f"unsupported model class {type(model).__name__}; supported: "
                    f"{', '.join(supported_class_names())}")


def family_for_model_type(model_type: str | None, what: str = "model") -> type[ModelFamily]:
    """The family of a checkpoint's ``config.model_type`` (TypeError listing the classes)."""
    _load_all()
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise TypeError(f"{what} holds a {model_type} model; supported: "
                    f"{', '.join(supported_class_names())}")


def family_for_config(config: Any) -> type[ModelFamily]:
    return family_for_model_type(getattr(config, "model_type", None),
                                 f"config {type(config).__name__}")
