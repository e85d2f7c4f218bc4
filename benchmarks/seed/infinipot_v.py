"""Seed-style InfiniPot-V KV compression, written the way the released code does it
(aiha-lab/InfiniPot-V ``kvcache_utils.py::process_kv_cache``, method ``tar_val``; see
``shared/methods/infinipot_v.md`` section 4 for its costs).

Per compression, a Python loop over layers; per layer (batch 1, heads vectorised):
slice off the system tokens; L2-normalise the recent and the older vision keys (two full
normalised copies, ``x / (||x|| + 1e-9)``); TaR as a broadcast product of shape
(1, H, r, f - r, P, D) summed over D and averaged over the r recent frames; recent
indices built with ``arange`` (on the host in the released code, then copied); top-k on
TaR, cat with the recent indices, sort; VaN = ``||V||``; the TaR + recent union scattered
to ``max(VaN) + 1``; a second top-|C| and sort; an ``.max()`` assert (a host sync); the
kept rows gathered by advanced indexing into new tensors and ``torch.cat`` after the
system rows (old and new caches coexist until the old one is dropped). Keys are not
re-rotated (the released code keeps post-RoPE keys at their original positions).
"""

from __future__ import annotations

import torch


def seed_compress_layer(key: torch.Tensor, value: torch.Tensor, system_size: int,
                        tokens_per_frame: int, keep_frames: int, recent_frames: int,
                        tar_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer: key/value (1, H, S, D) -> (new key, new value, kept vision indices (H, |C|))."""
    heads = key.shape[1]
    k_vis = key[:, :, system_size:, :]
    v_vis = value[:, :, system_size:, :]
    total = k_vis.shape[2]
    keep_tokens = keep_frames * tokens_per_frame
    van_budget = round((1 - tar_ratio) * keep_tokens)
    tar_budget = keep_tokens - van_budget
    q_len = recent_frames * tokens_per_frame
    recent = k_vis[:, :, -q_len:, :]
    old = k_vis[:, :, :-q_len, :]
    recent_n = recent / (recent.norm(dim=-1, keepdim=True) + 1e-9)
    old_n = old / (old.norm(dim=-1, keepdim=True) + 1e-9)
    d = key.shape[-1]
    recent_n = recent_n.reshape(1, heads, recent_frames, tokens_per_frame, d)
    old_n = old_n.reshape(1, heads, -1, tokens_per_frame, d)
    tar = -(recent_n.unsqueeze(3) * old_n.unsqueeze(2)).sum(dim=-1).mean(dim=2)
    tar = tar.reshape(1, heads, -1)
    recent_idx = torch.arange(total - q_len, total).unsqueeze(0).expand(heads, -1).to(key.device)
    tar_idx = tar.topk(tar_budget - q_len, dim=-1).indices.squeeze(0)
    tar_idx, _ = torch.cat([tar_idx, recent_idx], dim=-1).sort(dim=-1)
    van = v_vis.norm(dim=-1)[0]  # (H, total)
    rows = torch.arange(heads, device=key.device).unsqueeze(1).expand(-1, tar_idx.shape[1])
    van[rows, tar_idx] = van.max() + 1
    idx, _ = van.topk(keep_tokens, dim=-1).indices.sort(dim=-1)
    assert idx.max() <= total  # the released code's check (a device -> host sync)
    b_idx = torch.zeros_like(idx)
    h_idx = torch.arange(heads, device=key.device).unsqueeze(1).expand(-1, idx.shape[1])
    new_k = k_vis[b_idx, h_idx, idx].unsqueeze(0)
    new_v = v_vis[b_idx, h_idx, idx].unsqueeze(0)
    new_k = torch.cat([key[:, :, :system_size, :], new_k], dim=2)
    new_v = torch.cat([value[:, :, :system_size, :], new_v], dim=2)
    return new_k, new_v, idx


def seed_process_kv_cache(keys: list[torch.Tensor], values: list[torch.Tensor],
                          system_size: int, tokens_per_frame: int, keep_frames: int,
                          recent_frames: int, tar_ratio: float = 0.5
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Every layer in a Python loop; returns new per-layer caches and kept indices."""
    new_keys, new_values, kept = [], [], []
    for key, value in zip(keys, values, strict=True):
        k, v, idx = seed_compress_layer(key, value, system_size, tokens_per_frame, keep_frames,
                                        recent_frames, tar_ratio)
        new_keys.append(k)
        new_values.append(v)
        kept.append(idx)
    return new_keys, new_values, kept
