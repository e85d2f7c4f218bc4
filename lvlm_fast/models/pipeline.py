"""Checkpoint folder + video + question -> answer: the one pipeline behind ``lvlm-fast
batch`` and the lmms-eval plugin (:mod:`lvlm_fast.integrations.lmms_eval`).

:class:`VideoQA` holds one loaded model (a :class:`~lvlm_fast.models.LongVideoVLM`) with its
tokenizer, the family's preprocessing config and its EOS id. Per video:

1. :meth:`VideoQA.read` probes the file, picks frame numbers by the family's rule
   (:meth:`ModelFamily.sample_indices`: its video processor's sampling for ``frames=N`` /
   ``fps=F``, e.g. Qwen2.5-VL rounds N to a multiple of 2 and clamps fps to its
   min/max frames; the package's rule by default: N uniformly spaced frames, one every
   1/F s; neither: 32 uniform frames, or every frame of a shorter video), decodes them
   in chunks with :func:`lvlm_fast.video.iter_frames` and preprocesses each chunk
   straight into one host buffer at the family's frame size (:meth:`ModelFamily.frame_size`), with
   :func:`lvlm_fast.models.command.preprocess` (the same resize/normalise as ``lvlm-fast
   run``). A video is decoded once and can answer many questions.
2. :meth:`VideoQA.answer` splits the family's chat template around the video
   (:meth:`ModelFamily.split_prompt`), runs the strategy and greedy decoding, and returns
   the answer with a report (frames, LLM tokens, peak memory, seconds per stage).
3. :meth:`VideoQA.score` gives the log-probability of a continuation after the prompt
   (multiple-choice tasks) with :func:`score_continuation`: the strategy's prefill, then
   the continuation tokens through the same KV cache in one decoder call.

Peak memory is measured as ``lvlm-fast run`` does: the CUDA allocator's peak above the level
before the request; on CPU the live-tensor tracker (:class:`lvlm_fast.profile.LiveTensorTracker`).

Errors are ``ValueError`` (bad or unreadable video, too many frames, a budget too small,
a placeholder token in the text), ``FileNotFoundError`` (checkpoint or video missing) or
``TypeError`` (unsupported model class, bad knob), each naming what was wrong.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lvlm_fast.models.families.base import DEFAULT_FRAMES  # noqa: F401  (re-exported)


@dataclass
class Frames:
    """One decoded, preprocessed video: ``pixels`` (T, 3, H, W) on the host."""

    path: str
    pixels: torch.Tensor
    indices: list[int]
    video_frames: int  # frames in the file
    source_fps: float
    sample_fps: float | None  # the rate the frames were taken at (positions of M-RoPE)
    seconds: dict[str, float] = field(default_factory=dict)  # probe, decode video, preprocess
    buffer: Any = None  # the lvlm_fast.video.HostFrameBuffer holding ``pixels``


def check_sampling(frames: int | None, fps: float | None) -> None:
    """``frames`` (int >= 1) and ``fps`` (> 0) are exclusive; None = the default rule."""
    if frames is not None and fps is not None:
        raise ValueError(f"frames and fps are exclusive, got frames={frames!r}, fps={fps!r}")
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool)
                               or frames < 1):
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not fps > 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")


def sample_frames(info: Any, frames: int | None = None, fps: float | None = None,
                  family: Any = None, preprocessing: dict[str, Any] | None = None
                  ) -> tuple[list[int], float | None]:
    """Frame numbers to read from a probed video (:class:`lvlm_fast.video.VideoInfo`) and the
    rate they are taken at, by ``family``'s rule (a :class:`ModelFamily` class or instance:
    :meth:`ModelFamily.sample_indices`, its video processor's sampling, reading its bounds
    from the checkpoint's ``preprocessing`` config). ``family`` None: the package's rule
    (``frames`` uniform, ValueError if the video has fewer; ``fps`` one every 1/F s;
    neither: :data:`DEFAULT_FRAMES` uniform or every frame of a shorter video)."""
    from lvlm_fast.models.families.base import ModelFamily

    check_sampling(frames, fps)
    rule = family if family is not None else ModelFamily
    return rule.sample_indices(info.num_frames, info.fps, frames=frames, fps=fps,
                               pre=preprocessing)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """'auto' (or None): fp32 on CPU, the checkpoint's dtype elsewhere; else a torch dtype
    name ('bfloat16', 'float16', 'float32')."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


@torch.no_grad()
def score_continuation(vlm: Any, prompt: Any, continuation_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``continuation_ids`` (1, L) after ``prompt`` (a VideoPrompt).

    The strategy's prefill (chunked, into a cache with ``L - 1`` rows reserved), then the
    first ``L - 1`` continuation tokens through the decoder in one call on that cache (at
    the positions generation would give them), the LM head on the last prompt position and
    on those tokens. Returns (per-token log-probs (L,) fp32, whether greedy decoding would
    produce exactly this continuation)."""
    from lvlm_fast.models.wrapper import check_token_ids

    check_token_ids("continuation_ids", continuation_ids, vlm.vocab_size,
                    vlm.placeholder_token_ids())
    n = continuation_ids.shape[1]
    vlm.timings = {}
    old = vlm.decode_reserve
    vlm.decode_reserve = n - 1
    try:
        res = vlm.prefill(prompt)
    finally:
        vlm.decode_reserve = old
    cont = continuation_ids.to(vlm.device)
    with vlm._stage("score"), vlm.llm_attention():
        h = res.last_hidden  # (1, 1, D): predicts the first continuation token
        if n > 1:
            pos = None
            if res.positions is not None:  # M-RoPE: the ids generation would use
                pos = torch.cat([res.positions.decode(t) for t in range(n - 1)], dim=-1)
            rest = vlm.run_llm(vlm.embed_tokens(cont[:, :-1]), res.cache, pos)
            h = torch.cat([h, rest], dim=1)
        logits = vlm.model.lm_head(h[0]).float()  # (L, vocab)
        logp = logits.log_softmax(-1).gather(1, cont[0, :, None])[:, 0]
        greedy = bool((logits.argmax(-1) == cont[0]).all())
    return logp, greedy


class VideoQA:
    """A loaded checkpoint for video question answering (see module doc)."""

    def __init__(self, vlm: Any, tokenizer: Any, path: str | os.PathLike, *,
                 decode_chunk: int = 64, progress: bool = False) -> None:
        if not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be an int >= 1, got {decode_chunk!r}")
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.path = os.fspath(path)
        self.decode_chunk = decode_chunk
        self.progress = progress
        self.family = vlm.family
        self.preprocessing = self.family.preprocessing(self.path)
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(vlm.model.generation_config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.eos_token_id: int | None = eos

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, strategy: str = "full",
             knobs: dict[str, Any] | None = None, *, dtype: str | torch.dtype | None = "auto",
             device: str | torch.device | None = None, device_map: Any = None,
             memory_budget_bytes: int | None = None, vision_chunk_frames: int | None = None,
             prefill_chunk_tokens: int | None = None, decode_chunk: int = 64,
             progress: bool = False) -> VideoQA:
        """Load the checkpoint folder ``path`` (weights + tokenizer) with ``strategy`` and
        its ``knobs``. ``device`` None: CUDA if available, else CPU.

        ``device_map`` (sharding one model over several devices) is refused with a
        ValueError: the wrapper's chunked vision, preallocated KV cache and fused attention
        run the whole model on one device. Data parallelism (one replica per process,
        ``accelerate launch``) is how this package uses many GPUs."""
        from lvlm_fast.models import LongVideoVLM, get_strategy

        if device_map is not None:
            raise ValueError(
                f"device_map={device_map!r} is not supported: LongVideoVLM runs the whole "
                "model on one device (chunked vision, one preallocated KV cache, fused "
                "attention), so a model split over devices cannot be driven; run one replica "
                "per GPU with `accelerate launch` (data parallel), a smaller dtype, or a "
                "strategy/memory budget that fits one GPU")
        knobs = dict(knobs or {})
        get_strategy(strategy, **knobs)  # bad strategy/knob: fail before loading weights
        dev = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vlm = LongVideoVLM.from_pretrained(
            path, strategy, dtype=resolve_dtype(dtype, dev), device=dev,
            memory_budget_bytes=memory_budget_bytes, vision_chunk_frames=vision_chunk_frames,
            prefill_chunk_tokens=prefill_chunk_tokens, **knobs)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
        except Exception as exc:
            raise ValueError(f"cannot load a tokenizer from {os.fspath(path)!r}: {exc}") from exc
        return cls(vlm, tokenizer, path, decode_chunk=decode_chunk, progress=progress)

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    # ------------------------------------------------------------------ video
    def read(self, video: str | os.PathLike, *, frames: int | None = None,
             fps: float | None = None) -> Frames:
        """Probe, sample, decode and preprocess ``video`` (see module doc)."""
        from lvlm_fast import video as lv
        from lvlm_fast.models.command import preprocess

        check_sampling(frames, fps)
        video = os.fspath(video)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        info = lv.probe(video)
        indices, sample_fps = sample_frames(info, frames, fps, self.family, self.preprocessing)
        seconds["probe"] = time.perf_counter() - t0
        h, w = self.family.frame_size(info.height, info.width, self.preprocessing)
        # frames stay on the host; page-locked on CUDA so uploads are asynchronous
        buf = lv.HostFrameBuffer((len(indices), 3, h, w), self.vlm.dtype,
                                 pin=self.device.type == "cuda")
        t_dec = t_pre = 0.0
        pos = 0
        t0 = time.perf_counter()
        for _idx, chunk in lv.iter_frames(video, indices, chunk_size=self.decode_chunk,
                                          progress=self.progress):
            t1 = time.perf_counter()
            t_dec += t1 - t0
            preprocess(chunk, (h, w), self.preprocessing, buf.tensor[pos : pos + chunk.shape[0]])
            pos += chunk.shape[0]
            t0 = time.perf_counter()
            t_pre += t0 - t1
        seconds["decode video"], seconds["preprocess"] = t_dec, t_pre
        return Frames(video, buf.tensor, indices, info.num_frames, info.fps, sample_fps,
                      seconds, buf)

    # ------------------------------------------------------------------ prompts
    def prompt(self, frames: Frames, text: str) -> Any:
        """The VideoPrompt of ``text`` about ``frames`` (the family's chat template)."""
        from lvlm_fast.models.strategies.base import VideoPrompt

        if not isinstance(text, str):
            raise TypeError(f"question must be a str, got {type(text).__name__}")
        pre, post = self.family.split_prompt(self.tokenizer, text)
        if not pre:  # the LLM needs one token before the video (the attention sink)
            bos = self.tokenizer.bos_token_id
            pre = [bos if bos is not None else (self.eos_token_id or 0)]
        if not post:
            raise ValueError("the prompt after the video is empty (empty question?)")
        dev = self.device
        # text_ids: families that frame each temporal unit with text (Qwen3-VL timestamps);
        # frame_times: the processor's timestamps (source index / source fps), exact for any
        # sampling stride
        times = [i / frames.source_fps for i in frames.indices] \
            if frames.source_fps and frames.source_fps > 0 else None
        return VideoPrompt(frames.pixels, torch.tensor([pre], device=dev),
                           torch.tensor([post], device=dev), fps=frames.sample_fps,
                           text_ids=self.text_ids, frame_times=times)

    def text_ids(self, text: str) -> list[int]:
        """The tokenizer as text -> ids, no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @contextlib.contextmanager
    def _measure(self) -> Iterator[dict[str, Any]]:
        """Peak bytes above the level at entry (CUDA allocator / CPU live tensors)."""
        from lvlm_fast.profile import LiveTensorTracker

        out: dict[str, Any] = {}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        tracker = LiveTensorTracker(cuda_allocator=False)
        with tracker:
            yield out
        out["peak_bytes"] = (torch.cuda.max_memory_allocated(self.device) - base) if cuda \
            else tracker.peak_bytes
        out["peak_source"] = "CUDA allocator peak" if cuda else "live-tensor tracker (CPU)"

    # ------------------------------------------------------------------ answering
    def answer(self, frames: Frames, question: str, *, max_new_tokens: int = 64
               ) -> dict[str, Any]:
        """Greedy answer to ``question`` about ``frames`` and its report."""
        from lvlm_fast.models.wrapper import check_count

        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        vlm = self.vlm
        prompt = self.prompt(frames, question)
        t0 = time.perf_counter()
        with self._measure() as mem:
            tokens = vlm.generate(prompt, max_new_tokens, eos_token_id=self.eos_token_id)
            ids = tokens[0].tolist()  # one host sync, after generation
        t_model = time.perf_counter() - t0
        eos = self.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        res = vlm.last_prefill
        seconds = dict(frames.seconds)
        for k in ("vision", "prefill", "decode"):
            seconds[{"decode": "generate"}.get(k, k)] = vlm.timings.get(k, 0.0)
        seconds["strategy (other)"] = max(0.0, t_model - sum(vlm.timings.values()))
        return {
            "answer": text, "answer_ids": ids, "answer_tokens": len(ids),
            "frames_read": len(frames.indices), "video_frames": frames.video_frames,
            "frames_encoded": res.frames_encoded, "llm_tokens": res.llm_tokens,
            "visual_tokens": res.visual_tokens, "peak_bytes": mem["peak_bytes"],
            "peak_source": mem["peak_source"], "warnings": list(res.warnings),
            "seconds": seconds,
        }

    def score(self, frames: Frames, context: str, continuation: str) -> dict[str, Any]:
        """Log-probability of ``continuation`` right after the assistant header of
        ``context`` about ``frames`` (the continuation tokenized on its own, no special
        tokens). Returns ``logprob``, ``is_greedy``, ``continuation_tokens`` and the report
        fields of :meth:`answer` (peak memory, seconds)."""
        if not isinstance(continuation, str) or not continuation:
            raise ValueError(f"continuation must be a non-empty str, got {continuation!r}")
        prompt = self.prompt(frames, context)
        ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
        cont = torch.tensor([ids], device=self.device)
        t0 = time.perf_counter()
        with self._measure() as mem:
            logp, greedy = score_continuation(self.vlm, prompt, cont)
            total = float(logp.sum())
        t_model = time.perf_counter() - t0
        res = self.vlm.last_prefill
        seconds = dict(frames.seconds)
        for k in ("vision", "prefill", "score"):
            seconds[k] = self.vlm.timings.get(k, 0.0)
        seconds["strategy (other)"] = max(0.0, t_model - sum(self.vlm.timings.values()))
        return {"logprob": total, "is_greedy": greedy, "continuation_tokens": len(ids),
                "frames_read": len(frames.indices), "frames_encoded": res.frames_encoded,
                "llm_tokens": res.llm_tokens, "visual_tokens": res.visual_tokens,
                "peak_bytes": mem["peak_bytes"], "peak_source": mem["peak_source"],
                "warnings": list(res.warnings), "seconds": seconds}
