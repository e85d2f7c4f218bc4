#!/usr/bin/env python3
"""``make gpu-check``: everything that needs a CUDA GPU, in one command (about 10 minutes on
one H100-class GPU; every step has its own timeout and the whole run a total budget).

1. install the package with its test extras into THIS interpreter, keeping the machine's
   (CUDA) torch: ``pip install --no-build-isolation -e .[test]`` (no CPU torch pin);
2. tier 3 (CUDA numerics and speed);
3. the GPU microbenchmarks, ``benchmarks/run.py --device cuda``, written to
   ``benchmarks/results/gpu_<gpu-name-slug>.{csv,json}`` with a ``gpu`` column;
4. the peak memory of a real-size config (``llava-onevision-qwen2-7b``, bf16, random
   weights) MEASURED on the GPU (allocator peak) at the frame counts whose simulated peak
   fits, against the SIMULATED peak for the same config: the simulation's error in percent,
   written to ``benchmarks/results/gpu_<slug>_profile.csv``.

Then a short summary. Without a CUDA GPU it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py [--no-install] [--budget-s 570]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

PROFILE_MODEL = "llava-onevision-qwen2-7b"
PROFILE_STRATEGIES = ("full", "videoxl")
PROFILE_FRAMES = (128, 512, 1024)
# Measure only where the SIMULATED peak leaves this share of the GPU free (allocator
# fragmentation and the CUDA context are not in the simulation).
FIT_FRACTION = 0.85
# Seconds per step; their sum is the 10-minute budget (the install is a no-op when current).
STEP_TIMEOUT_S = {"install": 150, "tier3": 150, "bench": 120, "profile": 180}
NO_CUDA_LINE = "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to do"


# -- pure helpers (tested on CPU in tests/tier0/test_gpu_check.py) ----------------------------
def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (safe in a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def result_paths(gpu_name: str, results_dir: str = RESULTS) -> dict[str, str]:
    slug = gpu_slug(gpu_name)
    return {"csv": os.path.join(results_dir, f"gpu_{slug}.csv"),
            "json": os.path.join(results_dir, f"gpu_{slug}.json"),
            "profile": os.path.join(results_dir, f"gpu_{slug}_profile.csv")}


def sim_error_pct(simulated_bytes: int, measured_bytes: int) -> float:
    """The simulation's error relative to the measurement, in percent (positive: the
    simulation over-estimates)."""
    if measured_bytes <= 0:
        raise ValueError(f"measured peak must be > 0 bytes, got {measured_bytes}")
    return 100.0 * (simulated_bytes - measured_bytes) / measured_bytes


def frames_that_fit(sim_peaks: dict[int, int], total_bytes: int,
                    fraction: float = FIT_FRACTION) -> list[int]:
    """Frame counts (ascending) whose simulated peak is within ``fraction`` of the GPU."""
    return sorted(n for n, peak in sim_peaks.items() if peak <= fraction * total_bytes)


def add_gpu_column(csv_path: str, gpu_name: str) -> None:
    """Prepend a ``gpu`` column (the device name) to every row of a results CSV."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = ["gpu", *[k for k in (rows[0].keys() if rows else []) if k != "gpu"]]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "gpu": gpu_name})


PROFILE_FIELDS = ("gpu", "model", "strategy", "frames", "dtype", "simulated_peak_bytes",
                  "measured_peak_bytes", "sim_error_pct", "measured_seconds", "note")


def compare_rows(gpu_name: str, sim: dict[tuple[str, int], dict[str, Any]],
                 meas: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per simulated (strategy, frames); measured columns empty where not measured."""
    out = []
    for key in sorted(sim):
        s, m = sim[key], meas.get(key)
        row = {"gpu": gpu_name, "model": s["model"], "strategy": key[0], "frames": key[1],
               "dtype": s["dtype"], "simulated_peak_bytes": s["peak_bytes"],
               "measured_peak_bytes": "", "sim_error_pct": "", "measured_seconds": "",
               "note": "" if m else "not measured (does not fit, or out of time)"}
        if m is not None:
            row.update(measured_peak_bytes=m["peak_bytes"],
                       sim_error_pct=round(sim_error_pct(s["peak_bytes"], m["peak_bytes"]), 2),
                       measured_seconds=m["seconds"], note="")
        out.append(row)
    return out


def write_rows(path: str, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


# -- steps -------------------------------------------------------------------------------------
def _cuda_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _step(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
          capture: bool = False) -> tuple[str, str]:
    """Run one step; returns (status, captured stdout). status: ok / FAIL (rc) / TIMEOUT."""
    print(f"\n===== gpu-check: {' '.join(cmd)} (timeout {timeout:.0f}s)", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout,
                           stdout=subprocess.PIPE if capture else None, text=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        return "TIMEOUT", out if isinstance(out, str) else out.decode()
    return ("ok" if r.returncode == 0 else f"FAIL (rc {r.returncode})"), (r.stdout or "")


def _run_all_module():
    spec = importlib.util.spec_from_file_location("run_all",
                                                  os.path.join(ROOT, "tests", "run_all.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod
    spec.loader.exec_module(mod)
    return mod


def profile_worker(model: str, frames: list[int], strategies: list[str], total_bytes: int,
                   device: str = "cuda") -> int:
    """Subprocess body: one JSON line per simulated and per measured row, flushed as it
    goes, so a timeout in the parent keeps every row finished before it. (``device`` is
    "cuda" in gpu-check; the CPU tests run the same code on a tiny config.)"""
    import torch

    from lvlm_fast.profile.memory import Profiler

    sim = Profiler(model, dtype=torch.bfloat16, simulate=True)
    for strat in strategies:
        peaks = {}
        for n in frames:
            row = sim.run(strat, n)
            peaks[n] = row["peak_bytes"]
            print("SIM " + json.dumps(row), flush=True)
        fit = frames_that_fit(peaks, total_bytes)
        if not fit:
            continue
        # A fresh measured profiler per strategy: its random 7B weights are freed after.
        meas = Profiler(model, dtype=torch.bfloat16, simulate=False, device=device)
        for n in fit:
            print("MEAS " + json.dumps(meas.run(strat, n)), flush=True)
        del meas
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


def worker_spec(model: str, frames: tuple[int, ...] | list[int],
                strategies: tuple[str, ...] | list[str], total_bytes: int, device: str) -> str:
    return (f"{model};{','.join(map(str, frames))};{','.join(strategies)};{total_bytes};"
            f"{device}")


def parse_worker_output(text: str) -> tuple[dict, dict]:
    sim, meas = {}, {}
    for line in text.splitlines():
        tag, _, payload = line.partition(" ")
        if tag in ("SIM", "MEAS"):
            row = json.loads(payload)
            (sim if tag == "SIM" else meas)[(row["strategy"], int(row["frames"]))] = row
    return sim, meas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-install", action="store_true", help="skip the pip install step")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="total seconds for all steps (default 570)")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--profile-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile_worker:  # internal: "model;frames;strategies;total_bytes;device"
        model, fr, st, tot, dev = args.profile_worker.split(";")
        return profile_worker(model, [int(x) for x in fr.split(",")], st.split(","), int(tot),
                              dev)

    name = _cuda_name()
    if name is None:
        print(NO_CUDA_LINE)
        return 0
    t0 = time.monotonic()

    def left(step: str) -> float:
        return max(1.0, min(STEP_TIMEOUT_S[step], args.budget_s - (time.monotonic() - t0)))

    py = sys.executable
    status: dict[str, str] = {}
    if not args.no_install:
        # No torch pin here: the machine's CUDA torch already satisfies ``torch>=...``.
        status["install"], _ = _step([py, "-m", "pip", "install", "-q", "--no-build-isolation",
                                      "-e", ".[test]"], left("install"))
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    print(f"gpu-check: {name}, {total / 2**30:.0f} GiB, torch {torch.__version__}", flush=True)
    paths = result_paths(name, args.results_dir)

    ra = _run_all_module()
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "tier3.xml")
        status["tier3"], _ = _step([py, "-m", "pytest", "-q", f"--junitxml={xml}",
                                    "tests/tier3"], left("tier3"))
        try:
            tier3 = ra.junit_counts(xml).line("tier3")
        except (OSError, ra.ET.ParseError):
            tier3 = "tier3: no report"

    status["bench"], _ = _step([py, "benchmarks/run.py", "--device", "cuda", "--repeats", "3",
                                "--csv", paths["csv"], "--json", paths["json"]], left("bench"))
    if os.path.exists(paths["csv"]):
        add_gpu_column(paths["csv"], name)

    spec = worker_spec(PROFILE_MODEL, PROFILE_FRAMES, PROFILE_STRATEGIES, total, "cuda")
    status["profile"], out = _step([py, os.path.abspath(__file__), "--profile-worker", spec],
                                   left("profile"), capture=True)
    sim, meas = parse_worker_output(out)
    rows = compare_rows(name, sim, meas)
    if rows:
        write_rows(paths["profile"], rows, PROFILE_FIELDS)

    print(f"\n===== gpu-check summary: {name} ({time.monotonic() - t0:.0f}s)")
    for k, v in status.items():
        print(f"  {k:8s} {v}")
    print(f"  {tier3}")
    print(f"  benchmarks -> {os.path.relpath(paths['csv'], ROOT)}")
    for r in rows:
        got = (f"measured {int(r['measured_peak_bytes']) / 2**30:.2f} GiB, simulation error "
               f"{r['sim_error_pct']:+.1f}%" if r["measured_peak_bytes"] != "" else r["note"])
        print(f"  profile {r['strategy']:8s} {r['frames']:5d} frames: simulated "
              f"{int(r['simulated_peak_bytes']) / 2**30:.2f} GiB, {got}")
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
