"""Issue 14: every config a launcher can pick is in its module's COMPILE_SPECS, so tier 2's
zero-spill check covers it and a config change cannot silently skip the check.

The launchers run for real over the op's input space on ``meta`` tensors (no data, no
device) with every ``triton.jit`` kernel of the module replaced by a recorder; each recorded
launch (kernel, constexpr arguments, num_warps, num_stages, pointer dtypes) must match a
spec. Compiling the specs is test_compile.py's job."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
       torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1",
       torch.uint8: "*u8", torch.int8: "*i8"}


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, args, kwargs))

        return launch


def _record(mod, monkeypatch) -> list:
    log: list = []
    for name in dir(mod):
        obj = getattr(mod, name)
        if isinstance(obj, triton.runtime.JITFunction):
            monkeypatch.setattr(mod, name, _Recorder(obj, log))
    return log


def _launch_key(fn, args, kwargs) -> tuple:
    """(kernel, constexprs, num_warps, num_stages, pointer types) of one recorded launch."""
    names = fn.arg_names
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items()
                                                      if k in names}
    ce = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
    ptrs = {k: _TY[v.dtype] for k, v in bound.items() if isinstance(v, torch.Tensor)}
    return (fn.fn.__name__, tuple(sorted(ce.items())), kwargs.get("num_warps", 4),
            kwargs.get("num_stages", 3), tuple(sorted(ptrs.items())))


def _covered(key: tuple, specs: list[dict]) -> bool:
    name, ce, warps, stages, ptrs = key
    for s in specs:
        if (s["fn"].fn.__name__ == name and s["num_warps"] == warps
                and s["num_stages"] == stages
                and all(k in s["constexprs"] and s["constexprs"][k] == v for k, v in ce)
                and all(s["signature"].get(k) == t for k, t in ptrs)):
            return True
    return False


def _missing(log: list, specs: list[dict]) -> list[tuple]:
    keys = {_launch_key(*launch) for launch in log}
    return sorted(k for k in keys if not _covered(k, specs))


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


# --------------------------------------------------------------------------- context_content_pool
def test_context_content_pool_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.context_content_pool as mod

    log = _record(mod, monkeypatch)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)  # fp64 runs the reference
    lqs = (1, 16, 17, 32, 33, 64, 65, 130)
    ps = (1, 15, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 729, 1024)
    for dt, lq, p, n in itertools.product(dtypes, lqs, ps, (1, 17, 300)):
        c, ck = 24, 40
        x = _meta(n, p, c, dtype=dt)
        for keys, shared, grid in itertools.product((None, _meta(n, p, ck, dtype=dt)),
                                                    (True, False), (1, 2, 7)):
            if grid > 1 and int(p ** 0.5) ** 2 != p:
                continue
            cq = c if keys is None else ck
            q = _meta(lq, cq, dtype=dt) if shared else _meta(n, lq, cq, dtype=dt)
            out, lse = mod.context_content_pool_fwd(x, q, keys, 0.1, grid)
            mod.context_content_pool_bwd(torch.empty_like(out), x, q, keys, 0.1, grid, lse)
    kernels = {k[0] for k in (_launch_key(*launch) for launch in log)}
    assert len(kernels) == 5, kernels  # fwd, pool, prep, bwd, dq all reached
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- keyframe_select
def test_keyframe_select_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.keyframe_select as mod

    log = _record(mod, monkeypatch)
    monkeypatch.setattr(mod, "finish", lambda *a: None)  # reads picks: no data on meta
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    es = (1, 15, 16, 17, 32, 33, 64, 65, 128, 129, 512, 768, 4096)
    for dt, e, floor in itertools.product(dtypes, es, (None, 0.1)):
        f = _meta(40, e, dtype=dt)
        mod.keyframe_select_fwd(f, _meta(e, dtype=dt), 3, 0.5, floor, True)
    assert {k[0] for k in (_launch_key(*launch) for launch in log)} == {
        "_keyframe_select_prep_kernel", "_keyframe_select_pick_kernel",
        "_keyframe_select_fwd_kernel"}
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- split_kv
def test_split_kv_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.split_kv as mod

    log = _record(mod, monkeypatch)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for dt, d in itertools.product(dtypes, (1, 15, 16, 33, 64, 80, 128, 129, 1152, 3584, 8192)):
        o_part = _meta(3, 1, 2, 5, d, dtype=torch.float32)
        mod.merge_partials(o_part, _meta(3, 1, 2, 5, dtype=torch.float32),
                           _meta(1, 2, 5, d, dtype=dt))
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- kv_compact
# Head dims of the shipped configs (lvlm_fast/models/configs.py): 16 / 64 tiny, 128 the 7-8B
# models, 256 Qwen3.5-9B's full-attention layers; 80 a padded one.
SHIPPED_HEAD_DIMS = (16, 64, 80, 128, 256)
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def test_kv_compact_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.kv_compact as mod

    log = _record(mod, monkeypatch)
    for dt, d in itertools.product(ALL_DTYPES, SHIPPED_HEAD_DIMS):
        k, v = _meta(2, 1, 4, 64, d, dtype=dt), _meta(2, 1, 4, 64, d, dtype=dt)
        length = _meta(dtype=torch.int64)
        # rotary_pairs (full / M-RoPE section / 0 for partial rotary) is a runtime argument
        for rot in (d // 2, d // 4, 0):
            inv = _meta(d // 2, dtype=torch.float32)
            for scores, tpf, recent in ((None, 4, 8), (None, 0, 8), (None, 4, 2),
                                        (_meta(2, 1, 4, 64, dtype=torch.float32), 0, 8)):
                mod.kv_compact_fwd(k, v, length, inv, scores, 40, 4, recent, tpf, 10, rot)
    modes = {dict(key[1])["HAS_EXT"] * 2 + dict(key[1])["HAS_TAR"]
             for key in (_launch_key(*launch) for launch in log)}
    assert modes == {0, 1, 2}, modes  # VaN only, TaR, caller scores
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- evict_summaries
def test_evict_summaries_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.evict_summaries as mod

    log = _record(mod, monkeypatch)
    monkeypatch.setattr(mod, "_layer_offsets", lambda k, v: _meta(len(k), 2, dtype=torch.int64))
    for dt, d in itertools.product(ALL_DTYPES, (*SHIPPED_HEAD_DIMS, 96)):
        k, v = _meta(1, 4, 64, d, dtype=dt), _meta(1, 4, 64, d, dtype=dt)
        inv = _meta(d // 2, dtype=torch.float32)
        mod.evict_summaries_fwd(k, v, inv, 2, 1, 3, 5, 0, 0)
        mod.evict_summaries_layers_fwd([k, k], [v, v], inv, 2, 1, 3, 5, 0, 0)
    assert {dict(key[1])["LAYERS"] for key in (_launch_key(*launch) for launch in log)} == {
        False, True}
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- summary_attention
def _fake_autotuned(mod, kernels: dict, log: list):
    """``autotuned(name, block_d)`` whose launch records one launch per entry of the kernel's
    space (``kernels``: name -> JITFunction, captured before the recorders)."""

    class _Tuned:
        def __init__(self, name, block_d=128):
            self.fn, self.space = kernels[name], mod.space(name, block_d)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                for m, n, w, st in self.space:
                    log.append((self.fn, args, {**kwargs, "BLOCK_M": m, "BLOCK_N": n,
                                                "num_warps": w, "num_stages": st}))

            return launch

    return _Tuned


@pytest.mark.parametrize("autotune", [False, True])
@pytest.mark.parametrize("i64", [False, True])
def test_summary_attention_specs_cover_every_launch(monkeypatch, autotune, i64):
    import lvlm_fast.kernels.summary_attention as mod

    kernels = {"fwd": mod._summary_attention_fwd_kernel, "bwd": mod._summary_attention_bwd_kernel,
               "dq": mod._summary_attention_bwd_dq_kernel}
    log = _record(mod, monkeypatch)
    monkeypatch.setattr(mod, "autotuned", _fake_autotuned(mod, kernels, log))
    # use_autotune's rule without its CUDA / environment conditions
    monkeypatch.setattr(mod, "use_autotune", lambda q, i: (
        autotune and not i and q.dtype in (torch.float16, torch.bfloat16)))
    # split_kv's merge launch (its own module; covered by the split_kv test above)
    monkeypatch.setattr(mod, "merge_partials", lambda o, lse, out: _meta(*lse.shape[1:],
                                                                      dtype=torch.float32))
    if i64:
        monkeypatch.setattr(mod, "INT32_SPAN", 1)  # every launch takes int64 rows
    dtypes = (torch.float32, torch.float16, torch.bfloat16)  # fp64 runs the reference
    lqs = (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 100)
    for dt, d, g, lq in itertools.product(dtypes, (64, 80, 96, 128), range(1, 9), lqs):
        hkv, s = 2, 300
        q = _meta(1, hkv * g, lq, d, dtype=dt)
        k, v = _meta(1, hkv, s, d, dtype=dt), _meta(1, hkv, s, d, dtype=dt)
        for mass in (False, True):
            out, lse, _ = mod.summary_attention_fwd(q, k, v, 0.1, mass)
        mod.summary_attention_bwd(torch.empty_like(q), q, k, v, out, lse, 0.1)
    keys = {_launch_key(*launch) for launch in log}
    assert {dict(k[1])["I64"] for k in keys} == {i64}
    assert len({k[0] for k in keys}) == 5  # fwd, mass, bwd, dq, splitkv
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# ---------------------------------------------------------------------- qformer_cross_attention
def test_qformer_cross_attention_specs_cover_every_launch(monkeypatch):
    import lvlm_fast.kernels.qformer_cross_attention as mod

    log = _record(mod, monkeypatch)
    monkeypatch.setattr(mod, "merge_partials", lambda o, lse, out: _meta(*lse.shape[1:],
                                                                      dtype=torch.float32))
    dtypes = (torch.float32, torch.float16, torch.bfloat16)  # fp64 runs the torch paths
    # Dh 16 (tiny-video-llama), 64 (Video-LLaMA's Q-Formers: 768 / 12 heads), every other
    # BLOCK_D up to the op's limit of 128; Lq 1..64 (the op's range)
    for dt, d, lq in itertools.product(dtypes, (8, 16, 24, 32, 40, 64, 80, 128),
                                       (1, 2, 4, 8, 16, 17, 32, 33, 64)):
        h, e, t, sz = 2, 48, 3, 5
        q = _meta(2, lq, h * d, dtype=dt)
        f, pos = _meta(2, t, sz, e, dtype=dt), _meta(t, e, dtype=dt)
        w, bias = _meta(h * d, e, dtype=dt), _meta(h * d, dtype=dt)
        out, lse = mod.qformer_cross_attention_fwd(q, f, pos, w, bias, w, bias, h, 0.1)
        mod.qformer_cross_attention_bwd(torch.empty_like(out), None, q, f, pos, w, bias, w,
                                        bias, out, lse, h, 0.1)
    assert len({k[0] for k in (_launch_key(*launch) for launch in log)}) == 2
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- slowfast_pool
def test_slowfast_pool_specs_cover_every_launch(monkeypatch):
    """The geometries of kernels/slowfast_pool.py's SETTINGS (the presets on the shipped
    families' token grids; every other geometry is its own compile, not covered) at the
    shipped widths D (SigLIP 1152, Qwen2 3584, Qwen3 4096, with DeepStack 16384) x every
    launch flag."""
    import lvlm_fast.kernels.slowfast_pool as mod

    log = _record(mod, monkeypatch)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for (_, (h, w), sk, mode, fg), d, dt in itertools.product(
            mod.SETTINGS, (1152, 3584, 4096, 16384), dtypes):
        x = _meta(5, h, w, d, dtype=dt)
        no_slow = torch.tensor([], dtype=torch.long)
        for si, sep, arg in itertools.product((torch.tensor([0, 2]), no_slow),
                                              (None, _meta(d, dtype=dt)), (False, True)):
            out, am = mod.slowfast_pool_fwd(x, si, sep, sk, mode, fg, "all", "slow_fast", arg)
            if mode == "max" and not arg:
                continue  # the backward of max pooling needs the arg-max
            mod.slowfast_pool_bwd(torch.empty_like(out), am, si, tuple(x.shape), sep is not None,
                                  sk, mode, fg, "all", "slow_fast")
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


# --------------------------------------------------------------------------- dwp
def test_diff_weighted_pool_specs_cover_every_launch(monkeypatch):
    """ViLAMP's two calls (A = B = X; separate rel / red from the DFM projections) at the
    shipped widths (SigLIP 1152, Qwen2 3584) and token counts per frame (LLaVA-OV pooled
    196, Qwen2.5-VL 256 at 448x448, raw SigLIP 729), small (split P) and large N, shared and
    per-frame query, with and without weights, forward and backward. Not covered: the rarer
    API variants (no ref bank, rel without red) outside bf16, Da / Db != D, other widths."""
    import lvlm_fast.kernels.diff_weighted_pool as mod

    log = _record(mod, monkeypatch)
    monkeypatch.setattr(mod, "merge_partials", lambda o, lse, out: _meta(*lse.shape[1:],
                                                                      dtype=torch.float32))
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for dt, d, sep_ab, n, p, rw, per_frame in itertools.product(
            dtypes, (1152, 3584), (False, True), (1, 17, 38, 300), (196, 256, 729),
            (False, True), (False, True)):
        x = _meta(n, p, d, dtype=dt)
        q = _meta(n, d, dtype=dt) if per_frame else _meta(d, dtype=dt)
        rel = red = _meta(n, p, d, dtype=dt) if sep_ab else None
        bank, ri = _meta(3, p, d, dtype=dt), _meta(n, dtype=torch.int64)
        tau = _meta(dtype=torch.float32)
        out, _, lse = mod.diff_weighted_pool_fwd(x, q, bank, ri, rel, red, tau, rw)
        if not rw:
            mod.diff_weighted_pool_bwd(torch.empty_like(out), x, q, bank, ri, rel, red, tau,
                                       out, lse)
    # Qwen3-VL / Qwen3.5 ViLAMP: values of 4,096 main + 3 x 4,096 DeepStack channels, weights
    # from the main channels (rel = red = bank = 4,096 wide); 121 (352x352) and 196
    # (448x448) tokens per unit: launched as 4,096-channel chunks (module doc)
    for dt, n, p, rw, per_frame in itertools.product(dtypes, (1, 13, 300), (121, 196),
                                                     (False, True), (False, True)):
        x, m = _meta(n, p, 16384, dtype=dt), _meta(n, p, 4096, dtype=dt)
        q = _meta(n, 4096, dtype=dt) if per_frame else _meta(4096, dtype=dt)
        bank, ri = _meta(3, p, 4096, dtype=dt), _meta(n, dtype=torch.int64)
        tau = _meta(dtype=torch.float32)
        before = len(log)
        out, _, lse = mod.diff_weighted_pool_fwd(x, q, bank, ri, m, m, tau, rw)
        assert out.shape == (n, 16384) and len(log) - before == 4  # one launch per chunk
        if not rw:
            mod.diff_weighted_pool_bwd(torch.empty_like(out), x, q, bank, ri, m, m, tau, out,
                                       lse)
    missing = _missing(log, mod.COMPILE_SPECS)
    assert not missing, "launches with no COMPILE_SPECS entry:\n" + "\n".join(map(str, missing))


def test_coverage_check_flags_a_missing_config(monkeypatch):
    """The matcher is not vacuous: dropping a reachable spec is reported."""
    import lvlm_fast.kernels.context_content_pool as mod

    log = _record(mod, monkeypatch)
    x = _meta(2, 16, 8, dtype=torch.float16)
    q = _meta(40, 8, dtype=torch.float16)  # Lq 40: BLOCK_Q 64
    out, lse = mod.context_content_pool_fwd(x, q, None, 0.1, 1)
    mod.context_content_pool_bwd(torch.empty_like(out), x, q, None, 0.1, 1, lse)
    assert not _missing(log, mod.COMPILE_SPECS)
    specs = [s for s in mod.COMPILE_SPECS if s["name"] != "ccp_bwd_dq_fp16_q64"]
    missing = _missing(log, specs)
    assert [m[0] for m in missing] == ["_context_content_pool_bwd_dq_kernel"], missing


@pytest.mark.parametrize("stem", ["context_content_pool", "keyframe_select", "split_kv",
                                  "kv_compact", "evict_summaries", "summary_attention",
                                  "qformer_cross_attention", "slowfast_pool",
                                  "diff_weighted_pool"])
def test_spec_names_are_unique(stem):
    mod = __import__(f"lvlm_fast.kernels.{stem}", fromlist=["_"])
    names = [s["name"] for s in mod.COMPILE_SPECS]
    assert len(names) == len(set(names))
