"""Split-KV (flash-decoding) building blocks shared by the small-query attention kernels.

Used by ``summary_attention``'s decode / small-Lq path (:mod:`.summary_attention`,
``_summary_attention_splitkv_kernel``) and by ``qformer_cross_attention``
(:mod:`.qformer_cross_attention`): both split the keys across programs, each program
writes a partial output normalised by its own softmax sum plus that partial's
log-sum-exp, and one tiny second kernel merges the partials exactly.

* :func:`online_softmax_step` (``@triton.jit``): one key tile of the base-2 online softmax
  (scores already scaled by ``scale * log2 e``, masked entries ``-inf``). Safe for rows
  that have seen no visible key yet (their max stays ``-inf``; no NaN).
* :func:`finish_partial` (``@triton.jit``): ``acc / l`` and the natural-log lse of a
  partial; a row with no visible key in its split gets output 0 and lse ``-inf``.
* ``_lse_merge_kernel`` + :func:`merge_partials`: partials ``o_part`` (n_split, R, D) fp32
  and ``lse_part`` (n_split, R) fp32, with R = B*H*Lq rows ordered (b, h, i), merged as
  ``lse = logsumexp_s lse_s``, ``out = sum_s exp(lse_s - lse) o_s``. One program per
  BLOCK_R rows, splits walked in order (deterministic), fp32: one pass over the split
  lse values (max, sum) gives lse, then per channel chunk of BLOCK_D <= 128
  (:func:`merge_block_d`; diff_weighted_pool merges rows of D = 3584, which one tile
  spilled by 11-22 KB) a pass summing exp(lse_s - lse) o_s. The output is written
  through (b, h, i) strides (any layout, e.g. summary_attention's (B, Hq, Lq, D) view of
  (B, Lq, Hq, D), or the Q-Former's (B, Lq, H*Dh)), in its dtype; lse (R,) fp32. Row
  offsets are int64. Every row has >= 1 split with a visible key (the callers guarantee
  it), so ``lse`` is finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """One tile: ``s`` (M, N) base-2 scaled scores (``-inf`` where masked), ``v`` (N, D) in the
    dot dtype; returns the updated running max, sum and fp32 accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def finish_partial(acc, m_i, l_i):
    """(acc / l, natural-log lse); rows without a visible key: (0, -inf)."""
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    return o, lse


@triton.jit
def _lse_merge_kernel(
    OP, LSEP, O, LSE, n_split, R, H, Lq, D, sob, soh, som,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # pass 1 over the splits: lse = m + log sum_s exp(lse_s - m); pass 2, per BLOCK_D
    # channel chunk (D of any width: diff_weighted_pool merges D = 3584 rows):
    # out = sum_s exp(lse_s - lse) o_s. Splits walked in order in both: deterministic.
    pid = tl.program_id(0)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = offs_r < R
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for sp in range(0, n_split):
        m = tl.maximum(m, tl.load(LSEP + sp * R + offs_r, mask=rmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_ = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in range(0, n_split):
        l_ += tl.exp(tl.load(LSEP + sp * R + offs_r, mask=rmask, other=float("-inf")) - m_safe)
    ok = l_ > 0
    lse = tl.where(ok, m_safe + tl.log(tl.where(ok, l_, 1.0)), float("-inf"))
    lse_safe = tl.where(ok, lse, 0.0)
    b = offs_r // (H * Lq)
    h = (offs_r // Lq) % H
    i = offs_r % Lq
    o_rows = O + (b * sob + h * soh + i * som)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tile = rmask[:, None] & (offs_d < D)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for sp in range(0, n_split):
            row = sp * R + offs_r
            w = tl.exp(tl.load(LSEP + row, mask=rmask, other=float("-inf")) - lse_safe)
            o_s = tl.load(OP + row[:, None] * D + offs_d[None, :], mask=tile, other=0.0)
            acc += tl.where(ok, w, 0.0)[:, None] * o_s
        tl.store(o_rows[:, None] + offs_d[None, :], acc.to(O.dtype.element_ty), mask=tile)
    tl.store(LSE + offs_r, lse, mask=rmask)


MERGE_CONFIG = {"BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
MERGE_MAX_BLOCK_D = 128  # channel chunk; wider rows loop (BLOCK_D 1024+ spilled 0.1-49 KB)


def merge_block_d(d: int) -> int:
    return max(16, min(MERGE_MAX_BLOCK_D, triton.next_power_of_2(d)))


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge ``o_part`` (n_split, B, H, Lq, D) fp32 / ``lse_part`` (n_split, B, H, Lq) fp32
    into ``out``, a (B, H, Lq, D) tensor of any strides (last dim unit-stride), in place;
    returns lse (B, H, Lq) fp32. One launch."""
    n_split, b, h, lq, d = o_part.shape
    assert out.shape == (b, h, lq, d) and (out.stride(3) == 1 or d == 1)
    r = b * h * lq
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=o_part.device)
    cfg = MERGE_CONFIG
    _lse_merge_kernel[(triton.cdiv(r, cfg["BLOCK_R"]),)](
        o_part, lse_part, out, lse, n_split, r, h, lq, d,
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=merge_block_d(d),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return lse


# --------------------------------------------------------------------------- compile specs
def _specs() -> list[dict]:
    """Every BLOCK_D :func:`merge_block_d` returns (16 to 128) per output dtype: callers merge
    head dims (summary_attention, Q-Former) and whole channel rows (diff_weighted_pool's
    split P, D up to 8192, fp64 outputs too: those loop over 128-wide chunks)."""
    specs = []
    for ty in ("bf16", "fp16", "fp32", "fp64"):
        for bd in (16, 32, 64, 128):
            sig = {"OP": "*fp32", "LSEP": "*fp32", "O": "*" + ty, "LSE": "*fp32"}
            sig.update({n: "i32" for n in ("n_split", "R", "H", "Lq", "D")})
            sig.update({"sob": "i64", "soh": "i64", "som": "i64"})
            cx = {"BLOCK_R": MERGE_CONFIG["BLOCK_R"], "BLOCK_D": bd}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"lse_merge_{ty}_d{bd}", "fn": _lse_merge_kernel,
                          "signature": sig, "constexprs": cx,
                          "num_warps": MERGE_CONFIG["num_warps"],
                          "num_stages": MERGE_CONFIG["num_stages"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
