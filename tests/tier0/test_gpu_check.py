"""`make gpu-check` (benchmarks/gpu_check.py): without CUDA one line and exit 0; the parts
that do not need a GPU (file names, the simulation-error computation, the profile plumbing on
a tiny config measured on the CPU) are tested here."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_one_line_and_exit_0():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd="/",
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [_gc().NO_CUDA_LINE]


def test_make_gpu_check_runs_the_script():
    r = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "benchmarks/gpu_check.py" in r.stdout
    assert "TORCH_SPEC" not in r.stdout and "torch==" not in r.stdout  # keeps the GPU torch


def test_result_file_names():
    gc = _gc()
    assert gc.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gc.gpu_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert gc.gpu_slug("  /// ") == "unknown-gpu"
    p = gc.result_paths("NVIDIA A100-SXM4-80GB", "/r")
    assert p == {"csv": "/r/gpu_nvidia-a100-sxm4-80gb.csv",
                 "json": "/r/gpu_nvidia-a100-sxm4-80gb.json",
                 "profile": "/r/gpu_nvidia-a100-sxm4-80gb_profile.csv"}


def test_sim_error_pct_and_fit():
    gc = _gc()
    assert gc.sim_error_pct(110, 100) == pytest.approx(10.0)
    assert gc.sim_error_pct(90, 100) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="measured peak"):
        gc.sim_error_pct(1, 0)
    gib = 2**30
    assert gc.frames_that_fit({128: 17 * gib, 1024: 28 * gib, 4096: 70 * gib}, 80 * gib) \
        == [128, 1024]  # 70 GiB > 0.85 * 80 GiB = 68


def test_add_gpu_column(tmp_path):
    gc = _gc()
    p = tmp_path / "b.csv"
    p.write_text("op,median_ms\nx,1.5\ny,2\n")
    gc.add_gpu_column(str(p), "NVIDIA H100")
    rows = list(csv.DictReader(p.open()))
    assert rows == [{"gpu": "NVIDIA H100", "op": "x", "median_ms": "1.5"},
                    {"gpu": "NVIDIA H100", "op": "y", "median_ms": "2"}]


@pytest.mark.parametrize("total_bytes,measured", [(2**50, True), (0, False)])
def test_profile_worker_end_to_end_on_cpu(tmp_path, total_bytes, measured):
    """The GPU step's worker, on a tiny config measured on the CPU: simulated and measured
    rows come back, and the comparison carries the error in percent (or says why not)."""
    gc = _gc()
    spec = gc.worker_spec("tiny-llava-onevision", (2, 4), ("full",), total_bytes, "cpu")
    r = subprocess.run([sys.executable, SCRIPT, "--profile-worker", spec], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sim, meas = gc.parse_worker_output(r.stdout)
    assert set(sim) == {("full", 2), ("full", 4)}
    assert set(meas) == (set(sim) if measured else set())
    rows = gc.compare_rows("cpu-test", sim, meas)
    out = tmp_path / "p.csv"
    gc.write_rows(str(out), rows, gc.PROFILE_FIELDS)
    got = list(csv.DictReader(out.open()))
    assert [int(g["frames"]) for g in got] == [2, 4]
    for g, key in zip(got, sorted(sim), strict=True):
        if measured:
            want = gc.sim_error_pct(sim[key]["peak_bytes"], meas[key]["peak_bytes"])
            assert float(g["sim_error_pct"]) == pytest.approx(want, abs=0.01)
            assert int(g["measured_peak_bytes"]) == meas[key]["peak_bytes"]
        else:
            assert g["sim_error_pct"] == "" and "not measured" in g["note"]
