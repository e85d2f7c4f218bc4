"""Seed-style Video-XL window step, written the way the released code does it.

Per window and per layer: boolean gather/scatter for the summary projections, keys kept
*before* RoPE, ``torch.cat`` of the memory with the window, RoPE over the whole
concatenated cache, ``repeat_kv`` copies for GQA, a float mask (1, 1, q, mem + q) built
every window and SDPA with that mask; then the LM head on every window token in fp32, and
eviction by boolean indexing (another copy of the cache). Window features are placed by a
per-token Python loop (one host sync per token), as in the released code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvlm_fast.reference.videoxl import apply_rope, rope_cos_sin


def seed_sdpa_attention(q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The released SDPA path: concatenate, repeat KV, explicit float mask."""
    kc = torch.cat([mem_k, k], dim=2)
    vc = torch.cat([mem_v, v], dim=2)
    g = q.shape[1] // kc.shape[1]
    kc, vc = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
    lq, s = q.shape[2], kc.shape[2]
    mask = torch.full((lq, s), float("-inf"), dtype=q.dtype, device=q.device)
    mask = torch.triu(mask, diagonal=s - lq + 1)[None, None]
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale)


class SeedVideoXL:
    """State: per layer the pre-RoPE memory (1, Hkv, M, D) of sink + retained summaries."""

    def __init__(self, model, summary_weights, summary_embed: torch.Tensor) -> None:
        self.model = model
        self.sw = summary_weights
        self.vst = summary_embed
        cfg = model.config
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.inv_freq = model.model.rotary_emb.inv_freq
        self.mem_k: list[torch.Tensor] = []
        self.mem_v: list[torch.Tensor] = []

    def set_memory(self, mem_k: list[torch.Tensor], mem_v: list[torch.Tensor]) -> None:
        self.mem_k, self.mem_v = list(mem_k), list(mem_v)

    @torch.no_grad()
    def window(self, raw: torch.Tensor, ratio: int, carry: int) -> torch.Tensor:
        """One window (raw (1, n, D)); updates the memory; returns the window logits."""
        n = raw.shape[1]
        k_sum = (n + carry) // ratio
        length = n + k_sum
        is_sum = torch.zeros(length, dtype=torch.bool, device=raw.device)
        is_sum[(ratio - carry) + (ratio + 1) * torch.arange(k_sum, device=raw.device)] = True
        x = torch.empty(1, length, raw.shape[2], dtype=raw.dtype, device=raw.device)
        j = 0
        for i in range(length):  # released: per-token placement, a host sync per token
            if bool(is_sum[i]):
                x[0, i] = self.vst
            else:
                x[0, i] = raw[0, j]
                j += 1
        h = x
        for li, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            res = h
            hs = layer.input_layernorm(h)
            base = (getattr(attn.q_proj, "base", attn.q_proj),
                    getattr(attn.k_proj, "base", attn.k_proj),
                    getattr(attn.v_proj, "base", attn.v_proj))
            q, k, v = (F.linear(hs, b.weight, b.bias) for b in base)
            sw = self.sw[li]
            q[:, is_sum] = sw["q"](hs[:, is_sum])
            k[:, is_sum] = sw["k"](hs[:, is_sum])
            v[:, is_sum] = sw["v"](hs[:, is_sum])
            q = q.view(1, length, self.nh, self.hd).transpose(1, 2)
            k = k.view(1, length, self.nkv, self.hd).transpose(1, 2)
            v = v.view(1, length, self.nkv, self.hd).transpose(1, 2)
            mk, mv = self.mem_k[li], self.mem_v[li]
            total = mk.shape[2] + length
            cos, sin = rope_cos_sin(torch.arange(total, device=x.device), self.inv_freq)
            k_all = apply_rope(torch.cat([mk, k], 2), cos, sin)  # whole-cache RoPE every call
            q = apply_rope(q, cos[-length:], sin[-length:])
            o = seed_sdpa_attention(q, k_all[:, :, : mk.shape[2]], mv, k_all[:, :, mk.shape[2]:],
                                    v, attn.scaling)
            o = o.transpose(1, 2).reshape(1, length, self.nh * self.hd)
            h = res + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            keep = torch.cat([torch.ones(mk.shape[2], dtype=torch.bool, device=x.device), is_sum])
            self.mem_k[li] = torch.cat([mk, k], 2)[:, :, keep]
            self.mem_v[li] = torch.cat([mv, v], 2)[:, :, keep]
        h = self.model.model.norm(h)
        return self.model.lm_head(h).float()  # released: LM head on every window token, fp32
