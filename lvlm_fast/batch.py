"""``lvlm-fast batch``: answer questions about many videos, data-parallel with accelerate.

    lvlm-fast batch MANIFEST.jsonl --model PATH --out DIR [--strategy NAME] [--set K=V ...]
                    [--frames N | --fps F] [--max-new-tokens N] [--budget BYTES] ...
    accelerate launch --num_processes 8 -m lvlm_fast.cli batch MANIFEST.jsonl ...

Manifest: one JSON object per line, ``{"video": PATH, "questions": ["...", ...]}`` (or
``"question": "..."``), optional ``"id"`` (default: the line number). A relative video
path is relative to the manifest's folder. Each line's video is decoded once and every
question about it is answered with the same frames (:class:`lvlm_fast.models.pipeline.VideoQA`,
the pipeline of ``lvlm-fast run``).

Processes. Launched plain, one process does every line. Under ``accelerate launch`` (any
number of processes, GPUs or nodes) each process holds one model replica (data parallel)
on its own device (``accelerate.PartialState``) and takes the lines ``i`` with
``i % num_processes == process_index`` of the lines still to do. One model too big for one
GPU (``device_map`` sharding) is refused: the wrapper runs a model on one device.

Output, as it goes: ``DIR/parts/rank-<R>.jsonl``, one record per manifest line, flushed
and fsync'ed line by line: the answers (with their token counts), frames read, LLM tokens,
peak memory and seconds per stage, or ``"status": "error"`` with the error (a missing or
corrupt video, too many frames, ...; the job goes on). Resume: a rerun (any number of
processes) skips every line that has a record in ``DIR/parts`` (``--retry-errors`` redoes
the failed ones); a record cut by a crash is ignored, so its line is redone. A rerun into
the same ``DIR`` with another model, strategy, knob, frame count, fps, answer length or
dtype is refused (``DIR/run_config.json``): those records would not be its answers.

Merge (the main process, after every process is done): ``DIR/results.jsonl`` (one record
per manifest line, in manifest order) and ``DIR/summary.json``: lines, answered, failures
(with their errors), videos per hour (this run: lines done / wall time, all processes;
and per process: 3600 / mean seconds per line), peak memory percentiles (p50/p90/p99/max
over the answered lines), the strategy and its knobs.

Exit status: 0 when every line has a record (failed lines included: see the summary),
1 when some have none (a process died: rerun), 2 on a usage error (bad manifest path,
model, strategy or knob), printed as ``lvlm-fast batch: error: ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

PARTS = "parts"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run_config.json"


class BatchError(Exception):
    """A usage error: printed as ``lvlm-fast batch: error: ...``, exit status 2."""


# --------------------------------------------------------------------------- manifest
def read_manifest(path: str) -> list[dict[str, Any]]:
    """Every line of the manifest as ``{"index", "id", "video", "questions"}``, or with
    ``"error"`` for a line that is not a valid entry (recorded, not fatal). Blank lines are
    skipped (they keep no index)."""
    if not os.path.isfile(path):
        raise BatchError(f"manifest not found: {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        raw_lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    for i, line in enumerate(raw_lines):
        entry: dict[str, Any] = {"index": i, "id": str(i)}
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("a manifest line must be a JSON object")
            if "id" in d:
                entry["id"] = str(d["id"])
            video = d.get("video")
            if not isinstance(video, str) or not video:
                raise ValueError("needs \"video\": a path")
            qs = d.get("questions", [d["question"]] if "question" in d else None)
            if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip()
                                                             for q in qs):
                raise ValueError("needs \"questions\": a non-empty list of non-empty strings "
                                 "(or \"question\": a string)")
            entry["video"] = video if os.path.isabs(video) else os.path.join(base, video)
            entry["questions"] = qs
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            entry["error"] = f"manifest line {i + 1}: {exc}"
        out.append(entry)
    if not out:
        raise BatchError(f"manifest {path!r} has no lines")
    ids = [e["id"] for e in out]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise BatchError(f"manifest {path!r}: id {dup!r} appears more than once (ids name the "
                         "records a rerun skips)")
    return out


def read_records(out_dir: str) -> dict[str, dict[str, Any]]:
    """Records already written under ``out_dir/parts`` by id (a later record wins); a line
    cut by a crash (not valid JSON) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    parts = os.path.join(out_dir, PARTS)
    if not os.path.isdir(parts):
        return done
    for name in sorted(os.listdir(parts)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(parts, name), encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and "id" in r:
                    done[str(r["id"])] = r
    return done


# --------------------------------------------------------------------------- processes
class _Single:
    """Stand-in for ``accelerate.PartialState`` in a plain (one-process) launch."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    device = None

    def wait_for_everyone(self) -> None:
        pass


def process_state(device: str | None = None) -> Any:
    """``accelerate.PartialState`` (its rank, world size, device, barrier); a plain launch
    without accelerate installed is one process. CPU processes (``device`` cpu, no CUDA,
    or ``ACCELERATE_USE_CPU`` set) join a gloo group: accelerate picks its CPU backend only
    when told the run is on CPU."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BatchError("launched with several processes (WORLD_SIZE > 1) but accelerate "
                             "is not installed: pip install 'lvlm-fast[dist]'") from None
        return _Single()
    import torch

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available() \
        or (device is not None and str(device).startswith("cpu"))
    # the final barrier waits for the slowest share of a corpus: hours, not the default
    # 10-30 min collective timeout
    return PartialState(cpu=cpu, timeout=datetime.timedelta(days=7))


def shard(entries: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    """This process's share: every ``world``-th entry from ``rank`` (round robin keeps the
    shares within one line of each other)."""
    return entries[rank::world]


# --------------------------------------------------------------------------- work
def process_entry(qa: Any, entry: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One manifest line -> its record (never raises for a bad video: the error is kept)."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"index": entry["index"], "id": entry["id"],
                           "video": entry.get("video"), "questions": entry.get("questions")}
    if "error" in entry:
        rec.update(status="error", error=entry["error"], error_type="ManifestError")
        return rec
    try:
        frames = qa.read(entry["video"], frames=args.frames, fps=args.fps)
        answers = [qa.answer(frames, q, max_new_tokens=args.max_new_tokens)
                   for q in entry["questions"]]
    except Exception as exc:  # a bad video or an OOM on one line must not stop the job
        rec.update(status="error", error=str(exc), error_type=type(exc).__name__,
                   seconds={"total": time.perf_counter() - t0})
        return rec
    seconds: dict[str, float] = dict(frames.seconds)
    for a in answers:
        for k, v in a["seconds"].items():
            if k not in frames.seconds:
                seconds[k] = seconds.get(k, 0.0) + v
    seconds["total"] = time.perf_counter() - t0
    rec.update(
        status="ok",
        answers=[{"question": q, "answer": a["answer"], "answer_ids": a["answer_ids"],
                  "answer_tokens": a["answer_tokens"], "llm_tokens": a["llm_tokens"],
                  "visual_tokens": a["visual_tokens"], "frames_encoded": a["frames_encoded"],
                  "peak_bytes": a["peak_bytes"], "warnings": a["warnings"],
                  "seconds": a["seconds"]}
                 for q, a in zip(entry["questions"], answers, strict=True)],
        frames_read=len(frames.indices), video_frames=frames.video_frames,
        peak_bytes=max(a["peak_bytes"] for a in answers),
        peak_source=answers[0]["peak_source"], seconds=seconds)
    return rec


def _percentiles(values: list[int]) -> dict[str, int | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 99)} | {"max": int(a.max())}


def merge(out_dir: str, entries: list[dict[str, Any]], *, wall_s: float,
          ids_this_run: list[str], processes: int, config: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.jsonl`` in manifest order and ``summary.json``; return the summary."""
    recs = read_records(out_dir)
    ordered = [recs[e["id"]] for e in entries if e["id"] in recs]
    missing = [e["id"] for e in entries if e["id"] not in recs]
    tmp = os.path.join(out_dir, RESULTS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in ordered:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(out_dir, RESULTS))  # readers never see half a file
    ok = [r for r in ordered if r.get("status") == "ok"]
    failed = [r for r in ordered if r.get("status") != "ok"]
    line_s = [r["seconds"]["total"] for r in ok if "seconds" in r]
    this_run = set(ids_this_run)
    ok_now = sum(r["id"] in this_run for r in ok)
    summary = {
        "lines": len(entries), "recorded": len(ordered), "answered": len(ok),
        "questions_answered": sum(len(r["answers"]) for r in ok),
        "failures": len(failed),
        "failed": [{"index": r["index"], "id": r["id"], "video": r.get("video"),
                    "error_type": r.get("error_type"), "error": r.get("error")}
                   for r in failed],
        "missing": missing,
        "processes": processes, "lines_this_run": len(this_run),
        "answered_this_run": ok_now, "wall_seconds_this_run": wall_s,
        # this run, all processes together: videos answered per hour of wall-clock time
        # (model loading and the merge included)
        "videos_per_hour": (3600.0 * ok_now / wall_s) if wall_s > 0 and ok_now else None,
        # one process: 3600 / mean seconds per answered line (model loading excluded)
        "videos_per_hour_per_process": (3600.0 * len(line_s) / sum(line_s))
        if line_s and sum(line_s) > 0 else None,
        "peak_bytes": _percentiles([r["peak_bytes"] for r in ok]),
        "peak_source": ok[0]["peak_source"] if ok else None,
        **config,
    }
    with open(os.path.join(out_dir, SUMMARY), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    return summary


def run_config(args: argparse.Namespace, strategy: Any) -> dict[str, Any]:
    """What decides the answers (not how fast they come): a rerun must match it."""
    return {"model": os.path.abspath(args.model), "strategy": strategy.name,
            "config": {k: v for k, v in vars(strategy.config).items()
                       if isinstance(v, (int, float, str, bool))},
            "frames": args.frames, "fps": args.fps, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype}


def check_run_config(out_dir: str, config: dict[str, Any], *, write: bool) -> None:
    """Resume only into a folder of the same configuration: records made with another
    strategy, frame count or model would be skipped as done and mixed into the results.
    The first run stores ``run_config.json`` (main process)."""
    path = os.path.join(out_dir, RUN_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        new = json.loads(json.dumps(config))  # compared as stored (tuples -> lists)
        if old != new:
            diff = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise BatchError(f"--out {out_dir!r} holds results of another configuration "
                             f"({diff}); use another --out folder, or the same options to "
                             "resume")
    elif write:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Do the work; the main process returns the summary, the others None."""
    from lvlm_fast.models import get_strategy
    from lvlm_fast.models.pipeline import VideoQA, check_sampling

    t_start = time.perf_counter()
    entries = read_manifest(args.manifest)
    knobs = dict(args.knobs)
    try:  # fail on a bad strategy/knob/sampling before loading anything
        strategy = get_strategy(args.strategy, **knobs)
        check_sampling(args.frames, args.fps)
    except (TypeError, ValueError) as exc:
        raise BatchError(str(exc)) from exc
    if args.max_new_tokens < 1:
        raise BatchError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.device_map is not None:
        raise BatchError(
            f"--device-map {args.device_map}: sharding one model over devices is not "
            "supported (LongVideoVLM runs a model on one device: chunked vision, one "
            "preallocated KV cache, fused attention); use one replica per GPU with "
            "`accelerate launch` (data parallel), a smaller --dtype, or a --budget/strategy "
            "that fits one GPU")
    state = process_state(args.device)
    rank, world = state.process_index, state.num_processes
    check_run_config(args.out, run_config(args, strategy), write=state.is_main_process)
    os.makedirs(os.path.join(args.out, PARTS), exist_ok=True)
    done = read_records(args.out)
    todo = [e for e in entries if e["id"] not in done
            or (args.retry_errors and done[e["id"]].get("status") != "ok")]
    mine = shard(todo, rank, world)
    # every process must shard the same to-do list: none writes before all have read
    state.wait_for_everyone()
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = args.device or (str(state.device) if state.device is not None else None)
    try:
        qa = VideoQA.load(args.model, args.strategy, knobs, dtype=args.dtype, device=device,
                          memory_budget_bytes=args.budget,
                          vision_chunk_frames=args.vision_chunk,
                          prefill_chunk_tokens=args.prefill_chunk,
                          decode_chunk=args.decode_chunk)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise BatchError(str(exc)) from exc
    part = os.path.join(args.out, PARTS, f"rank-{rank}.jsonl")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"rank {rank}/{world}", position=rank, unit="video",
               disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
    with open(part, "a+", encoding="utf-8") as fh:
        if fh.tell() > 0:  # a record cut by a crash has no newline: start a fresh line
            fh.seek(fh.tell() - 1)
            if fh.read(1) != "\n":
                fh.write("\n")
        for entry in mine:
            rec = process_entry(qa, entry, args)
            rec["rank"] = rank
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a crash loses at most the line being written
            bar.update(1)
            if rec["status"] != "ok":
                bar.write(f"lvlm-fast batch: line {entry['index'] + 1} ({entry['id']}): "
                          f"{rec['error_type']}: {rec['error']}", file=sys.stderr)
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    config = {"strategy": strategy.name, "model": args.model,
              "config": {k: v for k, v in vars(strategy.config).items()
                         if isinstance(v, (int, float, str, bool))},
              "frames": args.frames, "fps": args.fps, "max_new_tokens": args.max_new_tokens,
              "device": str(qa.device), "dtype": str(qa.vlm.dtype).replace("torch.", "")}
    return merge(args.out, entries, wall_s=time.perf_counter() - t_start,
                 ids_this_run=[e["id"] for e in todo], processes=world, config=config)


# --------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``batch`` on the ``lvlm-fast`` subcommand parser."""
    from lvlm_fast.models.command import parse_bytes, parse_knob

    p = sub.add_parser(
        "batch", help="answer questions about many videos (JSONL manifest), resumable, "
        "data-parallel under `accelerate launch`",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST.jsonl",
                   help="one JSON object per line: {\"video\": PATH, \"questions\": [...]}")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="local transformers checkpoint folder (any supported family) with "
                        "its tokenizer")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (parts/, results.jsonl, summary.json); reruns resume")
    p.add_argument("--strategy", default="full", metavar="NAME",
                   help="long-video strategy (default full)")
    p.add_argument("--set", dest="knobs", action="append", default=[], type=parse_knob,
                   metavar="KEY=VALUE", help="strategy knob override, repeatable")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=int, metavar="N", help="N uniformly spaced frames")
    g.add_argument("--fps", type=float, metavar="F", help="one frame every 1/F seconds")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="answer length limit (default 64; greedy, stops at EOS)")
    p.add_argument("--budget", type=parse_bytes, default=None, metavar="BYTES",
                   help="working-memory budget per chunk, e.g. 2GiB (default 1GiB)")
    p.add_argument("--vision-chunk", type=int, default=None, metavar="FRAMES",
                   help="frames per vision-tower chunk (overrides the budget)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="tokens per LLM prefill chunk (overrides the budget)")
    p.add_argument("--decode-chunk", type=int, default=64, metavar="FRAMES",
                   help="frames decoded from a file per chunk (default 64)")
    p.add_argument("--device", default=None,
                   help="device of this process (default: accelerate's device for the "
                        "process: cuda:<local rank>, else cpu)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="shard one model over devices: NOT supported (refused with an "
                        "error); use data parallelism")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: the checkpoint's on CUDA, float32 on CPU)")
    p.add_argument("--retry-errors", action="store_true",
                   help="redo the lines whose record is an error")
    p.add_argument("--progress", action="store_true",
                   help="also show transformers' weight-loading bar")
    p.add_argument("--quiet", action="store_true", help="no per-process tqdm bar")
    p.set_defaults(func=main_batch)
    return p


def main_batch(args: argparse.Namespace, _rest: list[str] | None = None) -> int:
    try:
        summary = run(args)
    except BatchError as exc:
        print(f"lvlm-fast batch: error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        vph = summary["videos_per_hour"]
        print(f"{summary['answered']} of {summary['lines']} lines answered, "
              f"{summary['failures']} failed"
              + (f", {vph:.0f} videos/hour this run" if vph else "")
              + f"; {os.path.join(args.out, RESULTS)}, {os.path.join(args.out, SUMMARY)}")
        if summary["missing"]:  # a process died before its share was done: rerun resumes
            print(f"lvlm-fast batch: {len(summary['missing'])} lines have no record yet; "
                  "rerun the same command to finish them", file=sys.stderr)
            return 1
    return 0
