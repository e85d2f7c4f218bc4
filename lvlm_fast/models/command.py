"""``lvlm-fast run``: answer a question about a video file with a long-video strategy.

    lvlm-fast run VIDEO --model PATH --question "..." [--strategy NAME] [--frames N | --fps F]
                  [--set KEY=VALUE ...] [--max-new-tokens N] [--budget BYTES] ...

Pipeline (:class:`lvlm_fast.models.pipeline.VideoQA`, shared with ``lvlm-fast batch`` and
the lmms-eval model): probe the video, pick frame numbers by the checkpoint's family
(:meth:`ModelFamily.sample_indices`: the Qwen families sample as their transformers video
processor does, e.g. Qwen2.5-VL rounds ``--frames`` to a multiple of 2 and clamps ``--fps``
to its min/max frames; LLaVA-OneVision: ``--frames N``: N uniformly spaced frames;
``--fps F``: one frame every 1/F s; neither: 32 uniform frames, or every frame of a shorter
video), decode them in chunks (:func:`lvlm_fast.video.iter_frames`, never
the whole video at once), preprocess each chunk straight into one preallocated
(T, 3, H, W) tensor, build the prompt with the checkpoint's tokenizer, run the strategy and
greedy decoding (:class:`lvlm_fast.models.LongVideoVLM`), print the answer and a short
report. Any model family the wrapper supports (LLaVA-OneVision, Qwen2.5-VL, ...).

Preprocessing (documented approximation of the transformers processor): frames are
resized to the family's frame size (LLaVA-OneVision: the vision tower's ``image_size``
squared, aspect ratio not kept, as its video processor does; Qwen-VL: multiples of the
patch x merge size within the checkpoint's pixel bounds) with torch bicubic + antialias
(the processors use PIL bicubic: values can differ slightly), scaled by
``rescale_factor`` (1/255) and normalised with ``image_mean``/``image_std``. Those come
from the checkpoint's ``video_preprocessor_config.json``, ``preprocessor_config.json`` or
``processor_config.json`` (first found), else from the family: SigLIP mean = std = 0.5;
CLIP the OpenAI CLIP mean/std (also Qwen-VL's).

Prompt: the family's user turn (LLaVA-OneVision: ``<video>\\n{question}``; Qwen-VL:
``<|vision_start|><video><|vision_end|>{question}``) rendered with the tokenizer's chat
template (generation prompt added) and split at the video; without a template the ChatML
layout of their Qwen LLMs: ``<|im_start|>user\\n`` + that turn +
``<|im_end|>\\n<|im_start|>assistant\\n``.

Frames are kept in one host buffer (:class:`lvlm_fast.video.HostFrameBuffer`), on CUDA
page-locked with ``cudaHostRegister`` (exactly its own pages; ``pin_memory=True`` would
lock the next power of two: 17 GB for 9 GB of frames); the wrapper uploads one vision
chunk at a time.

Report: frames read, tokens given to the LLM (prefix + visual + question, summaries
included), peak memory (CUDA: the allocator's peak above the level after loading the
weights; CPU: :class:`lvlm_fast.profile.LiveTensorTracker`, live tensors above the
weights), host memory of the frames and how much of it is page-locked, time per stage,
and any warning of the strategy about the result (e.g. ``videoxl`` on a video too short
for one summary token: the answer then ignores the video).

Timings: by default stage times are host-side (CUDA runs asynchronously, so work is
billed to whichever stage waits for it; the total is exact, the run ends with one sync).
``--sync-timings`` synchronizes the device at every stage boundary for exact per-stage
times, at the cost of those syncs (off by default: it slows the run).

Errors (missing or corrupt checkpoint or video, unknown strategy or knob, a budget too
small for one chunk, more frames than the video has, a ``<video>``/``<image>`` placeholder
token in the question) print ``lvlm-fast run: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from typing import Any

VIDEO_SENTINEL = "<lvlm_fast_video>"
DEFAULT_FRAMES = 32
_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json",
                       "processor_config.json")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class RunError(Exception):
    """A user-facing error: printed as ``lvlm-fast run: error: ...``, exit status 2."""


# --------------------------------------------------------------------------- parsing
def parse_bytes(text: str) -> int:
    """'2GiB', '512 MiB', '1.5e9', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 2GiB, 512MiB, 1e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_knob(text: str) -> tuple[str, Any]:
    """'ratio=16' -> ('ratio', 16); values are Python literals, else strings."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    return key.strip(), value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``run`` on the ``lvlm-fast`` subcommand parser."""
    p = sub.add_parser(
        "run", help="answer a question about a video with a long-video strategy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="video file (anything PyAV/FFmpeg decodes)")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="local transformers checkpoint folder of a supported model family "
                        "(LLaVA-OneVision / LLaVA-Video, Qwen2.5-VL, ...) with its tokenizer")
    p.add_argument("--question", required=True, help="the question about the video")
    p.add_argument("--strategy", default="full", metavar="NAME",
                   help="long-video strategy: full, uniform, vilamp, slowfast, llamavid, "
                        "videoxl, ... (default full)")
    p.add_argument("--set", dest="knobs", action="append", default=[], type=parse_knob,
                   metavar="KEY=VALUE",
                   help="strategy knob override, repeatable (e.g. --set ratio=8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=int, metavar="N",
                   help="read N uniformly spaced frames (error if the video has fewer); "
                   "Qwen families: as their video processor samples N")
    g.add_argument("--fps", type=float, metavar="F",
                   help="read one frame every 1/F seconds; Qwen families: as their video "
                   "processor samples F fps (clamped to its min/max frames)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="answer length limit (default 64; greedy, stops at EOS)")
    p.add_argument("--budget", type=parse_bytes, default=None, metavar="BYTES",
                   help="working-memory budget per chunk (vision and prefill chunk sizes "
                        "are derived from it), e.g. 2GiB (default 1GiB)")
    p.add_argument("--vision-chunk", type=int, default=None, metavar="FRAMES",
                   help="frames per vision-tower chunk (overrides the budget)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per LLM prefill chunk (overrides the budget)")
    p.add_argument("--decode-chunk", type=int, default=64, metavar="FRAMES",
                   help="frames decoded from the file per chunk (default 64)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: the checkpoint's on CUDA, float32 on CPU)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="also write the answer and the report as JSON to OUT")
    p.add_argument("--progress", action="store_true", help="progress bar while decoding")
    p.add_argument("--sync-timings", action="store_true",
                   help="synchronize the device at each stage boundary for exact per-stage "
                        "times (CUDA only; off by default: the syncs slow the run)")
    p.set_defaults(func=main_run)
    return p


# --------------------------------------------------------------------------- pieces
def preprocess_config(path: str, vision_config: Any) -> dict[str, Any]:
    """rescale_factor, image_mean, image_std (and where they came from)."""
    for name in _PREPROCESSOR_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                with open(f) as fh:
                    d = json.load(fh)
            except (OSError, ValueError) as exc:
                raise RunError(f"cannot read {f!r}: {exc}") from exc
            d = d.get("video_processor", d.get("image_processor", d))
            if "image_mean" in d and "image_std" in d:
                return {"rescale_factor": float(d.get("rescale_factor", 1 / 255)),
                        "image_mean": tuple(d["image_mean"]), "image_std": tuple(d["image_std"]),
                        "source": name}
    from lvlm_fast.models.families.base import CLIP_MEAN, CLIP_STD  # lazy: a light CLI import

    clip = str(getattr(vision_config, "model_type", "")).startswith("clip")
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else ((0.5,) * 3, (0.5,) * 3)
    return {"rescale_factor": 1 / 255, "image_mean": mean, "image_std": std,
            "source": f"{'CLIP' if clip else 'SigLIP'} defaults"}


def preprocess(frames_u8, size: int | tuple[int, int], pre: dict[str, Any], out) -> None:
    """uint8 (t, H, W, 3) -> normalised (t, 3, h, w) written into ``out``; ``size`` is
    ``(h, w)`` or one int for a square (also used by :mod:`lvlm_fast.models.pipeline`)."""
    import torch
    import torch.nn.functional as F

    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = frames_u8.to(out.device).permute(0, 3, 1, 2).float()
    if x.shape[2] != hw[0] or x.shape[3] != hw[1]:
        x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False,
                          antialias=True)
    x = x.clamp_(0, 255).mul_(pre["rescale_factor"])
    mean = torch.tensor(pre["image_mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre["image_std"], device=x.device).view(1, 3, 1, 1)
    out.copy_((x - mean) / std)


def build_prompt(tokenizer, question: str) -> tuple[list[int], list[int], str]:
    """(prefix ids, question ids, template used) around the video."""
    template = "chat template"
    text = None
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{VIDEO_SENTINEL}\n{question}"}],
                tokenize=False, add_generation_prompt=True)
        except Exception:
            text = None
        if text is not None and text.count(VIDEO_SENTINEL) != 1:
            text = None
    if text is None:
        template = "ChatML"
        text = (f"<|im_start|>user\n{VIDEO_SENTINEL}\n{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
    before, after = text.split(VIDEO_SENTINEL)
    pre = tokenizer(before, add_special_tokens=False)["input_ids"]
    post = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not pre:  # the LLM needs at least one token before the video (the attention sink)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
            tokenizer.eos_token_id
        pre = [bos if bos is not None else 0]
    if not post:
        raise RunError("the prompt after the video is empty (empty question?)")
    return pre, post, template


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _dtype(name: str, device) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else None
    return getattr(torch, name)


def _sampling_rule(path: str) -> tuple[Any, dict[str, Any] | None]:
    """The checkpoint's family class and raw preprocessing config, to sample frames by its
    processor's rule before the weights load; (None, None) = the package's rule where
    ``config.json`` is unreadable or its model type unsupported (the load says why)."""
    from lvlm_fast.models.families.base import family_for_model_type, read_preprocessing

    try:
        with open(os.path.join(os.fspath(path), "config.json")) as fh:
            model_type = json.load(fh).get("model_type")
        return family_for_model_type(model_type), read_preprocessing(path)
    except (OSError, ValueError, TypeError, AttributeError):
        return None, None


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work; returns the answer and the report (raises RunError on bad input).

    The pipeline is :class:`lvlm_fast.models.pipeline.VideoQA` (shared with ``lvlm-fast
    batch`` and the lmms-eval model): the family's frame size, normalisation and chat
    template, so every supported family runs here."""
    import torch

    from lvlm_fast import video as lv
    from lvlm_fast.models import get_strategy
    from lvlm_fast.models.pipeline import VideoQA, sample_frames
    from lvlm_fast.profile import LiveTensorTracker

    if not args.progress:  # transformers' weight-loading bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    knobs = dict(args.knobs)
    try:  # fail on a bad strategy/knob before loading anything
        strategy = get_strategy(args.strategy, **knobs)
    except TypeError as exc:
        raise RunError(f"bad --set for strategy {args.strategy!r}: {exc}") from exc
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    if args.max_new_tokens < 1:
        raise RunError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.frames is not None and args.frames < 1:
        raise RunError(f"--frames must be >= 1, got {args.frames}")
    if args.fps is not None and args.fps <= 0:
        raise RunError(f"--fps must be > 0, got {args.fps}")

    t0 = time.perf_counter()
    try:  # a bad video or too many frames fails before the weights load
        info = lv.probe(args.video)
        sample_frames(info, args.frames, args.fps, *_sampling_rule(args.model))
    except ValueError as exc:  # VideoReadError is a ValueError
        raise RunError(str(exc)) from exc
    stages["probe"] = time.perf_counter() - t0

    device = torch.device(args.device) if args.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        qa = VideoQA.load(args.model, args.strategy, knobs, dtype=_dtype(args.dtype, device),
                          device=device, memory_budget_bytes=args.budget,
                          vision_chunk_frames=args.vision_chunk,
                          prefill_chunk_tokens=args.prefill_chunk,
                          decode_chunk=args.decode_chunk, progress=args.progress)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise RunError(str(exc)) from exc
    vlm = qa.vlm
    stages["load model"] = time.perf_counter() - t0
    weights = sum(p.nbytes for p in vlm.model.parameters())
    template = "chat template" if getattr(qa.tokenizer, "chat_template", None) else "ChatML"

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    vlm.sync_timings = bool(args.sync_timings)  # the wrapper syncs only on CUDA
    tracker = LiveTensorTracker(cuda_allocator=False)
    with tracker:  # frames included: they are part of what one run holds
        try:
            frames = qa.read(args.video, frames=args.frames, fps=args.fps)
            rep = qa.answer(frames, args.question, max_new_tokens=args.max_new_tokens)
        except (ValueError, TypeError) as exc:  # VideoReadError is a ValueError
            raise RunError(str(exc)) from exc
        frames.buffer.release()  # after generation's host sync: no upload reads the pages
    stages.update({k: rep["seconds"][k] for k in ("decode video", "preprocess", "vision",
                                                  "prefill", "generate", "strategy (other)")})
    peak = (torch.cuda.max_memory_allocated(device) - cuda_base) if cuda else tracker.peak_bytes
    stages["total"] = time.perf_counter() - t_start
    buf = frames.buffer
    return {
        "answer": rep["answer"], "answer_ids": rep["answer_ids"], "video": args.video,
        "model": args.model, "family": qa.family.name,
        "strategy": strategy.name, "config": {k: v for k, v in vars(strategy.config).items()
                                              if isinstance(v, (int, float, str, bool))},
        "video_frames": frames.video_frames, "video_fps": frames.source_fps,
        "frames_read": rep["frames_read"], "frames_encoded": rep["frames_encoded"],
        "frame_size": list(frames.pixels.shape[2:]),
        "llm_tokens": rep["llm_tokens"], "visual_tokens": rep["visual_tokens"],
        "prompt_template": template, "preprocess": _preprocess_source(args.model, qa.family),
        "device": str(device), "dtype": str(vlm.dtype).replace("torch.", ""),
        "weights_bytes": weights, "peak_bytes": peak,
        "peak_source": "CUDA allocator peak above weights" if cuda
        else "live-tensor tracker (CPU), above weights",
        "vision_chunk_frames": vlm.vision_chunk_frames,
        "prefill_chunk_tokens": vlm.prefill_chunk_tokens,
        "frames_host_bytes": buf.nbytes, "frames_pinned_bytes": buf.pinned_bytes,
        "frames_pin_method": buf.pin_method,
        "sync_timings": vlm.sync_timings,
        "warnings": rep["warnings"],
        "seconds": stages,
    }


def _preprocess_source(path: str, family: Any) -> str:
    """Where the normalisation came from: the checkpoint's file, else the family default."""
    for name in _PREPROCESSOR_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return name
    from lvlm_fast.models.families.base import CLIP_MEAN

    mean, _ = family.default_normalization()
    return {CLIP_MEAN: "CLIP defaults", (0.5, 0.5, 0.5): "SigLIP defaults"}.get(
        tuple(mean), f"{family.name} defaults")


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"strategy         {r['strategy']} {r['config']}",
        f"frames read      {r['frames_read']} of {r['video_frames']} "
        f"({r['frames_encoded']} through the vision tower)",
        f"LLM tokens       {r['llm_tokens']} ({r['visual_tokens']} visual)",
        f"peak memory      {_fmt_bytes(r['peak_bytes'])} ({r['peak_source']}; weights "
        f"{_fmt_bytes(r['weights_bytes'])}, {r['dtype']} on {r['device']})",
        f"chunks           {r['vision_chunk_frames']} frames / vision chunk, "
        f"{r['prefill_chunk_tokens']} tokens / prefill chunk",
        f"host frames      {_fmt_bytes(r['frames_host_bytes'])}, pinned "
        f"{_fmt_bytes(r['frames_pinned_bytes'])} ({r['frames_pin_method']})",
        "time (s)         " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
        + (" (host-side; --sync-timings for per-stage device times)"
           if r["device"].startswith("cuda") and not r["sync_timings"] else ""),
    ]
    lines += [f"warning          {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def main_run(args: argparse.Namespace, _rest: list[str] | None = None) -> int:
    try:
        report = run(args)
    except RunError as exc:
        print(f"lvlm-fast run: error: {exc}", file=sys.stderr)
        return 2
    print(report["answer"])
    print("--")
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
