"""Every Triton kernel in kernels/ compiles for sm_80 and sm_90 at the launcher's default
configs (each module's COMPILE_SPECS) with zero register spills.

``python tests/tier2/compile_check.py`` prints the full table (registers, spills, smem)."""

from __future__ import annotations

import pytest
import triton
from compile_check import ARCHS, compile_spec, format_table, kernel_stems, load_specs

STEMS = kernel_stems()


def _cases():
    cases = []
    for stem in STEMS:
        try:
            specs = load_specs(stem)
        except Exception as e:  # a module without specs is its own failing case
            cases.append(pytest.param(stem, None, None, id=f"{stem}-NO_SPECS"))
            _ERRORS[stem] = e
            continue
        for spec in specs:
            for cc in ARCHS:
                cases.append(pytest.param(stem, spec, cc, id=f"{stem}:{spec['name']}-sm_{cc}"))
    return cases


_ERRORS: dict[str, Exception] = {}
CASES = _cases()


def test_discovers_every_kernel_module():
    from pathlib import Path

    import lvlm_fast.kernels as pkg

    files = {f.stem for p in pkg.__path__ for f in Path(p).glob("*.py")} - {"__init__"}
    assert set(STEMS) == files and "diff_weighted_pool" in STEMS


def test_jit_functions_are_real():
    # Under TRITON_INTERPRET the decorator returns an InterpretedFunction, not compilable.
    for stem in STEMS:
        if stem in _ERRORS:
            continue
        for spec in load_specs(stem):
            assert isinstance(spec["fn"], triton.runtime.JITFunction), (stem, spec["name"])


@pytest.mark.parametrize(("stem", "spec", "cc"), CASES)
def test_compiles_without_spills(stem, spec, cc):
    if spec is None:
        raise AssertionError(f"kernels/{stem}.py: {_ERRORS[stem]}")
    r = compile_spec(stem, spec, cc)
    table = format_table([r])
    assert not r.error, table
    assert r.spill_stores == 0 and r.spill_loads == 0, f"register spills:\n{table}"
    assert 0 < r.regs <= 255, table


def test_ptxas_parser_reads_spills():
    from compile_check import parse_ptxas

    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers\n")
    assert parse_ptxas(log) == (128, 4, 12, 8)
    with pytest.raises(ValueError):
        parse_ptxas("garbage")


def test_module_without_specs_fails(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "lvlm_fast.kernels._no_specs", types.ModuleType("x"))
    with pytest.raises(AssertionError, match="COMPILE_SPECS"):
        load_specs("_no_specs")


def test_harness_flags_a_spilling_config():
    # The D=3584 backward at 16 warps (128-register cap) and 2 rows per block spills; the
    # harness must see it, or a zero-spill pass above would mean nothing.
    from lvlm_fast.kernels.diff_weighted_pool import COMPILE_SPECS

    spec = next(s for s in COMPILE_SPECS if s["name"] == "dwp_bwd_D3584_bf16_AB=X")
    bad = {**spec, "name": "deliberately_spilling", "num_warps": 16,
           "constexprs": {**spec["constexprs"], "BLOCK_P": 2}}
    r = compile_spec("diff_weighted_pool", bad, 80)
    assert not r.error, r.error
    assert r.spill_stores > 0 and not r.ok


# --------------------------------------------------------------------------- fp64 (issue 9.4)
# fp64 inputs reach these kernels on CUDA (fp32 accumulation), so fp64 is in their matrix;
# the two below reject fp64 at compile time (their fp64 dots promote the loop-carried fp32
# accumulators), so their launchers route fp64 to the reference instead.
FP64_COMPILED = ("diff_weighted_pool", "evict_summaries", "keyframe_select", "slowfast_pool")
FP64_ROUTED_AWAY = ("context_content_pool", "summary_attention")


@pytest.mark.parametrize("stem", FP64_COMPILED)
def test_fp64_is_in_the_compile_matrix(stem):
    specs = load_specs(stem)
    fp64 = [s for s in specs if "*fp64" in s["signature"].values()]
    kernels = {s["fn"].fn.__name__ for s in specs}
    assert {s["fn"].fn.__name__ for s in fp64} == kernels, (stem, [s["name"] for s in fp64])


def _fp64_spec(stem: str) -> dict:
    if stem == "summary_attention":
        import torch
        from lvlm_fast.kernels.summary_attention import _specs

        return next(s for s in _specs((torch.float64,), (False,)) if s["name"] == "fwd_fp64_d64")
    spec = next(s for s in load_specs(stem) if s["name"] == "ccp_fwd_fp32_q32_p256")
    sig = {k: "*fp64" if v == "*fp32" and k in ("q_ptr", "k_ptr") else v
           for k, v in spec["signature"].items()}
    return {**spec, "signature": sig, "name": "ccp_fwd_fp64_P256"}


@pytest.mark.parametrize("stem", FP64_ROUTED_AWAY)
def test_fp64_is_rejected_by_triton_and_routed_to_the_reference(stem, monkeypatch):
    import torch

    r = compile_spec(stem, _fp64_spec(stem), 80)
    assert r.error, f"{stem}: fp64 now compiles; add it to the matrix, drop the routing"
    mod = __import__(f"lvlm_fast.kernels.{stem}", fromlist=["_"])

    def no_launch(*a, **k):
        raise AssertionError(f"{stem}: an fp64 input reached a Triton kernel")

    for name in dir(mod):  # every kernel of the module: launching one fails the test
        if isinstance(getattr(mod, name), triton.runtime.JITFunction):
            monkeypatch.setattr(mod, name, type("K", (), {"__getitem__": no_launch})())
    g = torch.Generator().manual_seed(0)
    if stem == "summary_attention":
        q = torch.randn(1, 2, 3, 64, generator=g, dtype=torch.float64)
        kv = torch.randn(1, 1, 5, 64, generator=g, dtype=torch.float64)
        out, lse, _ = mod.summary_attention_fwd(q, kv, kv, 0.125, False)
        grads = mod.summary_attention_bwd(torch.ones_like(out), q, kv, kv, out, lse, 0.125)
    else:
        x = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
        qs = torch.randn(3, 8, generator=g, dtype=torch.float64)
        out, lse = mod.context_content_pool_fwd(x, qs, None, 0.3, 1)
        grads = mod.context_content_pool_bwd(torch.ones_like(out), x, qs, None, 0.3, 1, lse)
    assert out.dtype == torch.float64 and all(t.dtype == torch.float64 for t in grads[:2])
