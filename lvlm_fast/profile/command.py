"""``lvlm-fast profile``: peak memory vs frame count for every strategy (table, CSV, PNG, JSON).

With no arguments: the simulated ``llava-onevision-qwen2-7b`` in bf16 (meta tensors, no
weights needed), frames 128 ... 10,240, every registered strategy (``videoxl`` at r = 16),
first answer token. ``--model qwen2.5-vl-7b`` (or any shipped config of a supported family,
:data:`lvlm_fast.models.configs.MODEL_CONFIGS`) profiles that model the same way. The input
is a 448 x 448 video resized by the family's own video-processor rule (LLaVA-OneVision:
squared to the tower's 384; Qwen2.5-VL: 448 x 448, 2 frames per temporal patch); the
output's first line states the frame size.

Prints the table of peak GiB, writes ``profile_<model>.csv`` and
``profile_<model>.png`` (peak GiB vs frames with the 24 GiB and 80 GiB lines) into
``--out-dir``, and reports where each strategy passes 80 GiB. ``--budget GIB`` adds the
largest frame count that fits per strategy. What "peak" counts: ``lvlm_fast.profile.memory``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from lvlm_fast.profile.memory import DEFAULT_FRAMES, DEFAULT_MODEL, GIB, PROFILE_VIDEO_HW

# Published knobs the default run pins (the targets are stated at these).
DEFAULT_STRATEGY_OVERRIDES: dict[str, dict[str, Any]] = {"videoxl": {"ratio": 16}}
# Preferred order in tables and plots; strategies registered later come after, sorted.
STRATEGY_ORDER = ("full", "uniform", "vilamp", "slowfast", "llamavid", "videoxl", "vilamp-seed",
                  "video-llama-seed", "stream")
# Per-family profile defaults (config ``model_type`` -> defaults), each stated in the output.
# Video-LLaMA (issue 13.3): frames 8 ... 10,240; ``uniform`` takes every frame
# (num_frames = the largest swept count: the fused stream) next to ``video-llama-seed``
# (released-style); the Video Q-Former's frame-position rule beyond its 32-row table is
# "interpolate" (the released model raises there; rows 8-31 untrained), settable with
# --model-set video_qformer.position=...; no --stop-above cut (every run is cheap on meta);
# only the strategies the family runs (the others raise NotImplementedError by design).
# LLaVA-OneVision (issue 12): ``stream`` also runs at 1,000 and 100,000 frames (its flat
# line, through window replay), on the same table and plot as every strategy.
# Qwen3-VL / Qwen3.5: frames at the processor's long-video size (:func:`long_video_frame_hw`).
FAMILY_PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava_onevision": {"extra_frames": {"stream": (1000, 100000)}},
    # 352x352 frames give an 11x11 merged grid, which SlowFast-LLaVA's slow kernel (1, 2)
    # does not divide: the slow frames keep their full grid (slow_kernel (1, 1)), stated.
    "qwen3_vl": {"set": {"slowfast": {"slow_kernel": [1, 1]}}},
    "qwen3_5": {"set": {"slowfast": {"slow_kernel": [1, 1]}}},
    "video_llama": {"frames": (8, 32, 128, 512, 2048, 4096, 8192, 10240),
                    "strategies": ("full", "uniform", "video-llama-seed"),
                    "model_set": {"video_qformer.position": "interpolate"},
                    "uniform_every_frame": True, "stop_above": None},
}
DEFAULT_STOP_ABOVE_GIB = 120.0
LINES_GIB = (24.0, 80.0)
CSV_FIELDS = ("model", "strategy", "frames", "frame_size", "dtype", "simulated", "method",
              "peak_bytes", "peak_gib", "weight_bytes", "input_bytes", "inputs_counted",
              "pass_peak_bytes", "llm_tokens", "visual_tokens", "frames_encoded",
              "vision_chunk_frames", "prefill_chunk_tokens", "seconds", "kv_bytes",
              "state_bytes")


def registered_strategies() -> list[str]:
    from lvlm_fast.models.strategies import STRATEGIES

    names = list(STRATEGIES)
    return [n for n in STRATEGY_ORDER if n in names] + sorted(
        n for n in names if n not in STRATEGY_ORDER)


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated frame counts, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"frame counts must be positive ints, got {text!r}")
    return sorted(set(vals))


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


class _DefaultFrames(list):
    """The --frames default (a list; tells a family default apart from an explicit list)."""


def _parse_model_set(items: Sequence[str]) -> dict[str, Any]:
    """``dotted.config.key=value`` (value parsed as JSON when it parses, else a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ValueError(f"--model-set expects KEY=VALUE (KEY a dotted config path), "
                             f"got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_set(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``strategy.knob=value`` (value parsed as JSON when it parses, else a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        strat, dot, knob = name.partition(".")
        if not sep or not dot or not strat or not knob:
            raise ValueError(f"--set expects STRATEGY.KNOB=VALUE, got {item!r}")
        try:
            val = json.loads(value)
        except json.JSONDecodeError:
            val = value
        out.setdefault(strat, {})[knob] = val
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lvlm_fast.models.configs import MODEL_CONFIGS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"shipped model config (default {DEFAULT_MODEL}; one of "
                        f"{', '.join(MODEL_CONFIGS)})")
    p.add_argument("--strategies", default=None,
                   help="comma-separated strategy names (default: every registered one)")
    p.add_argument("--frames", type=_int_list, default=_DefaultFrames(DEFAULT_FRAMES),
                   help="comma-separated frame counts (default "
                        f"{','.join(map(str, DEFAULT_FRAMES))}; video-llama: "
                        f"{','.join(map(str, FAMILY_PROFILE_DEFAULTS['video_llama']['frames']))})")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="model and frame dtype (default bf16)")
    p.add_argument("--measure", action="store_true",
                   help="run for real with random weights on --device (tiny models only) "
                        "instead of simulating on meta tensors")
    p.add_argument("--device", default="cpu",
                   help="device for --measure: cpu or cuda (CUDA peak = allocator peak)")
    p.add_argument("--budget", type=_positive_float, default=None, metavar="GIB",
                   help="also print, per strategy, the largest frame count whose peak fits "
                        "in GIB (searched between the swept frame counts)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write {metadata, rows, searches} as JSON (rows: frames, strategy, "
                        "peak_bytes, llm_tokens, simulated, ...)")
    p.add_argument("--out-dir", default=".",
                   help="where profile_<model>.csv/.png go (default: current directory)")
    p.add_argument("--csv", default=None, metavar="OUT", help="CSV path (overrides --out-dir)")
    p.add_argument("--png", default=None, metavar="OUT", help="plot path (overrides --out-dir)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--stop-above", type=_positive_float, default=None, metavar="GIB",
                   help="stop sweeping a strategy at larger frame counts once its peak passes "
                        f"GIB (default {DEFAULT_STOP_ABOVE_GIB:g}, 1.5x an 80 GiB GPU; keeps the "
                        "default run short; video-llama: no stop)")
    p.add_argument("--crossings", default="80", metavar="GIB,...",
                   help="report the exact frame count where each strategy passes these "
                        "sizes, when the sweep brackets it (default 80; each costs a few "
                        "extra runs)")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="for each strategy at the largest frame count it ran, print the N "
                        "largest tensors alive at the peak (op, shape, allocating line)")
    p.add_argument("--frames-on-device", action="store_true",
                   help="count the input frames as device memory (a pipeline that uploads "
                        "the whole video); default: frames stay in host memory and the "
                        "wrapper streams one vision chunk at a time to the device")
    p.add_argument("--memory-budget", type=_positive_float, default=None, metavar="GIB",
                   help="LongVideoVLM working-memory budget per chunk, sizes the vision and "
                        "prefill chunks (default: the wrapper's, 1 GiB)")
    p.add_argument("--vision-chunk-frames", type=int, default=None,
                   help="frames per vision chunk (default: sized by the wrapper)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=None,
                   help="tokens per prefill chunk (default: sized by the wrapper)")
    p.add_argument("--set", action="append", default=[], metavar="STRATEGY.KNOB=VALUE",
                   help="override a strategy knob, e.g. --set videoxl.ratio=8 (repeatable)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config entry before the build, KEY a dotted path, "
                        "e.g. --model-set video_qformer.position=clamp (Video-LLaMA's frame-"
                        "position rule beyond 32 frames; the video-llama profile defaults it "
                        "to interpolate) (repeatable)")
    p.add_argument("--frame-size", default=None, metavar="HxW",
                   help="preprocessed frame size (default: a 448x448 video resized by the "
                        "family's video-processor rule; Qwen3-VL/Qwen3.5: its long-video "
                        "per-frame cap, 352x352)")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")


def format_table(rows: list[dict[str, Any]], strategies: Sequence[str],
                 frames: Sequence[int]) -> str:
    """Peak memory (GiB, or MiB if every peak is under 1 GiB): one line per frame count,
    one column per strategy ('-' = not run); then the LLM token counts."""
    cell = {(r["strategy"], r["frames"]): r["peak_bytes"] for r in rows}
    unit, div = ("GiB", GIB) if max(cell.values(), default=0) >= GIB else ("MiB", 2**20)
    width = max(9, *(len(s) + 1 for s in strategies))
    lines = [f"peak {unit}".rjust(8) + "".join(s.rjust(width) for s in strategies),
             "frames".rjust(8)]
    for n in frames:
        lines.append(f"{n:>8}" + "".join(
            ("-" if cell.get((s, n)) is None else f"{cell[(s, n)] / div:.2f}").rjust(width)
            for s in strategies))
    tok = {(r["strategy"], r["frames"]): r.get("llm_tokens") for r in rows}
    lines.append("")
    lines.append("LLM tokens".rjust(8) + "".join(s.rjust(width) for s in strategies))
    for n in frames:
        lines.append(f"{n:>8}" + "".join(
            ("-" if tok.get((s, n)) is None else str(tok[(s, n)])).rjust(width)
            for s in strategies))
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "peak_gib": round(r["peak_bytes"] / GIB, 4)})


def write_plot(path: str, rows: list[dict[str, Any]], strategies: Sequence[str], *,
               title: str, lines_gib: Sequence[float] = LINES_GIB,
               crossings: Sequence[dict[str, Any]] = ()) -> None:
    """Peak GiB vs frames (log x), one line per strategy, horizontal GPU-size lines, and
    an x where a strategy passes a line (``crossings``: the searches' crossing entries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for s in strategies:
        pts = sorted((r["frames"], r["peak_bytes"] / GIB) for r in rows if r["strategy"] == s)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=s)
    for g in lines_gib:
        ax.axhline(g, color="gray", ls="--", lw=1)
        ax.annotate(f"{g:g} GiB", xy=(1.0, g), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8,
                    color="gray")
    for c in crossings:
        ax.plot([c["passes_at_frames"]], [c["gib"]], marker="x", color="black", ms=7)
        ax.annotate(f"{c['strategy']}: {c['passes_at_frames']}", xy=(c["passes_at_frames"],
                    c["gib"]), xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_xscale("log", base=2)
    frames = sorted({r["frames"] for r in rows})
    if frames:
        # a tick per swept count, but no label closer than 10% to the previous labelled one
        # on the log axis (1,000 next to 1,024 would print on top of each other)
        labels, last = [], None
        for f in frames:
            show = last is None or f >= 1.1 * last
            labels.append(f"{f:,}" if show else "")
            last = f if show else last
        ax.set_xticks(frames)
        ax.set_xticklabels(labels, rotation=45, fontsize=8)
    ax.set_xlabel("frames")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _check_measurable(model: str, dtype: Any, device: str) -> None:
    """--measure builds real random weights: refuse models that cannot fit in RAM."""
    if device != "cpu":
        return
    from lvlm_fast.profile.memory import build_model, model_static_bytes

    need = model_static_bytes(build_model(model, dtype=dtype, simulate=True))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > avail // 2:
        raise ValueError(f"--measure would allocate the weights of {model!r} for real "
                         f"({need / GIB:.1f} GiB; {avail / GIB:.1f} GiB available): drop "
                         "--measure to simulate it on meta tensors, or use a tiny config")


def run(args: argparse.Namespace) -> int:
    from lvlm_fast.models.configs import MODEL_CONFIGS, get_config
    from lvlm_fast.profile.memory import Profiler, parse_dtype

    t_start = time.perf_counter()
    if args.model not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {args.model!r}; shipped configs: "
                         f"{', '.join(sorted(MODEL_CONFIGS))}")
    fam_defaults = FAMILY_PROFILE_DEFAULTS.get(getattr(get_config(args.model), "model_type",
                                                       None), {})
    defaulted_frames = isinstance(args.frames, _DefaultFrames)
    if defaulted_frames and "frames" in fam_defaults:
        args.frames = list(fam_defaults["frames"])
    if args.stop_above is None:
        args.stop_above = fam_defaults.get("stop_above", DEFAULT_STOP_ABOVE_GIB)
    model_overrides = dict(fam_defaults.get("model_set", {}))
    defaulted = set(model_overrides)
    user_model_set = _parse_model_set(args.model_set)
    model_overrides.update(user_model_set)
    defaulted -= set(user_model_set)
    available = registered_strategies()
    strategies = list(fam_defaults.get("strategies", available)) if args.strategies is None else \
        [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in available]
    if unknown or not strategies:
        raise ValueError(f"unknown strategy {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"available: {', '.join(available)}")
    overrides = {k: dict(v) for k, v in DEFAULT_STRATEGY_OVERRIDES.items() if k in strategies}
    if fam_defaults.get("uniform_every_frame") and "uniform" in strategies:
        overrides["uniform"] = {"num_frames": max(args.frames)}  # the fused stream, all frames
    if args.frame_size is None:  # family knob defaults tied to its default frame size
        for k, v in fam_defaults.get("set", {}).items():
            if k in strategies:
                overrides.setdefault(k, {}).update(v)
    for k, v in _parse_set(args.set).items():
        if k not in available:
            raise ValueError(f"--set names unknown strategy {k!r}; available: "
                             f"{', '.join(available)}")
        overrides.setdefault(k, {}).update(v)
    dtype = parse_dtype(args.dtype)
    vlm_kwargs: dict[str, Any] = {}
    if args.memory_budget is not None:
        vlm_kwargs["memory_budget_bytes"] = int(args.memory_budget * GIB)
    if args.vision_chunk_frames is not None:
        vlm_kwargs["vision_chunk_frames"] = args.vision_chunk_frames
    if args.prefill_chunk_tokens is not None:
        vlm_kwargs["prefill_chunk_tokens"] = args.prefill_chunk_tokens
    simulate = not args.measure
    if args.measure:
        _check_measurable(args.model, dtype, args.device)
    frame_hw = None
    if args.frame_size is not None:
        try:
            frame_hw = tuple(int(v) for v in args.frame_size.lower().split("x"))
        except ValueError:
            frame_hw = ()
        if len(frame_hw) != 2 or min(frame_hw) < 1:
            raise ValueError(f"--frame-size expects HxW (e.g. 448x448), got {args.frame_size!r}")
    prof = Profiler(args.model, dtype=dtype, simulate=simulate,
                    device=None if simulate else args.device, vlm_kwargs=vlm_kwargs,
                    strategy_overrides=overrides, inputs_on_device=args.frames_on_device,
                    model_overrides=model_overrides, frame_hw=frame_hw)
    frames = list(args.frames)
    # per-strategy extra frame counts (family default, only with the default frame list)
    extra = {k: sorted(set(v) - set(frames)) for k, v in fam_defaults.get(
        "extra_frames", {}).items() if k in strategies} if defaulted_frames else {}
    swept = {s: sorted({*frames, *extra.get(s, ())}) for s in strategies}
    stop = None if args.stop_above is None else int(args.stop_above * GIB)
    mode = "simulated (meta tensors, no weights)" if simulate else \
        f"measured on {prof.device} (random weights)"
    fh, fw = prof.frame_hw
    from lvlm_fast.profile.memory import LONG_VIDEO_FAMILIES

    video = f"a {PROFILE_VIDEO_HW[0]}x{PROFILE_VIDEO_HW[1]} video"
    frame_rule = ("set by --frame-size" if frame_hw is not None else
                  f"{video} resized by the processor's long-video per-frame cap, "
                  "cap_pixels_per_frame=True; --frame-size 448x448 for the per-frame rule"
                  if prof.family.name in LONG_VIDEO_FAMILIES else
                  f"{video} resized by the {prof.family.name} family's video-processor rule")
    print(f"lvlm-fast profile: {args.model}, {args.dtype}, {mode}; first answer token; "
          f"weights {prof.weight_bytes / GIB:.2f} GiB; frames {fh}x{fw} ({frame_rule})",
          flush=True)
    if model_overrides:
        print("model config: " + "; ".join(
            f"{k}={v}" + (f" (the {prof.family.name} profile's default; --model-set {k}=... "
                          "to change)" if k in defaulted else "")
            for k, v in model_overrides.items()))
    if overrides:
        print("strategy knobs: " + "; ".join(
            f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in overrides.items()))

    def progress(row: dict[str, Any]) -> None:
        if not args.quiet:
            print(f"  {row['strategy']:>12} {row['frames']:>6} frames: "
                  f"{row['peak_bytes'] / GIB:7.2f} GiB  ({row['llm_tokens']} LLM tokens, "
                  f"{row['seconds']:.1f}s)", flush=True)

    rows = prof.sweep(strategies, frames, stop_above_bytes=stop, on_row=progress)
    for s_name, more in extra.items():
        if s_name not in prof.unsupported and more:
            rows += prof.sweep([s_name], more, stop_above_bytes=stop, on_row=progress)
    frames = sorted({*frames, *(n for more in extra.values() for n in more)})
    if len(prof.unsupported) == len(strategies):
        raise ValueError(f"no selected strategy runs on {args.model}: " + "; ".join(
            f"{k}: {v}" for k, v in prof.unsupported.items()))
    # strategies this family does not support: out of the table, plot and searches
    strategies = [s for s in strategies if s not in prof.unsupported]
    print()
    print(format_table(rows, strategies, frames))
    notes: list[str] = []
    stopped = {}
    for s in strategies:
        ran = [r for r in rows if r["strategy"] == s]
        if ran and len(ran) < len(swept[s]):
            stopped[s] = ran[-1]["frames"]
            notes.append(f"{s}: not run above {ran[-1]['frames']} frames (peak "
                         f"{ran[-1]['peak_bytes'] / GIB:.1f} GiB > --stop-above "
                         f"{args.stop_above:g} GiB)")
    print()
    last = {r["strategy"]: r for r in rows}  # last row per strategy
    print("at the largest frame count run: peak = weights + input frames/ids (counted: "
          f"{'yes' if args.frames_on_device else 'no'}) + pass peak")
    for s in strategies:
        if s in last:
            r = last[s]
            w, i, ps = (r[k] / GIB for k in ("weight_bytes", "input_bytes", "pass_peak_bytes"))
            if r["inputs_counted"]:
                host = (r["peak_bytes"] - r["input_bytes"]) / GIB
                split = f"{w:.2f} + {i:.2f} + {ps:.2f}; {host:.2f} GiB with frames in host memory"
            else:
                split = (f"{w:.2f} + {ps:.2f} (frames: {i:.2f} GiB in host memory, not counted; "
                         f"{(r['peak_bytes'] + r['input_bytes']) / GIB:.2f} GiB with all frames "
                         "on the device)")
            print(f"  {s:>12} @ {r['frames']:>6}: {r['peak_bytes'] / GIB:7.2f} GiB = {split}")
    for s, why in prof.unsupported.items():
        notes.append(f"{s}: not supported on {args.model} ({why})")
    for n in notes:
        print("note: " + n)
    for part, label in prof.kernel_models.items():
        print(f"simulated kernel: {part}: {label} (lvlm_fast/profile/kernel_standins.py; "
              "no GPU ran it)")

    searches: list[dict[str, Any]] = []
    # Where each strategy passes each GPU-size line inside the swept range.
    try:
        crossings = [float(v) for v in args.crossings.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--crossings expects comma-separated GiB values, got "
                         f"{args.crossings!r}") from None
    for line in crossings:
        budget = int(line * GIB)
        for s in strategies:
            ran = [r for r in rows if r["strategy"] == s]
            if not ran or ran[0]["peak_bytes"] > budget or ran[-1]["peak_bytes"] <= budget:
                continue
            fit, _ = prof.largest_fitting(s, budget, [r["frames"] for r in ran])
            searches.append({"kind": "crossing", "strategy": s, "gib": line,
                             "largest_fitting_frames": fit, "passes_at_frames": fit + 1,
                             "peak_bytes_at_pass": prof.run(s, fit + 1)["peak_bytes"]})
            print(f"{s}: passes {line:g} GiB at {fit + 1} frames "
                  f"({prof.run(s, fit + 1)['peak_bytes'] / GIB:.2f} GiB; "
                  f"{fit} frames: {prof.run(s, fit)['peak_bytes'] / GIB:.2f} GiB)")
    if args.budget is not None:
        budget = int(args.budget * GIB)
        print(f"\nlargest frame count within --budget {args.budget:g} GiB "
              f"(search range 1..{max(frames)}):")
        for s in strategies:
            ran = [r["frames"] for r in rows if r["strategy"] == s]
            fit, capped = prof.largest_fitting(s, budget, ran or frames)
            if fit is None:
                one = prof.run(s, 1)
                chunk = one.get("vision_chunk_frames")
                raise ValueError(
                    f"--budget {args.budget:g} GiB is too small for strategy {s!r}: one frame "
                    f"(less than one vision chunk of {chunk} frames) already needs "
                    f"{one['peak_bytes'] / GIB:.2f} GiB (weights "
                    f"{one['weight_bytes'] / GIB:.2f} GiB + working memory "
                    f"{(one['peak_bytes'] - one['weight_bytes']) / GIB:.2f} GiB)")
            searches.append({"kind": "budget", "strategy": s, "gib": args.budget,
                             "largest_fitting_frames": fit, "capped": capped})
            print(f"  {s:>12}: {'>= ' if capped else ''}{fit} frames"
                  + (" (fits at every swept count)" if capped else ""))

    wall = time.perf_counter() - t_start
    title = (f"{args.model}, {args.dtype}, {'simulated' if simulate else 'measured'}, "
             f"{fh}x{fw} frames: peak memory to the first answer token")
    stem = f"profile_{args.model}"
    csv_path = args.csv or os.path.join(args.out_dir, stem + ".csv")
    write_csv(csv_path, rows)
    written = [csv_path]
    if not args.no_plot:
        png_path = args.png or os.path.join(args.out_dir, stem + ".png")
        write_plot(png_path, rows, strategies, title=title,
                   crossings=[c for c in searches if c["kind"] == "crossing"])
        written.append(png_path)
    if args.json:
        import torch

        meta = {"command": "lvlm-fast profile " + " ".join(args.argv), "model": args.model,
                "dtype": args.dtype, "simulated": simulate, "device": str(prof.device),
                "frame_size": list(prof.frame_hw), "video_size": list(PROFILE_VIDEO_HW),
                "family": prof.family.name,
                "weight_bytes": prof.weight_bytes, "strategies": strategies, "frames": frames,
                "strategy_overrides": overrides, "vlm_kwargs": vlm_kwargs,
                "model_overrides": model_overrides, "kernel_models": dict(prof.kernel_models),
                "inputs_counted": args.frames_on_device, "stop_above_gib": args.stop_above,
                "stopped": stopped, "unsupported": dict(prof.unsupported),
                "wall_seconds": round(wall, 1),
                "torch": torch.__version__, "python": platform.python_version(),
                "peak_definition": "weights + buffers + input frames/ids on the device + peak "
                                   "of tensors allocated during first_token (see "
                                   "lvlm_fast/profile/memory.py)"}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"metadata": meta, "rows": rows, "searches": searches}, f, indent=1)
        written.append(args.json)
    if args.breakdown:
        for s in strategies:
            ran = [r for r in rows if r["strategy"] == s]
            if not ran:
                continue
            row = prof.run(s, ran[-1]["frames"], breakdown=args.breakdown)
            print(f"\n{s} @ {row['frames']} frames: peak {row['peak_bytes'] / GIB:.2f} GiB = "
                  f"weights {row['weight_bytes'] / GIB:.2f} + inputs "
                  f"{row['input_bytes'] / GIB if row['inputs_counted'] else 0:.2f} + pass "
                  f"{row['pass_peak_bytes'] / GIB:.2f}; largest tensors alive at the pass peak:")
            for b in row["breakdown"]:
                print(f"  {b['nbytes'] / GIB:8.3f} GiB {b['dtype']:>9} {b['shape']!s:<26} "
                      f"{b['op']:<28} {b['where']}")
    print("\nwrote " + ", ".join(written) + f"  (wall time {wall:.0f}s)")
    return 0


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Entry point used by ``lvlm_fast.cli``: clear one-line errors for bad input."""
    args.argv = list(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"lvlm-fast profile: error: {exc}", file=sys.stderr)
        return 2
