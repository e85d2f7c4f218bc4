"""Meta-device stand-ins for the GPU kernels a deployment runs (simulated profiles only).

Where transformers' own code path on the meta device is a *different algorithm* from the
one a GPU deployment runs, a simulated profile would count the wrong transient tensors and
could take hours. Two such places, both on Qwen3.5:

1. **Gated DeltaNet** (the linear-attention layers). Without ``flash-linear-attention``
   (FLA) transformers runs ``torch_chunk_gated_delta_rule``: fp32 copies of q/k/v, q/k
   repeated to the value heads, per-chunk (64 x 64) systems solved in fp32, then a Python
   loop over every 64-token chunk. On meta that is ~30 min per strategy at 10,240 frames, and
   its transients are not the FLA kernel's. :func:`fla_chunk_gated_delta_rule_meta` returns
   the same outputs (shapes, dtypes) and allocates, in order, the tensors FLA's
   ``chunk_gated_delta_rule`` forward allocates (``fla/ops/gated_delta_rule/chunk.py``,
   ``ChunkGatedDeltaRuleFunction.forward`` -> ``chunk_gated_delta_rule_fwd``), with no loop.
   With ``B`` batch, ``T`` tokens, ``Hk``/``Hv`` key/value heads (grouped: transformers
   passes q/k with ``Hk`` heads), ``K``/``V`` head dims, ``s`` the dtype's bytes,
   ``NT = ceil(T / 64)``:

   ===================================  ==============================  ================
   step (FLA)                           tensor                           bytes
   ===================================  ==============================  ================
   ``input_guard`` (``.contiguous()``)  copies of non-contiguous q, k,   B T (2 Hk K + Hv V) s
                                        v (views of the conv output)     (only those not
                                                                         contiguous)
   ``l2norm_fwd(q)``, ``(k)``           normalised q, k; rstd (fp32)     2 B T Hk (K s + 4)
   ``chunk_local_cumsum(g)``            cumulative gate (fp32)           B T Hv 4
   ``chunk_scaled_dot_kkt_fwd``         A (fp32)                         B T Hv 64 4
   ``solve_tril`` (A fp32 freed after)  A^-1 in the input dtype          B T Hv 64 s
   ``recompute_w_u_fwd``                w, u                             B T Hv (K + V) s
   ``chunk_gated_delta_rule_fwd_h``     h (state at every chunk start),  B NT Hv K V s,
                                        v_new, final state (fp32)        B T Hv V s,
                                                                         B Hv K V 4
   ``chunk_fwd_o``                      o                                B T Hv V s
   ===================================  ==============================  ================

   On return (no autograd graph under ``inference_mode``) only ``o`` and the final state stay
   alive. :func:`fla_gdn_peak_bytes` is this table's peak; a tier-0 test checks the
   stand-in's tracked peak equals it and its outputs match transformers' function. Labelled
   in the profile's output and JSON as a model of the FLA kernel: no GPU ran it. The causal
   conv in front of it stays transformers' (one ``conv1d``; the ``causal-conv1d`` kernel
   allocates the same output less ``kernel - 1`` columns).

2. **Full attention with head dim 256** (Qwen3.5's full-attention layers). The package's
   fused attention covers head dims (64, 80, 96, 128), so the wrapper keeps the model's own
   attention, and transformers' SDPA path builds a (chunk x context) mask and repeats K/V to
   the query heads. A GPU deployment runs FlashAttention-2 there (head dims up to 256):
   bottom-right causal, grouped K/V read in place, no mask, no score matrix; it allocates
   the output and the fp32 log-sum-exp ``(B, Hq, L)``. :func:`flash_attention_meta` is that,
   registered as the transformers attention ``"lvlm_profile_fa2"`` (with a mask function
   that builds nothing) and switched on by :func:`simulation_kernels` for a decoder whose
   head dim the fused kernel lacks and FA2 supports.

Only meta tensors take these paths; anything else runs transformers' code unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

__all__ = [
    "FLASH_MAX_HEAD_DIM",
    "FLA_CHUNK",
    "PROFILE_FLASH",
    "fla_chunk_gated_delta_rule_meta",
    "fla_gdn_peak_bytes",
    "flash_attention_meta",
    "simulation_kernels",
    "uses_flash_standin",
]

FLA_CHUNK = 64  # FLA's chunk size for the gated delta rule (fixed in chunk_gated_delta_rule_fwd)
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 forward: head dims up to 256
PROFILE_FLASH = "lvlm_profile_fa2"  # no "flash" in it: transformers reads that as a hub kernel


# ---------------------------------------------------------------------- Gated DeltaNet
def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def fla_chunk_gated_delta_rule_meta(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
    beta: torch.Tensor, chunk_size: int = FLA_CHUNK, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Meta stand-in for FLA's ``chunk_gated_delta_rule`` with transformers' calling
    convention (``torch_chunk_gated_delta_rule``'s arguments): q/k ``(B, T, Hk, K)``, v
    ``(B, T, Hv, V)``, g/beta ``(B, T, Hv)``. Returns ``(o (B, T, Hv, V) in q's dtype,
    final state (B, Hv, K, V) fp32 or None)`` and allocates FLA's transients in FLA's order
    (module docstring table). ``chunk_size`` is ignored: FLA's is 64."""
    dev, dt = query.device, query.dtype
    # input_guard: every tensor argument made contiguous (a copy for the conv-output views)
    # (input_guard holds them until the call returns)
    guarded = [x.contiguous() for x in (query, key, value, g, beta)]
    if initial_state is not None:
        guarded.append(initial_state.contiguous())
    q, k, v = guarded[:3]
    b, t, hk, dk = k.shape
    hv, dv = v.shape[-2:]
    nt = math.ceil(t / FLA_CHUNK)
    if use_qk_l2norm_in_kernel:  # l2norm_fwd: y = empty_like(x), rstd fp32 per row
        q, q_rstd = torch.empty_like(q), _empty((b * t * hk,), torch.float32, dev)
        k, k_rstd = torch.empty_like(k), _empty((b * t * hk,), torch.float32, dev)
    g_cum = _empty((b, t, hv), torch.float32, dev)  # chunk_local_cumsum
    a32 = _empty((b, t, hv, FLA_CHUNK), torch.float32, dev)  # chunk_scaled_dot_kkt_fwd
    a = _empty((b, t, hv, FLA_CHUNK), k.dtype, dev)  # solve_tril(output_dtype=k.dtype)
    del a32
    w = _empty((b, t, hv, dk), k.dtype, dev)  # recompute_w_u_fwd
    u = _empty((b, t, hv, dv), v.dtype, dev)
    h = _empty((b, nt, hv, dk, dv), k.dtype, dev)  # chunk_gated_delta_rule_fwd_h
    v_new = torch.empty_like(u)
    final = _empty((b, hv, dk, dv), torch.float32, dev) if output_final_state else None
    o = torch.empty_like(v)  # chunk_fwd_o
    del w, u, h, v_new, a, g_cum, q, k, v, guarded
    if use_qk_l2norm_in_kernel:
        del q_rstd, k_rstd
    return o.to(dt), final


def fla_gdn_peak_bytes(b: int, t: int, hk: int, hv: int, dk: int, dv: int, itemsize: int, *,
                       copies: tuple[bool, bool, bool] = (True, True, True),
                       l2norm: bool = True, final_state: bool = True) -> int:
    """Peak bytes above entry of :func:`fla_chunk_gated_delta_rule_meta` (the module
    docstring's table): ``copies`` says which of q, k, v ``input_guard`` copies (the
    non-contiguous ones)."""
    s, nt, c = itemsize, math.ceil(t / FLA_CHUNK), FLA_CHUNK
    base = b * t * (hk * dk * (copies[0] + copies[1]) + hv * dv * copies[2]) * s
    if l2norm:
        base += 2 * b * t * hk * (dk * s + 4)
    base += b * t * hv * 4  # cumulative gate
    phase_a = b * t * hv * c * (4 + s)  # A fp32 and A^-1 together
    phase_b = (b * t * hv * c * s + b * t * hv * (dk + dv) * s + b * nt * hv * dk * dv * s
               + b * t * hv * dv * s + (b * hv * dk * dv * 4 if final_state else 0)
               + b * t * hv * dv * s)
    return base + max(phase_a, phase_b)


# ---------------------------------------------------------------------- FlashAttention-2
def flash_attention_meta(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (meta only): q ``(B, Hq, L, D)``, k/v ``(B, Hkv, S,
    D)`` -> ``(B, L, Hq, Dv)``, bottom-right causal, as FlashAttention-2's forward
    allocates it: the output in the query's memory order (``empty_like(q)`` on the
    ``(B, L, H, D)`` view transformers passes) and the fp32 log-sum-exp ``(B, Hq, L)``
    (freed on return: no autograd graph in inference)."""
    if not query.is_meta:
        raise RuntimeError(f"{PROFILE_FLASH!r} is a meta-device stand-in for simulated "
                           "profiles; real tensors need a real attention implementation")
    if attention_mask is not None:
        raise ValueError(f"{PROFILE_FLASH!r} takes no attention mask (bottom-right causal)")
    q = query.transpose(1, 2)  # (B, L, Hq, D), the layout flash_attn_func receives
    b, n, hq, _ = q.shape
    shape = (b, n, hq, value.shape[-1])
    order = sorted(range(4), key=lambda i: -q.stride(i))  # outermost first
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=query.device)
    out = torch.empty_permuted(shape, order, dtype=query.dtype, device=query.device)
    del lse
    return out, None


def _flash_mask(*args: Any, **kwargs: Any) -> None:
    """Mask function for ``"lvlm_profile_fa2"``: builds nothing (the kernel is causal)."""
    return None


AttentionInterface.register(PROFILE_FLASH, flash_attention_meta)
AttentionMaskInterface.register(PROFILE_FLASH, _flash_mask)


def _decoder_head_dim(model: torch.nn.Module) -> int:
    tc = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config.text_config
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def uses_flash_standin(model: torch.nn.Module) -> bool:
    """True where a simulated profile counts the decoder's attention as FlashAttention-2:
    a head dim above the package's fused kernel's (64, 80, 96, 128) that FA2 supports
    (<= 256; Qwen3.5-9B: 256). Smaller head dims outside the fused set occur only in the
    tiny test configs, which keep the model's SDPA so that their simulated peaks equal
    the CPU measurement (which runs SDPA)."""
    from lvlm_fast.ops.summary_attention import HEAD_DIMS

    d = _decoder_head_dim(model)
    return max(HEAD_DIMS) < d <= FLASH_MAX_HEAD_DIM


def _gdn_modules() -> list[Any]:
    """transformers modules whose Gated DeltaNet calls ``torch_chunk_gated_delta_rule``."""
    import importlib

    mods = []
    for name in ("transformers.models.qwen3_5.modeling_qwen3_5",):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            continue
    return [m for m in mods if hasattr(m, "torch_chunk_gated_delta_rule")]


@contextlib.contextmanager
def simulation_kernels(model: torch.nn.Module, *, gdn: bool = True,
                       flash: bool = True) -> Iterator[dict[str, str]]:
    """While active, a meta run of ``model`` uses the stand-ins: ``gdn`` replaces
    transformers' ``torch_chunk_gated_delta_rule`` for meta inputs (real tensors still run
    it), ``flash`` sets the decoder's attention to ``"lvlm_profile_fa2"`` where
    :func:`uses_flash_standin`. Yields ``{what: model label}`` of what was switched on
    (stated in the profile's output); restores everything on exit."""
    used: dict[str, str] = {}
    undo: list[Any] = []
    try:
        if gdn and any(t == "linear_attention" for t in
                       getattr(model.config.get_text_config(), "layer_types", None) or ()):
            for mod in _gdn_modules():
                orig = mod.torch_chunk_gated_delta_rule

                def patched(query, *args, _orig=orig, **kwargs):
                    if isinstance(query, torch.Tensor) and query.is_meta:
                        return fla_chunk_gated_delta_rule_meta(query, *args, **kwargs)
                    return _orig(query, *args, **kwargs)

                mod.torch_chunk_gated_delta_rule = patched
                undo.append(lambda m=mod, o=orig: setattr(m, "torch_chunk_gated_delta_rule", o))
            used["linear_attention"] = ("flash-linear-attention chunk_gated_delta_rule "
                                        "(meta model of its allocations)")
        if flash and uses_flash_standin(model):
            lm = model.model.language_model
            old = lm.config._attn_implementation
            lm.set_attn_implementation(PROFILE_FLASH)
            undo.append(lambda: lm.set_attn_implementation(old))
            used["full_attention"] = (f"FlashAttention-2 (head dim {_decoder_head_dim(model)}; "
                                      "meta model: output + fp32 log-sum-exp)")
        yield used
    finally:
        for fn in reversed(undo):
            fn()
