"""lmms-eval model ``lvlm_fast``: evaluate a long-video strategy of this package on any
lmms-eval video task.

    lmms-eval --model lvlm_fast \\
        --model_args pretrained=/ckpt/llava-onevision-7b,strategy=vilamp,frames=2048 \\
        --tasks videomme --log_samples --output_path out/
    accelerate launch --num_processes 8 -m lmms_eval --model lvlm_fast ...   # data parallel

Registration: lmms-eval loads external models from the Python entry-point group
``lmms_eval.models``; this package declares
``lvlm_fast = lvlm_fast.integrations:lmms_eval_manifest`` there (``pyproject.toml``), so an
install of ``lvlm-fast`` next to lmms-eval is all it takes (no patch of lmms-eval, no
``LMMS_EVAL_PLUGINS``).

``--model_args`` (comma-separated ``key=value``):

- ``pretrained``: the local checkpoint folder (any family the wrapper supports:
  LLaVA-OneVision / LLaVA-Video / Video-XL layouts, Qwen2.5-VL), with its tokenizer;
- ``strategy`` (default ``full``) and any knob of that strategy by its name
  (``strategy=vilamp,keyframes=8``, ``strategy=videoxl,ratio=16``); an unknown knob is a
  TypeError naming it;
- ``frames`` (N uniformly spaced frames) or ``fps`` (one frame every 1/F s); neither: 32
  uniform frames, or every frame of a shorter video; the Qwen families sample as their
  transformers video processor does (:meth:`ModelFamily.sample_indices`);
- ``memory_budget`` (bytes or ``2GiB``), ``vision_chunk``, ``prefill_chunk``,
  ``max_new_tokens`` (default 64; a task's ``generation_kwargs.max_new_tokens`` wins),
  ``dtype`` (auto, float32, bfloat16, float16), ``device`` (default: accelerate's device of
  the process), ``device_map`` (refused: one model on one device; use data parallelism).

Requests. ``generate_until``: greedy answer, cut at the first of the task's ``until``
strings. ``loglikelihood`` (multiple-choice tasks): :func:`~lvlm_fast.models.pipeline.
score_continuation`, the strategy's prefill of video + context then the continuation tokens
through the same KV cache. Each request's video (the task's ``doc_to_visual``: a list with one
video file path) is decoded with :mod:`lvlm_fast.video`; consecutive requests about the same
video (the choices of one question) reuse the decoded frames. Sampling temperature / top-p
are ignored: decoding is greedy.

Logged samples (``--log_samples``): each request's ``token_counts`` entry holds
``input_tokens`` (tokens the LLM read), ``output_tokens`` and ``lvlm_fast``: frames read and
encoded, visual tokens, peak memory in bytes (the CUDA allocator's peak, or the CPU
live-tensor tracker), seconds per stage (decode stages 0 when ``video_reused``) and the
``process`` (rank) that ran it.

Data parallel: under ``accelerate launch`` each process holds one model replica on
``accelerator.device`` and lmms-eval gives it every ``world_size``-th request (its own
accelerate path: ``rank`` / ``world_size`` / ``accelerator`` of this model). On CPU set
``ACCELERATE_USE_CPU=1`` so the processes join a gloo group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

MODEL_NAME = "lvlm_fast"


@dataclass
class SampleStats(TokenCounts):
    """lmms-eval's per-request token counts plus this package's measurements (they land in
    the logged sample's ``token_counts``)."""

    lvlm_fast: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        d["lvlm_fast"] = self.lvlm_fast
        return d


def _stats(report: dict[str, Any], output_tokens: int, *, reused: bool,
           rank: int) -> SampleStats:
    keep = ("frames_read", "frames_encoded", "visual_tokens", "llm_tokens", "peak_bytes",
            "peak_source", "warnings")
    seconds = dict(report["seconds"])
    if reused:  # frames decoded for an earlier request: this one did not pay for them
        for k in ("probe", "decode video", "preprocess"):
            seconds[k] = 0.0
    stats = {k: report[k] for k in keep if k in report}
    stats.update(seconds=seconds, video_reused=reused, process=rank)
    return SampleStats(input_tokens=report["llm_tokens"], output_tokens=output_tokens,
                       lvlm_fast=stats)


def _video_path(visuals: Any, what: str) -> str:
    """The one video file of a request (``doc_to_visual`` returns a list)."""
    if isinstance(visuals, (str, os.PathLike)):
        visuals = [visuals]
    if not isinstance(visuals, (list, tuple)) or len(visuals) != 1 \
            or not isinstance(visuals[0], (str, os.PathLike)):
        got = type(visuals).__name__ if not isinstance(visuals, (list, tuple)) else \
            f"{len(visuals)} item(s) of {sorted({type(v).__name__ for v in visuals})}"
        raise ValueError(f"{what}: the lvlm_fast model takes one video file path per request "
                         f"(doc_to_visual -> [path]), got {got}")
    return os.fspath(visuals[0])


class LvlmFast(lmms):
    """lmms-eval model over :class:`lvlm_fast.models.pipeline.VideoQA` (module doc)."""

    is_simple = True

    def __init__(self, pretrained: str, strategy: str = "full", frames: int | None = None,
                 fps: float | None = None, memory_budget: int | str | None = None,
                 vision_chunk: int | None = None, prefill_chunk: int | None = None,
                 max_new_tokens: int = 64, dtype: str = "auto", device: str | None = None,
                 device_map: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **strategy_knobs: Any) -> None:
        super().__init__()
        from lvlm_fast.models.command import parse_bytes
        from lvlm_fast.models.pipeline import VideoQA, check_sampling
        from lvlm_fast.models.wrapper import check_count

        check_sampling(frames, fps)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        if isinstance(memory_budget, str):
            memory_budget = parse_bytes(memory_budget)
        if int(batch_size) != 1:  # one request = one video: no padding of videos together
            raise ValueError(f"batch_size must be 1 for the lvlm_fast model (one video per "
                             f"forward), got {batch_size!r}")
        from accelerate import Accelerator

        acc = Accelerator()
        if device is None:
            device = str(acc.device)
        self.qa = VideoQA.load(pretrained, str(strategy), strategy_knobs, dtype=dtype,
                               device=device, device_map=device_map,
                               memory_budget_bytes=memory_budget,
                               vision_chunk_frames=vision_chunk,
                               prefill_chunk_tokens=prefill_chunk)
        self.frames, self.fps = frames, fps
        if acc.num_processes > 1:
            # lmms-eval shards requests by (rank, world_size) and gathers with accelerator
            self.accelerator = acc
            self._rank = acc.process_index
            self._world_size = acc.num_processes
        self._last: tuple[str, Any] | None = None

    # ------------------------------------------------------------------ lmms-eval API
    @property
    def device(self) -> Any:
        return self.qa.device

    @property
    def tokenizer(self) -> Any:
        return self.qa.tokenizer

    def _frames(self, request: Any, visuals: Any) -> tuple[Any, bool]:
        """The request's decoded video and whether it was reused from the last request."""
        path = _video_path(visuals, f"request {getattr(request, 'idx', '?')}")
        if self._last is not None and self._last[0] == path:
            return self._last[1], True
        self._last = (path, self.qa.read(path, frames=self.frames, fps=self.fps))
        return self._last[1], False

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: list[Any]) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        out: list[GenerationResult] = []
        for req in tqdm(requests, disable=self.rank != 0, desc="lvlm_fast generate"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = gen_kwargs.get("max_new_tokens", self.max_new_tokens)
            frames, reused = self._frames(req, doc_to_visual(self._doc(task, split, doc_id)))
            rep = self.qa.answer(frames, context, max_new_tokens=int(n))
            text = rep["answer"]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(GenerationResult(text=text, token_counts=_stats(
                rep, rep["answer_tokens"], reused=reused, rank=self.rank)))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[GenerationResult]:
        """(log p(continuation | video, context), is_greedy) per request; the pair is the
        ``text`` of a GenerationResult so the measurements ride along to the log."""
        from tqdm.auto import tqdm

        out: list[GenerationResult] = []
        for req in tqdm(requests, disable=self.rank != 0, desc="lvlm_fast loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):  # doc_to_target may give a list: the first
                continuation = continuation[0]
            frames, reused = self._frames(req, doc_to_visual(doc))
            rep = self.qa.score(frames, context, str(continuation))
            out.append(GenerationResult(text=(rep["logprob"], rep["is_greedy"]),
                                        token_counts=_stats(rep, rep["continuation_tokens"],
                                                            reused=reused, rank=self.rank)))
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the lvlm_fast model answers one question per video "
                                  "request; multi-round generation is not implemented")
