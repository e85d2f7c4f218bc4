"""Smoke tests of the benchmark harness (benchmarks/run.py + benchmarks/harness.py).

A tiny case set in a temporary directory exercises: row fields, speedups, bandwidth
fraction, CSV/JSON output, --op filtering (other modules not even asked for cases), lazy
shared inputs (built once per group, released after), skipped impls, output verification
(a wrong impl is reported), peak tracking, and the --gpu-bw estimate column. One subprocess
run of the real ViLAMP cases with --quick checks the committed case modules still work.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import harness, run  # noqa: E402

TOY = """
import torch
from benchmarks.harness import Case, Lazy, skipped

OPS = ("toy_sum",)

def summarize(rows):
    return [f"toy: {len(rows)} rows, {len({r['shape'] for r in rows})} shapes"]

BUILT = []
RELEASED = []
TEMP_BYTES = 4 << 20

def _build(n, d):
    BUILT.append((n, d))
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))

def cases(quick, device):
    out = []
    for n, d in [(64, 256), (32, 128)]:
        inp = Lazy(lambda n=n, d=d: _build(n, d))
        common = dict(op="toy_sum", shape=f"N={n},D={d}", dtype="fp32", bytes=n * d * 4,
                      track_peak=True, setup=inp.get,
                      teardown=lambda inp=inp, n=n: (RELEASED.append(n), inp.release()))

        def fused(inp=inp):
            tmp = torch.empty(TEMP_BYTES // 4)  # a known temporary for the peak tracker
            tmp.fill_(0)
            return inp.get().sum(1)

        def reference(inp=inp):
            return inp.get().sum(1)

        def seed(inp=inp):
            x = inp.get()
            return torch.stack([sum(float(v) for v in row) * torch.ones(()) for row in x])

        def wrong(inp=inp):
            return inp.get().sum(1) + 1.0

        out += [Case(impl="fused", fn=fused, note="toy note", **common),
                Case(impl="reference", fn=reference, **common),
                Case(impl="seed", fn=seed, rtol=1e-4, atol=1e-3,
                     **{k: v for k, v in common.items()}),
                Case(impl="wrong", fn=wrong, **common),
                skipped("toy_sum", "missing", f"N={n},D={d}", "fp32", "not built here")]
    return out
"""

OTHER = """
OPS = ("toy_other",)
def cases(quick, device):
    raise AssertionError("--op filtering must not ask this module for cases")
"""


def _tracker_available() -> bool:
    return importlib.util.find_spec("lvlm_fast.profile.tracker") is not None


@pytest.fixture()
def toy_dir(tmp_path):
    d = tmp_path / "cases"
    d.mkdir()
    (d / "toy_sum.py").write_text(textwrap.dedent(TOY))
    (d / "toy_other.py").write_text(textwrap.dedent(OTHER))
    return d


def _run_toy(toy_dir, tmp_path, *extra):
    js, cs = tmp_path / "out.json", tmp_path / "out.csv"
    rc = run.main(
        [
            "--cases-dir",
            str(toy_dir),
            "--quick",
            "--bw-mib",
            "16",
            "--op",
            "toy_sum",
            "--json",
            str(js),
            "--csv",
            str(cs),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(js.read_text()), list(csv.DictReader(cs.open()))


def test_rows_fields_speedups_and_files(toy_dir, tmp_path, capsys):
    data, csv_rows = _run_toy(toy_dir, tmp_path)
    printed = capsys.readouterr().out
    meta, rows = data["metadata"], data["rows"]
    # 2 shapes x 4 runnable impls; the skipped impl makes no row
    assert len(rows) == 8 and len(csv_rows) == 8
    for r in rows:
        assert tuple(r) == harness.ROW_FIELDS + harness.PROBE_FIELDS
        assert r["device"] == "cpu" and r["op"] == "toy_sum" and r["dtype"] == "fp32"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        # the denominator is the group's own probe, interleaved with its timed rounds
        assert r["probe_read_gbps"] > 0 and r["probe_gemm_gflops"] > 0
        assert r["bw_fraction"] == pytest.approx(r["gbps"] / r["probe_read_gbps"])
        same = [o for o in rows if o["shape"] == r["shape"]]
        assert {o["probe_read_gbps"] for o in same} == {r["probe_read_gbps"]}
    assert len({r["probe_read_gbps"] for r in rows}) == 2  # one probe median per group
    assert list(csv_rows[0]) == list(harness.ROW_FIELDS + harness.PROBE_FIELDS)
    for shape in ("N=64,D=256", "N=32,D=128"):
        by = {r["impl"]: r for r in rows if r["shape"] == shape}
        assert set(by) == {"fused", "reference", "seed", "wrong"}
        f, ref, seed = by["fused"], by["reference"], by["seed"]
        assert f["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / f["median_ms"])
        assert f["speedup_vs_seed"] == pytest.approx(seed["median_ms"] / f["median_ms"])
        assert ref["speedup_vs_reference"] is None and seed["speedup_vs_seed"] is None
        assert ref["speedup_vs_seed"] == pytest.approx(seed["median_ms"] / ref["median_ms"])
        # (no assertion on which impl is faster: wall times on a shared 2-core CI machine
        # are preemptible, and the ratio definitions above are what the harness owns)
        c = next(r for r in csv_rows if r["shape"] == shape and r["impl"] == "reference")
        assert c["speedup_vs_reference"] == ""  # empty, not "None"
        assert float(c["median_ms"]) == pytest.approx(ref["median_ms"])
        if _tracker_available():
            assert by["fused"]["peak_bytes"] >= 4 << 20
        else:
            assert by["fused"]["peak_bytes"] is None
    assert meta["read_bandwidth_gbps"] > 0 and "torch.sum" in meta["read_bandwidth_method"]
    assert meta["repeats"] == 3 and meta["quick"] is True
    assert meta["fields"] == list(harness.ROW_FIELDS + harness.PROBE_FIELDS)
    assert "probe_read_gbps" in meta["fraction_method"]
    assert {s["impl"] for s in meta["skipped"]} == {"missing"}
    assert any("toy note" in n for n in meta["notes"])
    assert meta["derived"] == ["toy: 8 rows, 2 shapes"]  # the module's summarize() hook
    assert "toy: 8 rows, 2 shapes" in printed
    verdict = {(v["shape"], v["impl"]): v["result"] for v in meta["verify"]}
    assert verdict[("N=64,D=256", "fused")] == "ok"
    assert verdict[("N=64,D=256", "seed")] == "ok"
    assert verdict[("N=64,D=256", "wrong")].startswith("MISMATCH")
    assert "read bandwidth" in printed and "median ms" in printed and "x seed" in printed
    assert "output mismatch" in printed


def test_inputs_built_once_per_group_and_released(toy_dir, tmp_path):
    _run_toy(toy_dir, tmp_path)
    mod = sys.modules["_bench_cases_toy_sum"]
    assert sorted(mod.BUILT) == [(32, 128), (64, 256)]  # once per group, not per impl
    # every runnable case's teardown ran (the skipped one is never set up)
    assert sorted(mod.RELEASED) == sorted([64] * 4 + [32] * 4)


def test_gpu_roofline_estimate_column(toy_dir, tmp_path):
    data, csv_rows = _run_toy(toy_dir, tmp_path, "--gpu-bw", "2000", "--repeats", "1")
    for r in data["rows"]:
        assert r[harness.GPU_EST_FIELD] == pytest.approx(r["bytes"] / 2000e9 * 1e3)
    assert harness.GPU_EST_FIELD in csv_rows[0]
    assert "estimate" in data["metadata"]["gpu_roofline_note"]
    assert data["metadata"]["repeats"] == 1


def test_case_repeats_caps_its_group():
    calls = []
    c = harness.Case(op="t", impl="fused", shape="s", dtype="fp32", verify=False, repeats=2,
                     fn=lambda: calls.append(1) or time.sleep(0.6))
    rows, _ = harness.run_group([c], "cpu", repeats=5)
    # one warm-up call (slow enough to need no calibration) + 2 timed rounds, not 5
    assert len(calls) == 3 and rows[0]["median_ms"] >= 600


def test_unknown_op_fails(toy_dir):
    assert run.main(["--cases-dir", str(toy_dir), "--quick", "--op", "nope"]) == 2


def test_quantile_matches_numpy_default():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert harness._quantile(xs, 0.2) == pytest.approx(1.8)
    assert harness._quantile(xs, 0.5) == 3.0
    assert harness._quantile([7.0], 0.8) == 7.0


def test_real_vilamp_cases_quick(tmp_path):
    js = tmp_path / "v.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "run.py"),
        "--quick",
        "--op",
        "diff_weighted_pool",
        "keyframe_select",
        "--repeats",
        "1",
        "--bw-mib",
        "16",
        "--json",
        str(js),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(js.read_text())
    rows, meta = data["rows"], data["metadata"]
    impls = {(r["op"], r["impl"]) for r in rows}
    skipped = {(s["op"], s["impl"]) for s in meta["skipped"]}
    for op in ("diff_weighted_pool", "keyframe_select"):
        assert (op, "seed") in impls
        for impl in ("fused", "reference"):
            assert (op, impl) in impls or (op, impl) in skipped
    assert ("diff_weighted_pool", "fused") in impls
    # every impl that ran agrees with the reference on the quick shapes
    assert all(v["result"] == "ok" for v in meta["verify"]), meta["verify"]
    dwp = next(r for r in rows if r["op"] == "diff_weighted_pool" and r["impl"] == "fused")
    assert dwp["speedup_vs_seed"] is not None and dwp["bytes"] > 0
