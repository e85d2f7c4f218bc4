"""ViLAMP's differential feature merging (DFM, "SigPooling") as a memory-bounded nn.Module.

Math (shared/methods/vilamp.md, the released ``SigPooling``), per frame n and patch p::

    A = X W_iq + b_iq      B = X W_ik + b_ik      (D -> D, every frame's patches)
    q = t W_q + b_q        (text dim, 512 for CLIP ViT-B/32 -> D; once per query)
    Kr = R W_k + b_k       (D -> D, the reference frames only)
    s[n,p] = ( cos(q, A[n,p]) - cos(Kr[ref(n),p], B[n,p]) ) / tau
    out[n] = sum_p softmax_p(s[n,:])[p] * X[n,p]        (weights applied to X itself)

``tau`` is a learned 0-d parameter initialised at 0.01; cosines use eps 1e-8.

What this module does differently from the released code (same numbers, see
``benchmarks/seed/vilamp_dfm.py`` for the released way):

* the query projection runs once (not on an (N, P, 512) repeat of the text vector) and the
  reference projection only on the K reference frames (not on an (N, P, D) repeat);
* frames are processed in chunks of ``chunk_frames``: only the chunk's two projections
  (2 x chunk x P x D) exist at a time, and each chunk is pooled by the fused op
  :func:`lvlm_fast.ops.diff_weighted_pool` (``rel=A_chunk, red=B_chunk``), so the forward
  peak is ``(N, D)`` output + K x P x D reference projections + O(chunk) scratch, flat in N;
* with autograd on, each chunk is recomputed in backward (``checkpoint=True``, non-reentrant
  activation checkpointing), so training memory stays flat in N as well. Gradients reach all
  four projections, ``tau`` and the inputs.

Reference convention (which keyframe each frame compares with)
----------------------------------------------------------------
``reference="nearest"`` (default, the paper's intent): frame n compares with the nearest
keyframe at or before it, same patch index. ``reference="released"`` reproduces the released
code's indexing slip: frames in the i-th keyframe segment compare with *frame number i*.
Frames before the first keyframe compare with themselves in both (``before_first="self"``:
``Kr = X[n] W_k + b_k``, which with learned projections is *not* a constant shift), or with
nothing (``before_first="none"``: the redundancy term is dropped). Keyframes compare with
themselves (nearest) or frame i (released); tokens at keyframe positions are computed like
any other row and the caller discards them (ViLAMP keeps all patches of a keyframe).
An explicit ``ref_index`` (N,) into the reference bank overrides both (-1 = before-first),
e.g. from ``lvlm_fast.ops.keyframe_select.reference_index_from_keyframes``; or ``ref_frame``
(N,) gives each frame's reference *frame number*, e.g. from
``lvlm_fast.ops.keyframe_select.released_reference_index`` (only the named frames are
projected). Without either, this module derives the index itself (a bisect per frame on the
host, from the keyframe list).

Loading the released weights
----------------------------
Parameter names are the released ones (``linear_iq``, ``linear_ik``, ``linear_q``,
``linear_k``, ``tau``), so ``module.state_dict()`` equals the released
``model.composer_projector.*`` tensors with the prefix stripped.
:meth:`DifferentialFeatureMerging.from_released_state_dict` and
:meth:`~DifferentialFeatureMerging.from_released_checkpoint` find the prefix, infer
``dim``/``text_dim`` from the shapes and load them.

Parameter-free mode (``learned=False``): no projections, ``A = B = X``, ``Kr = R``, the
query is given in D; ``tau`` is a fixed buffer.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from lvlm_fast.ops import diff_weighted_pool

__all__ = [
    "RELEASED_PREFIX",
    "DifferentialFeatureMerging",
    "dfm_reference",
    "nearest_preceding_reference",
    "released_reference",
]

RELEASED_PREFIX = "model.composer_projector."
_RELEASED_KEYS = (
    "linear_iq.weight", "linear_iq.bias", "linear_ik.weight", "linear_ik.bias",
    "linear_q.weight", "linear_q.bias", "linear_k.weight", "linear_k.bias", "tau",
)
DEFAULT_CHUNK_BYTES = 256 << 20  # per-chunk budget for the two (chunk, P, D) projections

Run = tuple[int, int, str]  # (lo, hi, kind) inside a chunk; kind in {"bank", "self"}
BEFORE_FIRST = -1  # internal per-frame reference codes (besides bank rows >= 0)
SELF = -2


# ---------------------------------------------------------------------- reference index
def nearest_preceding_reference(keyframe_indices: Sequence[int], n: int) -> list[int]:
    """``ref[f]`` = rank of the last keyframe at or before frame f, -1 before the first.
    ``keyframe_indices`` must be strictly increasing frame numbers in [0, n)."""
    return [bisect.bisect_right(keyframe_indices, f) - 1 for f in range(n)]


def released_reference(keyframe_indices: Sequence[int], n: int) -> tuple[list[int], list[int]]:
    """The released code's reading: ``(bank_frames, ref)`` with bank row i = *frame i* (the
    indexing slip) and ``ref[f]`` = the keyframe segment f lies in (-1 before the first)."""
    return list(range(len(keyframe_indices))), nearest_preceding_reference(keyframe_indices, n)


def _as_int_list(name: str, v: object) -> list[int]:
    if isinstance(v, torch.Tensor):
        if v.dim() != 1 or v.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got "
                            f"{v.dtype} of shape {tuple(v.shape)}")
        if v.device.type == "meta":
            raise ValueError(f"{name} must hold real values (a list or a CPU/CUDA tensor), "
                             "not a meta tensor: chunk planning reads it on the host")
        return [int(i) for i in v.tolist()]  # one host copy per forward (not per frame)
    if isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in v):
        return list(v)
    raise TypeError(f"{name} must be a 1-D int tensor or a sequence of ints, got {v!r:.80}")


# ---------------------------------------------------------------------- module
class DifferentialFeatureMerging(nn.Module):
    """ViLAMP DFM: one token per frame, pooled by query relevance minus keyframe redundancy.

    Args:
        dim: D, channel width of the patch features (the LLM width after ViLAMP's projector).
        text_dim: width of the text embedding ``t`` (512 for CLIP ViT-B/32); ignored when
            ``learned=False`` (the query is then given in D).
        learned: True = the released SigPooling with four projections and a learned ``tau``;
            False = parameter-free (``A = B = X``, ``Kr = R``, fixed ``tau``).
        tau: initial temperature (released: 0.01).
        chunk_bytes: default chunk size, as a byte budget for the chunk's two projections
            (``chunk_frames = max(1, chunk_bytes // (2 * P * D * itemsize))``; 256 MiB gives
            39 frames at P=729, D=1152 fp32). ``forward(chunk_frames=...)`` overrides it.
        checkpoint: recompute each chunk in backward (bounded training memory).
        reference: default reference convention, ``"nearest"`` or ``"released"``.
        before_first: ``"self"`` (released) or ``"none"``; see the module docstring.
        init_std: std of the normal init of the four weight matrices (released: 0.02).

    Shapes: ``x`` (N, P, D); ``text_emb`` (text_dim,) or (N, text_dim); out (N, D).
    """

    def __init__(
        self,
        dim: int,
        text_dim: int = 512,
        *,
        learned: bool = True,
        tau: float = 0.01,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint: bool = True,
        reference: Literal["nearest", "released"] = "nearest",
        before_first: Literal["self", "none"] = "self",
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self._check_choice("reference", reference, ("nearest", "released"))
        self._check_choice("before_first", before_first, ("self", "none"))
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.learned = learned
        self.text_dim = text_dim if learned else dim
        self.chunk_bytes = int(chunk_bytes)
        self.checkpoint = checkpoint
        self.reference = reference
        self.before_first = before_first
        if learned:
            self.linear_iq = nn.Linear(dim, dim, **fk)
            self.linear_ik = nn.Linear(dim, dim, **fk)
            self.linear_q = nn.Linear(text_dim, dim, **fk)
            self.linear_k = nn.Linear(dim, dim, **fk)
            for lin in (self.linear_iq, self.linear_ik, self.linear_q, self.linear_k):
                if lin.weight.device.type != "meta":
                    nn.init.normal_(lin.weight, mean=0.0, std=init_std)
            self.tau = nn.Parameter(torch.tensor(float(tau), **fk))
        else:
            self.register_buffer("tau", torch.tensor(float(tau), **fk))

    @staticmethod
    def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, text_dim={self.text_dim}, learned={self.learned}, "
                f"reference={self.reference!r}, before_first={self.before_first!r}")

    # ------------------------------------------------------------------ projections
    def project_query(self, text_emb: torch.Tensor) -> torch.Tensor:
        """``q = t W_q + b_q`` once: (text_dim,) -> (D,), (N, text_dim) -> (N, D)."""
        if not self.learned:
            return text_emb
        return self.linear_q(text_emb.to(self.linear_q.weight.dtype))

    def project_reference(self, r: torch.Tensor) -> torch.Tensor:
        """``Kr = R W_k + b_k`` for reference frames R (K, P, D) only."""
        return self.linear_k(r) if self.learned else r

    # ------------------------------------------------------------------ planning
    def chunk_frames_for(self, x: torch.Tensor) -> int:
        """Default frames per chunk for ``x`` (N, P, D) under ``chunk_bytes``."""
        _, p, d = x.shape
        return max(1, self.chunk_bytes // max(1, 2 * p * d * x.element_size()))

    def _resolve_reference(
        self, x: torch.Tensor, keyframe_indices, ref_bank, ref_index, reference: str,
        ref_frame=None,
    ) -> tuple[torch.Tensor, list[int]]:
        """-> (raw reference bank R (K, P, D), per-frame host ints: a bank row in [0, K),
        ``BEFORE_FIRST`` (-1, the ``before_first`` policy applies) or ``SELF`` (-2))."""
        n, p, d = x.shape
        if ref_frame is not None:
            if keyframe_indices is not None or ref_bank is not None or ref_index is not None:
                raise ValueError("ref_frame excludes keyframe_indices, ref_bank and ref_index")
            rf = _as_int_list("ref_frame", ref_frame)
            if len(rf) != n:
                raise ValueError(f"ref_frame must be (N={n},), got {len(rf)} entries")
            bad = [i for i, r in enumerate(rf) if not -1 <= r < n]
            if bad:
                raise ValueError(f"ref_frame values must be in [-1, N={n}); "
                                 f"ref_frame[{bad[0]}] = {rf[bad[0]]}")
            # Project only the frames some *other* frame refers to; a frame referring to
            # itself uses its own projection ("self" run), unless it is in the bank anyway.
            bank_frames = sorted({r for f, r in enumerate(rf) if r >= 0 and r != f})
            row = {fr: i for i, fr in enumerate(bank_frames)}
            ref = [row.get(r, SELF) if r >= 0 else BEFORE_FIRST for r in rf]
            if not bank_frames:  # every frame refers to itself or to nothing: dummy bank
                bank_frames = [0]
            idx = torch.tensor(bank_frames, dtype=torch.long, device=x.device)
            return x.index_select(0, idx), ref
        if (keyframe_indices is None) == (ref_bank is None):
            raise ValueError("give exactly one of keyframe_indices (K,) frame numbers, "
                             "ref_bank (K, P, D) reference features, or ref_frame (N,)")
        if ref_bank is not None:
            if not isinstance(ref_bank, torch.Tensor):
                raise TypeError(f"ref_bank must be a torch.Tensor, got {type(ref_bank).__name__}")
            if ref_bank.dim() != 3 or ref_bank.shape[0] < 1 or ref_bank.shape[1:] != (p, d):
                raise ValueError(f"ref_bank must be (K >= 1, P={p}, D={d}), got shape "
                                 f"{tuple(ref_bank.shape)}")
            if ref_index is None:
                raise ValueError("ref_bank needs ref_index (N,) (which bank row each frame "
                                 "compares with; -1 = before the first keyframe)")
            bank_raw = ref_bank
            k = ref_bank.shape[0]
        else:
            kf = _as_int_list("keyframe_indices", keyframe_indices)
            if not kf:
                raise ValueError("keyframe_indices must hold K >= 1 frame numbers, got none")
            if any(not 0 <= i < n for i in kf):
                raise ValueError(f"keyframe_indices values must be in [0, N={n}), got {kf}")
            if ref_index is None:
                if any(b <= a for a, b in itertools.pairwise(kf)):
                    raise ValueError("keyframe_indices must be strictly increasing to derive "
                                     f"the reference of each frame, got {kf}")
                if reference == "released":
                    bank_frames, ref = released_reference(kf, n)
                else:
                    bank_frames, ref = kf, nearest_preceding_reference(kf, n)
                idx = torch.tensor(bank_frames, dtype=torch.long, device=x.device)
                return x.index_select(0, idx), ref
            idx = torch.tensor(kf, dtype=torch.long, device=x.device)
            bank_raw = x.index_select(0, idx)
            k = len(kf)
        ref = _as_int_list("ref_index", ref_index)
        if len(ref) != n:
            raise ValueError(f"ref_index must be (N={n},), got {len(ref)} entries")
        bad = [i for i, r in enumerate(ref) if not -1 <= r < k]
        if bad:
            raise ValueError(f"ref_index values must be in [-1, K={k}); "
                             f"ref_index[{bad[0]}] = {ref[bad[0]]}")
        return bank_raw, ref

    @staticmethod
    def _runs(ref: list[int], s: int, e: int, self_frames: bool, before_self: bool
              ) -> list[Run]:
        """Split chunk [s, e) into maximal runs of frames that compare with the bank or with
        themselves. With the default conventions "self" frames are a prefix of the video, so
        a chunk has at most two runs."""
        if not self_frames:
            return [(0, e - s, "bank")]
        runs: list[Run] = []
        for f in range(s, e):
            is_self = ref[f] == SELF or (before_self and ref[f] == BEFORE_FIRST)
            kind = "self" if is_self else "bank"
            if runs and runs[-1][2] == kind:
                runs[-1] = (runs[-1][0], f - s + 1, kind)
            else:
                runs.append((f - s, f - s + 1, kind))
        return runs

    # ------------------------------------------------------------------ compute
    def _chunk_params(self) -> tuple[torch.Tensor, ...]:
        if not self.learned:
            return (self.tau,)
        return (self.tau, self.linear_iq.weight, self.linear_iq.bias, self.linear_ik.weight,
                self.linear_ik.bias, self.linear_k.weight, self.linear_k.bias)

    def _pool_chunk(self, xc: torch.Tensor, qc: torch.Tensor, bank: torch.Tensor,
                    refc: torch.Tensor, runs: list[Run], return_weights: bool,
                    *params: torch.Tensor):
        # The parameters arrive as arguments (not read from self) so that a checkpointed
        # recompute in backward uses the tensors of the forward, even under
        # torch.func.functional_call or if the module's weights were swapped in between.
        tau = params[0]
        if self.learned:
            w_iq, b_iq, w_ik, b_ik, w_k, b_k = params[1:]
            a, b = F.linear(xc, w_iq, b_iq), F.linear(xc, w_ik, b_ik)
        else:
            a = b = None
        outs, weights = [], []
        for lo, hi, kind in runs:
            whole = lo == 0 and hi == xc.shape[0]
            xs = xc if whole else xc[lo:hi]
            qs = qc if qc.dim() == 1 or whole else qc[lo:hi]
            rel = a if whole or a is None else a[lo:hi]
            red = b if whole or b is None else b[lo:hi]
            if kind == "self":  # frames before the first keyframe: reference = the frame
                rb = F.linear(xs, w_k, b_k) if self.learned else xs
                ri = torch.arange(hi - lo, device=xc.device)
            else:
                rb = bank
                ri = refc if whole else refc[lo:hi]
            res = diff_weighted_pool(xs, qs, rb, ri, rel=rel, red=red, tau=tau,
                                     return_weights=return_weights)
            if return_weights:
                outs.append(res[0])
                weights.append(res[1])
            else:
                outs.append(res)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if return_weights:
            return out, (weights[0] if len(weights) == 1 else torch.cat(weights))
        return out

    def forward(
        self,
        x: torch.Tensor,
        text_emb: torch.Tensor,
        keyframe_indices: torch.Tensor | Sequence[int] | None = None,
        *,
        ref_bank: torch.Tensor | None = None,
        ref_index: torch.Tensor | Sequence[int] | None = None,
        ref_frame: torch.Tensor | Sequence[int] | None = None,
        chunk_frames: int | None = None,
        reference: Literal["nearest", "released"] | None = None,
        before_first: Literal["self", "none"] | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One token per frame.

        Args:
            x: patch features X (N, P, D) (after ViLAMP's projector).
            text_emb: question embedding t, (text_dim,) or (N, text_dim) (D when not learned).
            keyframe_indices: (K,) frame numbers of the keyframes (strictly increasing unless
                ``ref_index`` is given); the reference bank is ``X[keyframe_indices]``.
            ref_bank: alternatively the raw reference frames R (K, P, D) (then ``ref_index``
                is required).
            ref_index: (N,) bank row per frame in [-1, K); -1 = before the first keyframe.
                Default: derived from ``keyframe_indices`` by ``reference``. This is what
                ``lvlm_fast.ops.keyframe_select.reference_index_from_keyframes`` returns.
            ref_frame: alternatively (N,) the *frame number* each frame compares with, in
                [-1, N) (-1 = before the first keyframe; a frame naming itself compares with
                its own projection). Only the frames named by other frames are projected.
                This is what ``lvlm_fast.ops.keyframe_select.released_reference_index``
                returns (the release's slip).
            chunk_frames: frames per chunk (default from ``chunk_bytes``).
            reference, before_first: override the module defaults for this call.
            return_weights: also return the softmax weights (N, P) (not differentiable).

        Index arguments are read on the host once per call (a list, or a CPU/CUDA tensor:
        one device-to-host copy); ``x`` may live on any device including ``meta``.
        """
        reference = self.reference if reference is None else reference
        before_first = self.before_first if before_first is None else before_first
        self._check_choice("reference", reference, ("nearest", "released"))
        self._check_choice("before_first", before_first, ("self", "none"))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.dim or 0 in x.shape:
            raise ValueError(f"x must be (N >= 1, P >= 1, D={self.dim}), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        n = x.shape[0]
        if not isinstance(text_emb, torch.Tensor):
            raise TypeError(f"text_emb must be a torch.Tensor, got {type(text_emb).__name__}")
        if (text_emb.dim() not in (1, 2) or text_emb.shape[-1] != self.text_dim
                or (text_emb.dim() == 2 and text_emb.shape[0] not in (1, n))):
            raise ValueError(f"text_emb must be ({self.text_dim},) or (N={n}, {self.text_dim}),"
                             f" got shape {tuple(text_emb.shape)}")
        if self.learned and x.dtype != self.linear_iq.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the module's weights are "
                            f"{self.linear_iq.weight.dtype}; convert one of them")
        if chunk_frames is None:
            chunk_frames = self.chunk_frames_for(x)
        elif not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) \
                or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive int, got {chunk_frames!r}")

        bank_raw, ref = self._resolve_reference(x, keyframe_indices, ref_bank, ref_index,
                                                reference, ref_frame)
        q = self.project_query(text_emb).to(x.dtype)
        if q.dim() == 2 and q.shape[0] == 1:
            q = q[0]
        bank = self.project_reference(bank_raw.to(x.dtype))
        del bank_raw  # the raw K frames are not needed once projected
        before_self = before_first == "self"
        self_frames = min(ref) == SELF or (before_self and min(ref) < 0)
        ref_t = torch.tensor(ref, dtype=torch.long, device=x.device)
        ckpt = self.checkpoint and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

        params = self._chunk_params()
        outs, weights = [], []
        for s in range(0, n, chunk_frames):
            e = min(n, s + chunk_frames)
            xc = x[s:e]
            qc = q if q.dim() == 1 else q[s:e]
            runs = self._runs(ref, s, e, self_frames, before_self)
            if ckpt:
                res = _checkpoint(self._pool_chunk, xc, qc, bank, ref_t[s:e], runs,
                                  return_weights, *params, use_reentrant=False)
            else:
                res = self._pool_chunk(xc, qc, bank, ref_t[s:e], runs, return_weights,
                                       *params)
            if return_weights:
                outs.append(res[0])
                weights.append(res[1].detach())
            else:
                outs.append(res)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if return_weights:
            return out, (weights[0] if len(weights) == 1 else torch.cat(weights))
        return out

    # ------------------------------------------------------------------ released weights
    @classmethod
    def from_released_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], prefix: str | None = None, **kwargs,
    ) -> DifferentialFeatureMerging:
        """Build from the released ViLAMP weights (``SigPooling``, stored under
        ``model.composer_projector.``). ``prefix`` is found automatically (the key ending in
        ``linear_iq.weight``) unless given; ``dim`` and ``text_dim`` come from the shapes,
        the dtype from the weights. Extra ``kwargs`` go to the constructor."""
        if prefix is None:
            hits = [k[: -len("linear_iq.weight")] for k in state_dict
                    if k.endswith("linear_iq.weight")]
            if len(hits) != 1:
                raise ValueError("cannot find the SigPooling weights: expected exactly one key "
                                 f"ending in 'linear_iq.weight', found {hits or 'none'}")
            prefix = hits[0]
        missing = [prefix + k for k in _RELEASED_KEYS if prefix + k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks SigPooling keys: {missing}")
        sub = {k: state_dict[prefix + k] for k in _RELEASED_KEYS}
        dim = sub["linear_iq.weight"].shape[0]
        text_dim = sub["linear_q.weight"].shape[1]
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        # Build on meta (no init work), then adopt the given tensors as the parameters.
        mod = cls(dim, text_dim, learned=True, device="meta", **kwargs)
        mod.load_state_dict({k: v.reshape(()) if k == "tau" else v for k, v in sub.items()},
                            strict=True, assign=True)
        if device is not None or dtype is not None:
            mod = mod.to(device=device, dtype=dtype)
        return mod

    @classmethod
    def from_released_checkpoint(cls, path: str | os.PathLike, **kwargs
                                 ) -> DifferentialFeatureMerging:
        """Load from a released checkpoint: a directory of ``*.safetensors`` shards (reads
        only the SigPooling tensors) or one ``.safetensors`` / ``.bin`` / ``.pt`` file."""
        path = os.fspath(path)
        want = "composer_projector."
        tensors: dict[str, torch.Tensor] = {}
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    wmap = json.load(f)["weight_map"]
                files = sorted({os.path.join(path, v) for k, v in wmap.items() if want in k})
            if not files:
                files = sorted(glob.glob(os.path.join(path, "*.bin")))
        else:
            files = [path]
        for fp in files:
            if fp.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(fp, framework="pt") as f:
                    for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        if want in k:
                            tensors[k] = f.get_tensor(k)
            else:
                sd = torch.load(fp, map_location="cpu", weights_only=True)
                tensors.update({k: v for k, v in sd.items() if want in k})
        if not tensors:
            raise ValueError(f"no '{want}*' tensors found in {path}")
        return cls.from_released_state_dict(tensors, **kwargs)


# ---------------------------------------------------------------------- executable spec
def dfm_reference(
    module: DifferentialFeatureMerging,
    x: torch.Tensor,
    text_emb: torch.Tensor,
    keyframe_indices: Sequence[int] | torch.Tensor | None = None,
    *,
    ref_bank: torch.Tensor | None = None,
    ref_index: Sequence[int] | torch.Tensor | None = None,
    ref_frame: Sequence[int] | torch.Tensor | None = None,
    reference: str | None = None,
    before_first: str | None = None,
) -> torch.Tensor:
    """Unchunked composition on :func:`lvlm_fast.reference.diff_weighted_pool` (the spec):
    project all N x P patches at once, build a bank of the K reference projections plus,
    for "self" frames, each frame's own projection. Memory grows with N; tests only."""
    from lvlm_fast.reference import diff_weighted_pool as ref_pool

    reference = module.reference if reference is None else reference
    before_first = module.before_first if before_first is None else before_first
    bank_raw, ref = module._resolve_reference(x, keyframe_indices, ref_bank, ref_index,
                                              reference, ref_frame)
    n = x.shape[0]
    k = bank_raw.shape[0]
    q = module.project_query(text_emb).to(x.dtype)
    bank = module.project_reference(bank_raw.to(x.dtype))
    rel = module.linear_iq(x) if module.learned else None
    red = module.linear_ik(x) if module.learned else None
    ri = torch.tensor(ref, dtype=torch.long, device=x.device)
    is_self = (ri == SELF) | ((ri == BEFORE_FIRST) & (before_first == "self"))
    if bool(is_self.any()):
        bank = torch.cat([bank, module.project_reference(x)])  # row K + f = frame f itself
        ri = torch.where(is_self, k + torch.arange(n, device=x.device), ri)
    return ref_pool(x, q, bank, ri, rel=rel, red=red, tau=module.tau)

