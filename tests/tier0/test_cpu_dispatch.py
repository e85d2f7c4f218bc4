"""Tier 0: runtime ISA dispatch of the hot C++ kernels (csrc/isa.h, setup.py ISA_VARIANTS).

Every variant this build has and this CPU runs is switched to in-process and each hot op
(forward and backward, fp32 and fp16/bf16 where the op takes them) is compared with the
plain-PyTorch reference; `cpu_isa_last_ran` proves that the variant's own compile ran.
The environment variable is checked in subprocesses (it applies at load time), and the
built .so is disassembled to check that no shared (non-namespaced) function is an AVX copy.
The full op test files can also be run under one variant: LVLM_FAST_CPU_ISA=avx2 pytest ...
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lvlm_fast  # noqa: F401  (loads the C++ kernels)
from lvlm_fast import _extension, ops, reference

STATUS = _extension.cpu_kernel_status()
PREBUILT = STATUS["loaded"] == "prebuilt"
X86 = platform.machine().lower() in ("x86_64", "amd64")
ALL_VARIANTS = ["baseline", "avx2", "avx512"]
needs_prebuilt = pytest.mark.skipif(not PREBUILT, reason="variants exist only in the prebuilt _C "
                                    f"(this run loaded: {STATUS['loaded']})")


def _supported() -> list[str]:
    return [v for v in ALL_VARIANTS if v in STATUS["isa_supported"]] if PREBUILT else []


@pytest.fixture
def variant(request):
    """Switch the hot kernels to one variant for the test, then back to the default."""
    name = request.param
    if name not in STATUS["isa_supported"]:
        pytest.skip(f"this CPU / build cannot run {name} (supported: {STATUS['isa_supported']})")
    before = _extension.set_cpu_isa(name)
    try:
        yield name
    finally:
        _extension.set_cpu_isa(before)


def _last_ran() -> str:
    return str(torch.ops.lvlm_fast_isa.cpu_isa_last_ran())


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _grads(fn, *leaves: torch.Tensor, seed: int = 1):
    """Output and input gradients of fn(*leaves) for a fixed random cotangent."""
    xs = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    return [out.detach()] + [x.grad for x in xs]


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------- the build
@needs_prebuilt
def test_status_reports_the_variant_in_use():
    assert STATUS["isa"] in STATUS["isa_built"]
    assert STATUS["isa"] in STATUS["isa_supported"]
    assert set(STATUS["isa_supported"]) <= set(STATUS["isa_built"])
    if X86:
        assert STATUS["isa_built"] == ALL_VARIANTS  # every x86-64 wheel carries all three
    if os.environ.get(_extension.ISA_ENV) in (None, "", "auto"):
        # the default is the widest variant this CPU runs
        assert STATUS["isa"] == STATUS["isa_supported"][-1]


@needs_prebuilt
def test_default_matches_cpu_flags():
    """The detection agrees with the kernel's view of the CPU (/proc/cpuinfo on Linux)."""
    if not (X86 and os.path.exists("/proc/cpuinfo")):
        pytest.skip("flag cross-check needs x86-64 Linux")
    with open("/proc/cpuinfo") as f:
        flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    want = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            want.append("avx512")
    assert STATUS["isa_supported"] == want


@needs_prebuilt
@pytest.mark.parametrize("bad", ["avx1024", "", "AVX2 "])
def test_unknown_variant_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        _extension.set_cpu_isa(bad)
    assert torch.ops.lvlm_fast_isa.cpu_isa() == STATUS["isa"]  # unchanged


@needs_prebuilt
def test_variant_not_built_is_refused():
    other = "neon" if X86 else "avx2"
    with pytest.raises(ValueError, match="not compiled into this build"):
        _extension.set_cpu_isa(other)


# --------------------------------------------------------------------------- every variant
@needs_prebuilt
@pytest.mark.parametrize("variant", ALL_VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_context_content_pool(variant, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 49, 72, generator=g).to(dtype)
    q = torch.randn(11, 40, generator=g).to(dtype)
    k = torch.randn(5, 49, 40, generator=g).to(dtype)
    for grid in (1, 3):
        got = _grads(lambda a, b, c, grid=grid: ops.context_content_pool(
            a, b, c, content_grid=grid), x, q, k)
        assert _last_ran() == variant
        want = _grads(lambda a, b, c, grid=grid: reference.context_content_pool(
            a.double(), b.double(), c.double(), content_grid=grid), x, q, k)
        for name, a, b in zip(("out", "grad_x", "grad_q", "grad_k"), got, want, strict=True):
            _close(a, b.to(dtype), TOL[dtype], f"{variant} g={grid} {name}")
    # keys = x, per-frame queries
    qf = torch.randn(5, 3, 72, generator=g).to(dtype)
    got = _grads(lambda a, b: ops.context_content_pool(a, b), x, qf)
    want = _grads(lambda a, b: reference.context_content_pool(a.double(), b.double()), x, qf)
    for name, a, b in zip(("out", "grad_x", "grad_q"), got, want, strict=True):
        _close(a, b.to(dtype), TOL[dtype], f"{variant} per-frame {name}")


@needs_prebuilt
@pytest.mark.parametrize("variant", ALL_VARIANTS, indirect=True)
@pytest.mark.parametrize("p", [1, 11, 12, 13, 37])
@pytest.mark.parametrize("lq", [1, 15, 16, 17, 32, 33, 70])
def test_context_content_pool_score_tiles(variant, p, lq):
    """Every row and column tail of the fp32 score GEMM (the AVX-512 variant's micro-kernel
    tiles 12 key rows x 32|16 query columns; the others call BLAS): forward and backward
    against the float64 reference, with shared or per-frame queries, keys = x or given,
    and x a strided view (row stride != C, frame stride != P*C)."""
    g = torch.Generator().manual_seed(p * 100 + lq)
    big = torch.randn(3, 2 * p, 45, generator=g)
    x = big[:, ::2, 3:26]  # (3, p, 23): strided rows and frames, offset start
    q_shared = torch.randn(lq, 23, generator=g)
    q_frame = torch.randn(3, lq, 23, generator=g)
    k = torch.randn(3, p, 19, generator=g)
    qk = torch.randn(lq, 19, generator=g)
    cases = {"shared": (x, q_shared), "per-frame": (x, q_frame), "keys": (x, qk, k)}
    for name, leaves in cases.items():
        got = _grads(ops.context_content_pool, *leaves)
        assert _last_ran() == variant
        want = _grads(lambda *a: reference.context_content_pool(*(t.double() for t in a)), *leaves)
        for part, a, b in zip(("out", "grad_x", "grad_q", "grad_k"), got, want, strict=False):
            _close(a, b.float(), TOL[torch.float32], f"{variant} {name} P={p} Lq={lq} {part}")


@needs_prebuilt
@pytest.mark.parametrize("variant", ALL_VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_diff_weighted_pool(variant, dtype):
    g = torch.Generator().manual_seed(0)
    n, p, d = 7, 37, 83  # odd sizes: vector bodies and scalar tails in every variant
    x = torch.randn(n, p, d, generator=g).to(dtype)
    query = torch.randn(d, generator=g).to(dtype)
    bank = torch.randn(3, p, d, generator=g).to(dtype)
    idx = torch.tensor([2, -1, 0, 2, 1, 1, -1])
    got = _grads(lambda a, b, c: ops.diff_weighted_pool(a, b, c, idx, tau=0.3), x, query, bank)
    assert _last_ran() == variant
    want = _grads(lambda a, b, c: reference.diff_weighted_pool(
        a.double(), b.double(), c.double(), idx, tau=0.3), x, query, bank)
    for name, a, b in zip(("out", "grad_x", "grad_query", "grad_bank"), got, want, strict=True):
        _close(a, b.to(dtype), TOL[dtype], f"{variant} {name}")


@needs_prebuilt
@pytest.mark.parametrize("variant", ALL_VARIANTS, indirect=True)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_slowfast_pool(variant, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 6, 6, 67, generator=g)
    idx = torch.tensor([0, 3, 5])
    opt = dict(slow_kernel=(2, 3), slow_mode=mode, fast_grid=(4, 4))
    got = _grads(lambda a: ops.slowfast_pool(a, slow_index=idx, **opt), x)
    assert _last_ran() == variant
    want = _grads(lambda a: reference.slowfast_pool(a, idx, **opt), x)
    for name, a, b in zip(("out", "grad_x"), got, want, strict=True):
        _close(a, b, TOL[torch.float32], f"{variant} {mode} {name}")


@needs_prebuilt
@pytest.mark.parametrize("variant", ALL_VARIANTS, indirect=True)
def test_keyframe_select(variant):
    # integer-valued embeddings: every variant's cosines are exact, so the selections match
    # the reference exactly (duplicates and near-threshold pairs included)
    g = torch.Generator().manual_seed(0)
    emb = torch.randint(-3, 4, (300, 45), generator=g).float()
    emb[50:60] = emb[10]  # duplicate frames
    query = torch.randint(-3, 4, (45,), generator=g).float()
    for k, thr in ((16, 0.85), (40, 0.5)):
        got = ops.keyframe_select(emb, query, k, threshold=thr)
        assert _last_ran() == variant
        want = reference.keyframe_select(emb, query, k, threshold=thr)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_prebuilt
def test_switching_changes_the_compile_that_runs():
    x = torch.randn(2, 9, 16)
    q = torch.randn(3, 16)
    before = _extension.set_cpu_isa("auto")
    try:
        for v in _supported():
            _extension.set_cpu_isa(v)
            assert _extension.cpu_kernel_status()["isa"] == v
            ops.context_content_pool(x, q)
            assert _last_ran() == v
    finally:
        _extension.set_cpu_isa(before)


# --------------------------------------------------------------------------- the env var
def _status_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, _extension.ISA_ENV: value}
    code = ("import json, warnings; warnings.simplefilter('always')\n"
            "import lvlm_fast.ops\n"
            "from lvlm_fast import _extension\n"
            "print(json.dumps(_extension.cpu_kernel_status()))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


@needs_prebuilt
def test_env_var_forces_a_variant():
    want = _supported()[0]  # baseline: always supported, never the default on AVX machines
    res = _status_in_subprocess(want)
    assert res.returncode == 0, res.stderr
    import json

    st = json.loads(res.stdout.strip().splitlines()[-1])
    assert st["isa"] == want and st["isa_forced"] == want


@needs_prebuilt
def test_env_var_unknown_is_an_error():
    res = _status_in_subprocess("sse9")
    assert res.returncode != 0
    assert "LVLM_FAST_CPU_ISA='sse9'" in res.stderr and "expected one of" in res.stderr


@needs_prebuilt
def test_env_var_unusable_falls_back_with_a_warning():
    res = _status_in_subprocess("neon" if X86 else "avx512")
    assert res.returncode == 0, res.stderr
    assert "RuntimeWarning" in res.stderr and "not usable here" in res.stderr
    import json

    assert json.loads(res.stdout.strip().splitlines()[-1])["isa"] == STATUS["isa_supported"][-1]


# --------------------------------------------------------------------------- the .so itself
@needs_prebuilt
@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 + objdump")
def test_shared_code_is_never_an_avx_copy():
    """Only functions in the avx2 / avx512 namespaces may use ymm / zmm registers; the
    avx2 compile never uses zmm; each variant's kernels really use its vector width."""
    lib = str(STATUS["library"])
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", lib],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    # Global / weak definitions are what the linker shares between the compiles; local
    # symbols (static functions, GCC's .isra / .constprop clones) stay inside their own
    # compile, so an AVX copy of one is only ever called from AVX code.
    nm = subprocess.run(["nm", "-C", "--defined-only", lib], capture_output=True, text=True,
                        timeout=300, check=True).stdout
    shared = {ln.split(" ", 2)[2] for ln in nm.splitlines()
              if len(ln.split(" ", 2)) == 3 and ln.split(" ", 2)[1] in "TWV"}
    func = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    name, offenders, seen = "", set(), {"avx2": set(), "avx512": set()}
    for line in dis.splitlines():
        m = func.match(line)
        if m:
            name = m.group(1)
            continue
        ymm, zmm = "%ymm" in line, "%zmm" in line
        if not (ymm or zmm):
            continue
        if "lvlm_fast::avx512::" in name:
            seen["avx512"].add("zmm" if zmm else "ymm")
        elif "lvlm_fast::avx2::" in name:
            seen["avx2"].add("zmm" if zmm else "ymm")
            if zmm:
                offenders.add(name)
        elif name in shared:
            offenders.add(name)
    assert not offenders, f"shared / baseline code uses AVX registers: {sorted(offenders)[:5]}"
    assert seen["avx2"] == {"ymm"}
    assert "zmm" in seen["avx512"]
