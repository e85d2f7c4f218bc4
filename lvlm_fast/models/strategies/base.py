"""The strategy contract: how a long video becomes LLM input.

A strategy is one small module in this package: a ``@dataclass`` of knobs (subclass of
:class:`StrategyConfig`) and a :class:`Strategy` subclass registered by name with
:func:`register`. The wrapper (:class:`lvlm_fast.models.LongVideoVLM`) owns the model, the
chunked vision encoder and the chunked LLM prefill; a strategy decides which frames are
encoded, how their features are reduced, and how they reach the LLM.

Most strategies only turn frames into visual token embeddings and let the wrapper prefill
``[prefix ; visual ; question]`` (:class:`EmbeddingStrategy`). A strategy that must drive
the LLM itself (``videoxl``: windows + KV eviction) overrides :meth:`Strategy.prefill`.

Everything here must also run on meta tensors (the profiler simulates 7B models that way):
no ``.item()``/``.tolist()`` on device values, no Python branching on tensor contents,
only ops with fake implementations.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class StrategyConfig:
    """Base of every strategy's knobs (a dataclass; defaults are the published ones)."""


@dataclass
class VideoPrompt:
    """One request: preprocessed frames and the prompt split around the video.

    ``pixel_values``: (T, 3, H, W) frames already normalised for the vision tower. They
    may stay on the host (pinned CPU memory is best): the wrapper moves each vision chunk
    to the model's device and dtype as it encodes it, so device memory never holds every
    frame (10,240 frames at 384 px are 9 GB in bf16). ``prefix_ids``: (1, P) tokens before the
    video; ``question_ids``: (1, Q) tokens after it (question + assistant header).
    ``fps``: the rate the frames were sampled at (None = unknown); families whose positions
    depend on time use it (Qwen2.5-VL: temporal M-RoPE step), others ignore it.
    ``text_ids``: the tokenizer as a callable text -> ids (no special tokens), for families
    that put text inside the video (Qwen3-VL's per-frame timestamps); others ignore it.
    ``frame_times``: each frame's time in seconds in the source video (the processor's
    ``frames_indices / video fps``); None = frame ``i`` at ``i / fps``. Qwen3-VL's
    timestamps use it (exact for non-uniform sampling strides). ``audio_embeds``: per-clip
    audio embeddings for a family with an audio branch (Video-LLaMA's AL branch: (1, clips,
    1024) ImageBind clip embeddings; others ignore it).
    """

    pixel_values: torch.Tensor
    prefix_ids: torch.Tensor
    question_ids: torch.Tensor
    fps: float | None = None
    text_ids: Callable[[str], list[int]] | None = None
    frame_times: list[float] | None = None
    audio_embeds: torch.Tensor | None = None  # (1, clips, E) audio clip embeddings (Video-LLaMA)


@dataclass
class PrefillResult:
    """What every strategy returns: enough to take the first answer token and go on."""

    last_hidden: torch.Tensor  # (1, 1, hidden): decoder output at the last prompt position
    cache: Any  # a transformers Cache holding the prompt, ready for decoding
    llm_tokens: int  # tokens the LLM read (prefix + visual + question, incl. summaries)
    visual_tokens: int  # of which visual
    frames_encoded: int  # frames that went through the vision tower
    # Caveats about this result a run report must show (also raised as StrategyWarning)
    warnings: list[str] = field(default_factory=list)
    # position ids of generated tokens (a families.PositionPlan), None = the decoder's
    # default 1-D positions (cache length)
    positions: Any = None


class StrategyWarning(UserWarning):
    """A result that is faithful to the method but probably not what the user wants (e.g.
    ``videoxl`` on a stream too short for one summary token); also listed in
    :attr:`PrefillResult.warnings` for reports."""


class VisualEmbeds(tuple):
    """What :meth:`EmbeddingStrategy.visual_embeds` returns: unpacks as the pair
    ``(visual (1, N, hidden), frames encoded)``, plus ``blocks``: a
    :class:`lvlm_fast.models.families.TokenBlocks` saying where each visual token sits (its
    temporal unit and place in a grid), built only when the family's positions need it
    (``vlm.family.needs_blocks()``), else None. (A tuple subclass so existing
    ``visual, frames = strategy.visual_embeds(...)`` callers keep working.)"""

    blocks: Any

    def __new__(cls, visual: torch.Tensor, frames: int, blocks: Any = None) -> VisualEmbeds:
        self = super().__new__(cls, (visual, frames))
        self.blocks = blocks
        return self


class VisualStream:
    """Visual rows made on demand, in order: what a strategy whose rows need no global pass
    (``full``, ``uniform``) hands the prefill when its rows are wide (DeepStack levels), so
    the wrapper encodes one vision chunk when the prefill reaches it and no tensor ever
    holds every frame's rows. ``chunks`` yields ``(1, k, width)`` row blocks whose
    lengths sum to ``num_rows``; :meth:`take` must be called with consecutive ranges
    (the prefill reads the visual segment front to back, once)."""

    def __init__(self, num_rows: int, width: int, chunks: Any) -> None:
        self.shape = (1, num_rows, width)
        self._chunks = iter(chunks)
        self._cur: torch.Tensor | None = None
        self._off = 0  # rows of _cur already taken
        self._next = 0  # next row index expected

    def dim(self) -> int:
        return 3

    def take(self, lo: int, hi: int) -> torch.Tensor:
        if lo != self._next or not 0 <= lo <= hi <= self.shape[1]:
            raise ValueError(f"VisualStream rows are read once, in order: asked for "
                             f"[{lo}, {hi}) after {self._next} of {self.shape[1]}")
        parts = []
        while lo < hi:
            if self._cur is None or self._off == self._cur.shape[1]:
                self._cur, self._off = next(self._chunks), 0
            k = min(hi - lo, self._cur.shape[1] - self._off)
            parts.append(self._cur[:, self._off : self._off + k])
            self._off, lo = self._off + k, lo + k
        self._next = hi
        if self._cur is not None and self._off == self._cur.shape[1]:
            self._cur = None  # the chunk is done: let it go
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Strategy(abc.ABC):
    """Base class. Subclasses set ``name``, ``config_class``, ``holds_all_patch_features``
    (True if it keeps every frame's patch features alive at once; documented per strategy)
    and implement :meth:`prefill` (or :meth:`EmbeddingStrategy.visual_embeds`)."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    holds_all_patch_features: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            raise TypeError("pass either a config object or keyword overrides, not both")
        if not isinstance(config, self.config_class):
            raise TypeError(f"strategy {self.name!r} takes a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config

    @abc.abstractmethod
    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        """Run the video and prompt through the LLM; the cache is left ready to decode."""


class EmbeddingStrategy(Strategy):
    """A strategy that only produces visual token embeddings; the wrapper prefills."""

    @abc.abstractmethod
    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        """(visual embeddings (1, N, hidden) in time order, frames encoded)."""

    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        out = self.visual_embeds(vlm, prompt)
        visual, frames = out
        budget = getattr(self.config, "kv_budget", None)
        if budget is not None:  # reduction + hard KV cap (issue 12): one generic path
            from lvlm_fast.models.strategies.stream import composed_prefill

            return composed_prefill(vlm, prompt, visual, frames, budget, self.name,
                                    blocks=getattr(out, "blocks", None))
        return vlm.prefill_embeds(prompt.prefix_ids, visual, prompt.question_ids,
                                  frames_encoded=frames, blocks=getattr(out, "blocks", None),
                                  text_ids=prompt.text_ids)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str | Strategy, config: StrategyConfig | None = None,
                 **overrides: Any) -> Strategy:
    """A strategy instance from its registered name (ValueError lists the names)."""
    if isinstance(name, Strategy):
        return name
    from lvlm_fast.models import strategies  # noqa: F401  (imports register every strategy)

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](config, **overrides)
