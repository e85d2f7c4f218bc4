#!/usr/bin/env python3
"""Run the lvlm-fast microbenchmarks: print a table, write CSV/JSON rows.

    python benchmarks/run.py --device cpu --json benchmarks/results/cpu.json \
        --csv benchmarks/results/cpu.csv                      # the committed results
    python benchmarks/run.py --quick --op diff_weighted_pool  # small shapes, one op

Cases come from every module in ``benchmarks/cases/`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import sys
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python benchmarks/run.py` from anywhere
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402


def discover(cases_dir: str | None = None) -> list[ModuleType]:
    """Import every case module: ``benchmarks.cases.*`` or the ``*.py`` files of a directory."""
    mods = []
    if cases_dir is None:
        import benchmarks.cases as pkg

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                mods.append(importlib.import_module(f"benchmarks.cases.{info.name}"))
        return mods
    for name in sorted(os.listdir(cases_dir)):
        if name.endswith(".py") and not name.startswith("_"):
            spec = importlib.util.spec_from_file_location(
                f"_bench_cases_{name[:-3]}", os.path.join(cases_dir, name)
            )
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
            mods.append(mod)
    return mods


def collect(
    mods: list[ModuleType], quick: bool, device: str, ops: list[str] | None
) -> list[harness.Case]:
    cases: list[harness.Case] = []
    for mod in mods:
        declared = getattr(mod, "OPS", None)
        if ops and declared is not None and not set(ops) & set(declared):
            continue  # do not even build this module's case list
        cases.extend(c for c in mod.cases(quick, device) if not ops or c.op in ops)
    return cases


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _build_info(device: str) -> dict:
    """How the CPU kernels were built and which ISA variant runs (lvlm_fast._extension)."""
    try:
        from lvlm_fast import _extension

        _extension.load_cpu_kernels()
        st = _extension.cpu_kernel_status()
        return {k: st.get(k) for k in ("loaded", "isa", "isa_built", "isa_supported",
                                        "isa_forced", "library")}
    except Exception as exc:  # the table still runs; the metadata says why this is missing
        return {"error": repr(exc)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", help="write rows + metadata here")
    p.add_argument("--csv", help="write rows here")
    p.add_argument("--op", nargs="+", action="extend", help="only these ops (case op names)")
    p.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default 7, quick 3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--bw-mib",
        type=int,
        help="buffer for the read-bandwidth probe (default 1024 MiB, quick 256)",
    )
    p.add_argument(
        "--gemm-n",
        type=int,
        help="size of the fp32 GEMM-rate probe, n x n @ n x n (default 2048, quick 512)",
    )
    p.add_argument(
        "--gpu-bw",
        type=float,
        metavar="GBPS",
        help="add gpu_roofline_ms_est = bytes / GBPS (an ESTIMATE, never measured)",
    )
    p.add_argument("--cases-dir", help="load case modules from this directory instead")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("run.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 7)
    bw_mib = args.bw_mib or (256 if args.quick else 1024)
    gemm_n = args.gemm_n or (512 if args.quick else 2048)

    mods = discover(args.cases_dir)
    cases = collect(mods, args.quick, args.device, args.op)
    if args.op:
        known = {c.op for c in cases}
        missing = [o for o in args.op if o not in known]
        if missing:
            print(f"run.py: no cases for op(s) {missing}", file=sys.stderr)
            if not cases:
                return 2

    # The denominators of bw_fraction / gemm_fraction are probed inside every group's timed
    # rounds (harness.Probes): one bandwidth and one GEMM probe call per round, the group's
    # medians. Standalone probes before and after the cases are kept as context (the
    # machine's drift over the run) in the metadata and the printout.
    print(f"device {args.device}  threads {torch.get_num_threads()}  torch {torch.__version__}")
    build = _build_info(args.device)
    print(f"build: {build}")
    load0 = _loadavg()
    bw0 = harness.measure_read_bandwidth(args.device, bw_mib)
    print(f"read bandwidth (before) {bw0['read_gbps']:.2f} GB/s ({bw0['method']})")
    gm0 = harness.measure_gemm_rate(args.device, gemm_n)
    print(f"fp32 GEMM rate (before) {gm0['gemm_gflops']:.1f} GFLOP/s ({gm0['method']})")
    probes = harness.Probes(args.device, bw_mib, gemm_n)
    res = harness.run(cases, args.device, repeats, None, args.gpu_bw, probes=probes)
    del probes
    bw1 = harness.measure_read_bandwidth(args.device, bw_mib)
    gm1 = harness.measure_gemm_rate(args.device, gemm_n)
    load1 = _loadavg()
    read_gbps = max(bw0["read_gbps"], bw1["read_gbps"])
    gemm_gflops = max(gm0["gemm_gflops"], gm1["gemm_gflops"])
    print(f"read bandwidth (after) {bw1['read_gbps']:.2f} GB/s")
    print(f"fp32 GEMM rate (after) {gm1['gemm_gflops']:.1f} GFLOP/s")
    print("bw_fraction / gemm_fraction: against each group's own probes (rounds interleaved)")
    print(f"load average (1 min) before / after: {load0} / {load1}")
    print()
    print(harness.format_table(res.rows))
    derived = []  # figures a case module computes from several rows (e.g. a growth rate)
    for mod in mods:
        if hasattr(mod, "summarize"):
            derived.extend(mod.summarize(res.rows))
    for line in derived:
        print(line)
    if args.gpu_bw:
        print(
            f"\n{harness.GPU_EST_FIELD}: bytes / {args.gpu_bw:g} GB/s -- a roofline ESTIMATE, "
            "not a measured GPU time"
        )

    fields = list(harness.ROW_FIELDS) + list(harness.PROBE_FIELDS) + \
        ([harness.GPU_EST_FIELD] if args.gpu_bw else [])
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "repeats": repeats,
        "read_bandwidth_gbps": read_gbps,
        "read_bandwidth_probes_gbps": [bw0["read_gbps"], bw1["read_gbps"]],
        "read_bandwidth_method": bw0["method"] + ", before and after the cases; the higher "
        "(context: the fractions divide by each row's probe_read_gbps)",
        "gemm_gflops": gemm_gflops,
        "gemm_probes_gflops": [gm0["gemm_gflops"], gm1["gemm_gflops"]],
        "gemm_method": gm0["method"] + ", before and after the cases; the higher "
        "(context: the fractions divide by each row's probe_gemm_gflops)",
        "fraction_method": "bw_fraction = gbps / probe_read_gbps, gemm_fraction = gflops / "
        "probe_gemm_gflops: the medians of one probe call per timed round of the row's group",
        "build": build,
        "load_average_1min": [load0, load1],
        "fields": fields,
        "speedup_definition": "other impl median_ms / this median_ms, same run",
        "gpu_bw_gbps_assumed": args.gpu_bw,
        "gpu_roofline_note": (
            "estimate only: bytes / gpu_bw_gbps; no GPU ran" if args.gpu_bw else None
        ),
        "skipped": res.skipped,
        "verify": res.verify,
        "notes": sorted({f"{c.op}/{c.impl}: {c.note}" for c in cases if c.note}),
        "derived": derived,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"metadata": meta, "rows": [{k: r.get(k) for k in fields} for r in res.rows]},
                f,
                indent=1,
            )
            f.write("\n")
    if args.csv:
        write_csv(args.csv, res.rows, fields)
    bad = [v for v in res.verify if v["result"] != "ok"]
    if bad:
        print(f"\n{len(bad)} output mismatch(es) vs reference; see metadata.verify")
    return 0


if __name__ == "__main__":
    sys.exit(main())
