"""The one microbenchmark harness every op uses (driven by ``benchmarks/run.py``).

A case module ``benchmarks/cases/<name>.py`` exposes ``cases(quick, device) -> list[Case]``
(and optionally ``OPS = ("<op>", ...)`` so ``--op`` filtering can skip the module without
calling it). Cases with the same ``(op, shape, dtype)`` form a *group*: they share inputs
(build them in ``setup`` through a :class:`Lazy`, free them in ``teardown``) and are timed
interleaved, one call of each impl per repeat (A B C A B C ...), so machine noise hits every
impl alike. See ``benchmarks/README.md`` for a worked example.

Per group the harness:
1. calls every case's ``setup`` (inputs are built here, untimed);
2. warms each impl up (1-3 calls; calls shorter than ``MIN_CALL_S`` are batched ``number``
   times per sample) and, where ``verify``, checks each impl's output against the
   ``reference`` impl's (``torch.testing.assert_close`` with the case's ``rtol``/``atol``);
   a mismatch is printed and stored in the JSON metadata, never hidden;
3. measures ``peak_bytes`` of one extra call where ``track_peak`` (CPU: the live-tensor
   tracker ``lvlm_fast.profile.tracker.peak_live_bytes``; CUDA: the allocator's peak);
4. times ``repeats`` interleaved rounds; median / p20 / p80 of the per-call wall time
   (``torch.cuda.synchronize`` around each sample on CUDA, garbage collector off);
5. calls every ``teardown`` and collects garbage before the next group.

Row fields are those of DESIGN.md (``ROW_FIELDS``); ``bw_fraction`` divides achieved GB/s by
this machine's read bandwidth measured in the same run (:func:`measure_read_bandwidth`).
Compute-bound cases also state ``flops``; their ``gemm_fraction`` divides achieved GFLOP/s
by this machine's fp32 GEMM rate measured in the same run (:func:`measure_gemm_rate`).
With :class:`Probes` (``benchmarks/run.py`` always passes them) both denominators are
measured inside each group's timed rounds: every round ends with one bandwidth and one GEMM
probe call, and the group's rows divide by the medians of those (``PROBE_FIELDS``). On a
shared VM the machine's bandwidth moves by tens of percent from one minute to the next,
so a denominator from the same minutes as the numerator is the fair one.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ROW_FIELDS = (
    "op",
    "impl",
    "shape",
    "dtype",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "bytes",
    "gbps",
    "bw_fraction",
    "flops",
    "gflops",
    "gemm_fraction",
    "speedup_vs_reference",
    "speedup_vs_seed",
    "peak_bytes",
)
GPU_EST_FIELD = "gpu_roofline_ms_est"  # optional column, only with --gpu-bw (an estimate)
# the group's own probe medians, the denominators of bw_fraction / gemm_fraction (Probes)
PROBE_FIELDS = ("probe_read_gbps", "probe_gemm_gflops")
IMPL_ORDER = {"fused": 0, "reference": 1, "seed": 2}
MIN_CALL_S = 0.005  # calls faster than this are batched so timer overhead stays < ~1%


@dataclass
class Case:
    """One (op, impl, shape, dtype) to time.

    ``fn`` runs the work once (zero arguments; its return value is used only by ``verify``).
    ``bytes`` is the traffic that *must* move for this op and shape (the same number for every
    impl of it; state the model in the case module's docstring), or None if not meaningful.
    ``flops`` likewise for compute-bound ops (gives ``gflops`` and ``gemm_fraction``).
    ``setup``/``teardown`` are called once per group around timing; shared inputs go there.
    ``skip`` (a reason) marks a case that cannot run here: it is printed, stored in the
    metadata, and produces no row. ``repeats`` caps the timed rounds of the case's group
    (for cases that take minutes, e.g. a whole-video pass); the smallest in a group wins.
    """

    op: str
    impl: str
    shape: str
    dtype: str
    fn: Callable[[], Any] | None
    bytes: int | None = None
    flops: int | None = None  # compute-bound cases: FLOPs that must be done (model in docstring)
    track_peak: bool = False
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    verify: bool = True
    rtol: float = 1e-4
    atol: float = 1e-5
    skip: str | None = None
    note: str = ""
    repeats: int | None = None  # timed rounds for this group (overrides the run's; slow cases)

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.op, self.shape, self.dtype)


def skipped(op: str, impl: str, shape: str, dtype: str, reason: str) -> Case:
    """A placeholder for an impl that is unavailable (e.g. its kernel has not landed)."""
    return Case(op=op, impl=impl, shape=shape, dtype=dtype, fn=None, skip=reason)


class Lazy:
    """Build shared inputs once on first ``get()``; ``release()`` drops them.

    Use one per (op, shape, dtype) group: ``setup=inp.get, teardown=inp.release`` on every
    case of the group and ``fn=lambda: op(**inp.get())``. Nothing is allocated until the
    harness reaches the group, so ``--op`` filtering never builds other ops' inputs.
    """

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._value: Any = None
        self._built = False

    def get(self) -> Any:
        if not self._built:
            self._value = self._build()
            self._built = True
        return self._value

    def release(self) -> None:
        self._value = None
        self._built = False


def fused_kernel_note(qualname: str, device: str) -> str:
    """'' if ``qualname`` has a compiled kernel for ``device``; else a note for the fused row
    (e.g. the op fell back to its Python reference because the C++ build is missing)."""
    key = "CUDA" if device.startswith("cuda") else "CPU"
    try:
        dump = torch._C._dispatch_dump(qualname)
    except RuntimeError:
        return f"{qualname} is not registered"
    for line in dump.splitlines():
        if line.startswith(f"{key}:"):
            if key == "CPU" and ".cpp" not in line:
                return "fused CPU kernel missing: this row times the Python fallback"
            return ""
    return f"{qualname} has no {key} kernel"


# ------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_call(fn: Callable[[], Any], number: int, device: str) -> float:
    """Seconds per call, averaged over ``number`` back-to-back calls."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was:
            gc.enable()


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_read_bandwidth(device: str, mib: int = 1024, repeats: int = 7) -> dict[str, Any]:
    """This machine's read bandwidth: median time of ``buf.sum()`` over an fp32 buffer of
    ``mib`` MiB on the current torch threads, as GB/s (1e9 bytes/s)."""
    n = mib * (1 << 20) // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)  # ones: pages touched
    for _ in range(2):
        buf.sum()
    times = [_time_call(buf.sum, 1, device) for _ in range(repeats)]
    med = statistics.median(times)
    del buf
    gc.collect()
    return {
        "read_gbps": n * 4 / med / 1e9,
        "method": f"median of {repeats} x torch.sum over a {mib} MiB fp32 buffer",
        "buffer_bytes": n * 4,
        "median_ms": med * 1e3,
    }


def measure_gemm_rate(device: str, n: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """This machine's fp32 GEMM rate: median time of ``torch.mm`` of two ``n x n`` fp32
    matrices (2 n^3 FLOPs) on the current torch threads, as GFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    out = torch.empty(n, n, device=device)

    def call() -> None:
        torch.mm(a, b, out=out)  # into a preallocated output: no allocation timed

    for _ in range(2):
        call()
    times = [_time_call(call, 1, device) for _ in range(repeats)]
    med = statistics.median(times)
    return {
        "gemm_gflops": 2 * n**3 / med / 1e9,
        "method": f"median of {repeats} x torch.mm, fp32 {n}x{n} @ {n}x{n}",
        "median_ms": med * 1e3,
    }


class Probes:
    """The two probes as single timed calls, interleaved with a group's rounds: the read
    bandwidth (``buf.sum()`` over ``mib`` MiB fp32, as :func:`measure_read_bandwidth`) and
    the fp32 GEMM rate (``torch.mm`` of two ``n x n``, as :func:`measure_gemm_rate`). The
    buffers live as long as the object (1 GiB + 48 MiB at the defaults)."""

    def __init__(self, device: str, mib: int = 1024, n: int = 2048) -> None:
        self.device = device
        self.read_bytes = mib * (1 << 20)
        self.flops = 2 * n**3
        self._buf = torch.ones(self.read_bytes // 4, dtype=torch.float32, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        self._a = torch.randn(n, n, device=device, generator=g)
        self._b = torch.randn(n, n, device=device, generator=g)
        self._out = torch.empty(n, n, device=device)
        for _ in range(2):
            self.read_s()
            self.gemm_s()

    # Each probe runs once untimed first: between rounds its buffers sit idle while a case
    # allocates and frees gigabytes (this VM also runs DAMON page-out), and a cold first
    # touch would lower the denominator. A warm probe is the conservative choice: the
    # cases' samples get no such untimed call.
    def read_s(self) -> float:
        self._buf.sum()
        return _time_call(self._buf.sum, 1, self.device)

    def gemm_s(self) -> float:
        def call() -> None:
            torch.mm(self._a, self._b, out=self._out)

        call()
        return _time_call(call, 1, self.device)


def _peak_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Peak bytes of live tensors during one call, above the level at entry."""
    if device.startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated() - base)
    try:  # owned by the profiler helper; absent until it lands -> no number, not a guess
        from lvlm_fast.profile.tracker import peak_live_bytes
    except ImportError:
        return None
    return int(peak_live_bytes(fn))


def _compare(out: Any, ref: Any, case: Case) -> str | None:
    """None if ``out`` matches ``ref`` (tensors or nested tuples/lists of them)."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return f"structure differs: {type(out).__name__} vs {type(ref).__name__}"
        for a, b in zip(out, ref, strict=True):
            msg = _compare(a, b, case)
            if msg:
                return msg
        return None
    if isinstance(ref, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            return f"expected a tensor, got {type(out).__name__}"
        try:
            torch.testing.assert_close(
                out.detach().cpu(),
                ref.detach().cpu(),
                rtol=case.rtol,
                atol=case.atol,
                check_dtype=False,
            )
        except AssertionError as exc:
            return " ".join(str(exc).split())[:300]
        return None
    return None if out == ref else f"{out!r} != {ref!r}"


# ------------------------------------------------------------------------------ running
@dataclass
class RunResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    verify: list[dict[str, str]] = field(default_factory=list)


def _group_cases(cases: list[Case]) -> dict[tuple[str, str, str], list[Case]]:
    groups: dict[tuple[str, str, str], list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    for g in groups.values():
        g.sort(key=lambda c: (IMPL_ORDER.get(c.impl, 9), c.impl))
    return groups


def run_group(
    group: list[Case],
    device: str,
    repeats: int,
    log: Callable[[str], None] = print,
    probes: Probes | None = None,
) -> tuple[list[dict[str, Any]], list[dict]]:
    """Time one (op, shape, dtype) group interleaved; return (rows, verify records). With
    ``probes`` each round ends with one call of each probe, and the rows carry the group's
    probe medians and the fractions against them."""
    op, shape, dtype = group[0].group
    verify_log: list[dict] = []
    try:
        for c in group:
            if c.setup is not None:
                c.setup()
        # warm-up, calibration and outputs for verification
        outs: dict[str, Any] = {}
        number: dict[str, int] = {}
        for c in group:
            t0 = time.perf_counter()
            out = c.fn()
            _sync(device)
            first = time.perf_counter() - t0
            if c.verify:
                outs[c.impl] = out
            del out
            extra = 0 if first > 0.5 else (1 if first > 0.05 else 2)
            t = first
            for _ in range(extra):
                t = _time_call(c.fn, 1, device)
            number[c.impl] = max(1, min(10_000, math.ceil(MIN_CALL_S / max(t, 1e-9))))
        ref = outs.get("reference")
        for c in group:
            if not c.verify or c.impl == "reference" or ref is None or c.impl not in outs:
                continue
            msg = _compare(outs[c.impl], ref, c)
            rec = {
                "op": op,
                "shape": shape,
                "dtype": dtype,
                "impl": c.impl,
                "vs": "reference",
                "result": "ok" if msg is None else f"MISMATCH: {msg}",
            }
            verify_log.append(rec)
            if msg is not None:
                log(f"  WARNING {op} {shape} {dtype}: {c.impl} != reference: {msg}")
        del outs, ref
        gc.collect()
        peaks: dict[str, int | None] = {}
        for c in group:
            peaks[c.impl] = _peak_bytes(c.fn, device) if c.track_peak else None
            gc.collect()
        samples: dict[str, list[float]] = {c.impl: [] for c in group}
        probe_s: dict[str, list[float]] = {"read": [], "gemm": []}
        caps = [c.repeats for c in group if c.repeats]
        for _ in range(min([repeats, *caps])):
            for c in group:  # interleaved: one sample of every impl per round
                samples[c.impl].append(_time_call(c.fn, number[c.impl], device))
            if probes is not None:  # the machine's rates in the same minutes
                probe_s["read"].append(probes.read_s())
                probe_s["gemm"].append(probes.gemm_s())
    finally:
        for c in group:
            if c.teardown is not None:
                c.teardown()
        gc.collect()

    med = {k: statistics.median(v) for k, v in samples.items()}
    read_gbps = gemm_gflops = None
    if probes is not None:
        read_gbps = probes.read_bytes / statistics.median(probe_s["read"]) / 1e9
        gemm_gflops = probes.flops / statistics.median(probe_s["gemm"]) / 1e9
    rows = []
    for c in group:
        m = med[c.impl]
        rows.append(
            {
                "op": op,
                "impl": c.impl,
                "shape": shape,
                "dtype": dtype,
                "device": device,
                "median_ms": m * 1e3,
                "p20_ms": _quantile(samples[c.impl], 0.2) * 1e3,
                "p80_ms": _quantile(samples[c.impl], 0.8) * 1e3,
                "bytes": c.bytes,
                "gbps": c.bytes / m / 1e9 if c.bytes else None,
                "bw_fraction": None,  # filled by run() once the machine bandwidth is known
                "flops": c.flops,
                "gflops": c.flops / m / 1e9 if c.flops else None,
                "gemm_fraction": None,  # filled by fill_gemm_fraction once the rate is known
                "speedup_vs_reference": (
                    med["reference"] / m if "reference" in med and c.impl != "reference" else None
                ),
                "speedup_vs_seed": med["seed"] / m if "seed" in med and c.impl != "seed" else None,
                "peak_bytes": peaks[c.impl],
            }
        )
        if probes is not None:
            rows[-1].update(probe_read_gbps=read_gbps, probe_gemm_gflops=gemm_gflops)
            fill_bw_fraction(rows[-1:], read_gbps)
            fill_gemm_fraction(rows[-1:], gemm_gflops)
    return rows, verify_log


def run(
    cases: list[Case],
    device: str,
    repeats: int,
    read_gbps: float | None,
    gpu_bw: float | None = None,
    log: Callable[[str], None] = print,
    probes: Probes | None = None,
) -> RunResult:
    """Run every group; fill the optional GPU roofline estimate and the fractions: against
    each group's own probes with ``probes``, else against ``read_gbps`` if given (or call
    :func:`fill_bw_fraction` later)."""
    res = RunResult()
    runnable = []
    for c in cases:
        if c.skip is not None or c.fn is None:
            reason = c.skip or "no fn"
            log(f"  skip {c.op} {c.impl} {c.shape} {c.dtype}: {reason}")
            res.skipped.append(
                {"op": c.op, "impl": c.impl, "shape": c.shape, "dtype": c.dtype, "reason": reason}
            )
        else:
            runnable.append(c)
    for (op, shape, dtype), group in _group_cases(runnable).items():
        log(f"  {op} {shape} {dtype}: {', '.join(c.impl for c in group)} ...")
        for c in group:
            if c.note:
                log(f"    note {c.impl}: {c.note}")
        rows, ver = run_group(group, device, repeats, log, probes)
        res.verify.extend(ver)
        for r in rows:
            if gpu_bw:
                r[GPU_EST_FIELD] = r["bytes"] / (gpu_bw * 1e9) * 1e3 if r["bytes"] else None
        res.rows.extend(rows)
    if read_gbps and probes is None:
        fill_bw_fraction(res.rows, read_gbps)
    return res


def fill_bw_fraction(rows: list[dict[str, Any]], read_gbps: float) -> None:
    for r in rows:
        r["bw_fraction"] = r["gbps"] / read_gbps if r["gbps"] is not None else None


def fill_gemm_fraction(rows: list[dict[str, Any]], gemm_gflops: float) -> None:
    for r in rows:
        r["gemm_fraction"] = r["gflops"] / gemm_gflops if r.get("gflops") is not None else None


# ------------------------------------------------------------------------------ output
def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _fmt_bytes(v: int | None) -> str:
    if v is None:
        return ""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v} B"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "op",
        "impl",
        "shape",
        "dtype",
        "median ms",
        "p20",
        "p80",
        "GB/s",
        "bw%",
        "GFLOP/s",
        "gemm%",
        "x ref",
        "x seed",
        "peak",
    ]
    has_est = any(GPU_EST_FIELD in r for r in rows)
    if has_est:
        head.append("GPU est ms")
    body = []
    for r in rows:
        line = [
            r["op"],
            r["impl"],
            r["shape"],
            r["dtype"],
            _fmt(r["median_ms"], ".3f"),
            _fmt(r["p20_ms"], ".3f"),
            _fmt(r["p80_ms"], ".3f"),
            _fmt(r["gbps"], ".2f"),
            _fmt(None if r["bw_fraction"] is None else 100 * r["bw_fraction"], ".1f"),
            _fmt(r.get("gflops"), ".1f"),
            _fmt(None if r.get("gemm_fraction") is None else 100 * r["gemm_fraction"], ".1f"),
            _fmt(r["speedup_vs_reference"], ".2f"),
            _fmt(r["speedup_vs_seed"], ".2f"),
            _fmt_bytes(r["peak_bytes"]),
        ]
        if has_est:
            line.append(_fmt(r.get(GPU_EST_FIELD), ".3f"))
        body.append(line)
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    left = {0, 1, 2, 3}

    def fmt_line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt_line(head), "  ".join("-" * w for w in widths)]
    out.extend(fmt_line(b) for b in body)
    return "\n".join(out)
