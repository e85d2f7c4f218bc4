"""Measured throughput of ``lvlm-fast batch`` with the TINY random LLaVA-OneVision config on
this machine's CPU (not a real model: it measures the runner's own pipeline, decode,
preprocess, chunked vision/prefill and greedy decoding at toy sizes).

    python benchmarks/batch_tiny_cpu.py [--videos 16] [--out benchmarks/results/batch_tiny_cpu.json]

Writes a checkpoint (random weights, word-level tokenizer) and ``--videos`` generated
videos (64 frames, 128x160) to a temp folder, then runs the same manifest (2 questions a
video, 16 frames, 8 answer tokens) with 1 process and with ``accelerate launch`` of 2 CPU
processes (gloo), and stores both summaries (videos/hour, peak memory percentiles) with
the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tier0"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "batch_tiny_cpu.json"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from tiny_assets import accelerate_cmd, save_checkpoint, subprocess_env

    from lvlm_fast.video import write_video

    tmp = tempfile.mkdtemp(prefix="lvlm_batch_bench_")
    ckpt = save_checkpoint(os.path.join(tmp, "ckpt"), "llava")
    rng = np.random.default_rng(0)
    with open(os.path.join(tmp, "m.jsonl"), "w") as fh:
        for i in range(args.videos):
            p = os.path.join(tmp, f"v{i}.mp4")
            write_video(p, rng.integers(0, 255, (64, 128, 160, 3), dtype=np.uint8))
            fh.write(json.dumps({"video": p, "questions": ["w5 w7 w9", "w3 w4"]}) + "\n")
    flags = ["--model", ckpt, "--strategy", "full", "--frames", "16", "--max-new-tokens", "8",
             "--quiet"]
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1"}
    runs = {}
    for n in (1, 2):
        out = os.path.join(tmp, f"out{n}")
        launch = [sys.executable] if n == 1 else accelerate_cmd(n)
        cmd = [*launch, "-m", "lvlm_fast.cli", "batch", os.path.join(tmp, "m.jsonl"),
               *flags, "--out", out]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "summary.json")) as fh:
            s = json.load(fh)
        runs[f"{n}_process"] = {
            "command": " ".join(["lvlm-fast batch" if n == 1 else
                                 f"accelerate launch --multi_gpu --num_processes {n} -m "
                                 "lvlm_fast.cli batch", "MANIFEST.jsonl", *flags[2:],
                                 "--out", "DIR"]),
            "videos": s["lines"], "answered": s["answered"], "failures": s["failures"],
            "videos_per_hour": s["videos_per_hour"],
            "videos_per_hour_per_process": s["videos_per_hour_per_process"],
            "wall_seconds_incl_launch": wall, "wall_seconds_run": s["wall_seconds_this_run"],
            "peak_bytes": s["peak_bytes"], "peak_source": s["peak_source"]}
    result = {
        "what": "lvlm-fast batch throughput, TINY random LLaVA-OneVision config (toy model, "
                "not a real checkpoint), measured on this machine's CPU",
        "model_config": "tiny-llava-onevision", "strategy": "full",
        "video": "64 frames 128x160 mp4, 16 frames read, 2 questions, 8 answer tokens",
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads_per_process": 1,
                    "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared development machine (other jobs running): numbers are "
                            "indicative"},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    for k, r in runs.items():
        print(f"{k}: {r['videos_per_hour']:.0f} videos/hour (all processes, load included), "
              f"{r['videos_per_hour_per_process']:.0f} per process (model loaded)")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
