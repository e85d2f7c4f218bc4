"""References for Video-XL (arXiv 2409.14485; released code VectorSpaceLab/Video-XL).

* :func:`evict_summaries`: the eviction step as an op spec (gather the window's summary
  rows, re-rotate each key by its RoPE position delta, write them after the retained ones).
* :func:`summary_layout`: the interleave rule (slot i of a window is a summary when
  ``i % (r+1) == r - c``, c the carried remainder).
* :func:`videoxl_reference`: a straightforward re-implementation of the released loop:
  keys cached *before* RoPE, the cache concatenated with each window and the whole thing
  re-rotated at every call with position = index in the compacted cache, a float mask on
  the concatenated cache, raw rows dropped after each window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- RoPE (HF)
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama/Qwen2 convention: angle = pos * inv_freq (fp32), emb = cat(angle, angle)."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., L, D), cos/sin (L, D): x*cos + rotate_half(x)*sin, computed in fp32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# --------------------------------------------------------------------------- layout
def summary_layout(n_raw: int, ratio: int, carry: int) -> tuple[int, int, int, int]:
    """(num_summaries, first_slot, stride, new_carry) of a window of n_raw raw tokens."""
    k = (n_raw + carry) // ratio
    return k, ratio - carry, ratio + 1, (n_raw + carry) % ratio


def summary_slots(n_raw: int, ratio: int, carry: int) -> torch.Tensor:
    k, first, stride, _ = summary_layout(n_raw, ratio, carry)
    return first + stride * torch.arange(k)


def raw_slots(n_raw: int, ratio: int, carry: int) -> torch.Tensor:
    """Slot of raw token t in the (n_raw + k)-long window: t + (t + c) // r."""
    t = torch.arange(n_raw)
    return t + (t + carry) // ratio


# --------------------------------------------------------------------------- eviction op
def evict_summaries(
    key: torch.Tensor,
    value: torch.Tensor,
    inv_freq: torch.Tensor,
    src: int,
    first: int,
    stride: int,
    count: int,
    dst: int,
    pos_delta: int = 0,
) -> None:
    """In place: for m < count, row ``src + first + m*stride`` of key/value (B, H, C, D)
    moves to row ``dst + m``; the key is re-rotated by
    ``delta_m = (dst + m) - (src + first + m*stride) + pos_delta`` RoPE positions."""
    if count == 0:
        return
    m = torch.arange(count, device=key.device)
    rows = src + first + m * stride
    dest = dst + m
    cos, sin = rope_cos_sin(dest - rows + pos_delta, inv_freq.to(key.device))
    moved_k = apply_rope(key[:, :, rows], cos, sin)  # fancy indexing gathers a copy first
    moved_v = value[:, :, rows]
    key[:, :, dest] = moved_k
    value[:, :, dest] = moved_v


# --------------------------------------------------------------------------- released loop
def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _proj(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, lin.weight, lin.bias)


class _LayerMem:
    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, Hkv, M, D), before RoPE
        self.v: torch.Tensor | None = None


@torch.no_grad()
def videoxl_reference(
    model,
    summary_weights: list[dict[str, torch.nn.Linear]],
    summary_embed: torch.Tensor,
    prefix_ids: torch.Tensor,
    visual: torch.Tensor,
    question_ids: torch.Tensor,
    *,
    ratio: int,
    window: int,
    max_new_tokens: int,
    evict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released Video-XL loop on a HF Llama/Qwen2 ``*ForCausalLM`` (batch 1).

    ``summary_weights[l]`` holds the ``q``/``k``/``v`` ``nn.Linear`` of layer l's summary rows;
    ``summary_embed`` (D,) is the summary-token embedding. The prefix is the sink; visual
    tokens (1, N, D) go in windows of ``window`` raw tokens with summaries interleaved; the
    question and the greedy answer are kept raw. Returns (logits of the question's last
    token then of every generated token (1 + max_new_tokens - 1, vocab)... as a
    (max_new_tokens, vocab) fp32 tensor, generated ids (max_new_tokens,)).
    """
    cfg = model.config
    inner = model.model
    layers = inner.layers
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    inv_freq = inner.rotary_emb.inv_freq
    mems = [_LayerMem() for _ in layers]

    def run(x: torch.Tensor, summary_rows: torch.Tensor | None) -> torch.Tensor:
        """x (1, L, D) embeddings of a chunk; summary_rows: bool (L,) or None."""
        length = x.shape[1]
        h = x
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            res = h
            hs = layer.input_layernorm(h)
            q, k, v = _proj(attn.q_proj, hs), _proj(attn.k_proj, hs), _proj(attn.v_proj, hs)
            if summary_rows is not None and bool(summary_rows.any()):
                sw = summary_weights[li]
                # released code: boolean gather/scatter for the summary projections
                q[:, summary_rows] = _proj(sw["q"], hs[:, summary_rows])
                k[:, summary_rows] = _proj(sw["k"], hs[:, summary_rows])
                v[:, summary_rows] = _proj(sw["v"], hs[:, summary_rows])
            q = q.view(1, length, nh, hd).transpose(1, 2)
            k = k.view(1, length, nkv, hd).transpose(1, 2)
            v = v.view(1, length, nkv, hd).transpose(1, 2)
            mem = mems[li]
            # concatenate the pre-RoPE memory with this chunk, then rotate everything with
            # position = index in the compacted cache
            kc = k if mem.k is None else torch.cat([mem.k, k], dim=2)
            vc = v if mem.v is None else torch.cat([mem.v, v], dim=2)
            total = kc.shape[2]
            pos = torch.arange(total, device=x.device)
            cos, sin = rope_cos_sin(pos, inv_freq)
            k_rot = apply_rope(kc, cos, sin)
            q_rot = apply_rope(q, cos[-length:], sin[-length:])
            mask = torch.full((length, total), float("-inf"), device=x.device)
            mask = torch.triu(mask, diagonal=total - length + 1).to(q.dtype)
            o = F.scaled_dot_product_attention(
                q_rot, _repeat_kv(k_rot, nh // nkv), _repeat_kv(vc, nh // nkv),
                attn_mask=mask[None, None], scale=attn.scaling,
            )
            o = o.transpose(1, 2).reshape(1, length, nh * hd)
            h = res + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            mem.k, mem.v = kc, vc
        return inner.norm(h)

    def evict_after(summary_rows: torch.Tensor, length: int) -> None:
        if not evict:
            return
        for mem in mems:
            keep = torch.ones(mem.k.shape[2], dtype=torch.bool, device=mem.k.device)
            keep[-length:] = summary_rows
            mem.k, mem.v = mem.k[:, :, keep], mem.v[:, :, keep]

    embed = inner.embed_tokens
    run(embed(prefix_ids), None)
    carry = 0
    n_vis = visual.shape[1]
    for start in range(0, n_vis, window):
        raw = visual[:, start : start + window]
        n = raw.shape[1]
        k_sum, _, _, carry_new = summary_layout(n, ratio, carry)
        length = n + k_sum
        x = torch.empty(1, length, raw.shape[2], dtype=raw.dtype, device=raw.device)
        is_sum = torch.zeros(length, dtype=torch.bool, device=raw.device)
        is_sum[summary_slots(n, ratio, carry).to(raw.device)] = True
        x[:, is_sum] = summary_embed.to(raw.dtype)
        x[:, ~is_sum] = raw
        run(x, is_sum)
        evict_after(is_sum, length)
        carry = carry_new
    h = run(embed(question_ids), None)
    logits, ids = [], []
    for step in range(max_new_tokens):
        lg = model.lm_head(h[:, -1]).float()
        nxt = lg.argmax(-1)
        logits.append(lg[0])
        ids.append(nxt[0])
        if step + 1 < max_new_tokens:
            h = run(embed(nxt[:, None]), None)
    return torch.stack(logits), torch.stack(ids)


__all__ = [
    "apply_rope", "evict_summaries", "raw_slots", "rope_cos_sin", "rotate_half",
    "summary_layout", "summary_slots", "videoxl_reference",
]
_ = math
