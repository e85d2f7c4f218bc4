"""Video-LLaMA's Video and Audio Q-Formers on the streaming fused cross-attention op.

The released architecture (``init_video_Qformer`` in DAMO-NLP-SG/Video-LLaMA; method facts
in ``shared/methods/videollama.md``): a 2-layer post-LN BERT with cross-attention in every
layer, a query-only FFN and an input LayerNorm on the learned query tokens::

    h = LN_emb(query_tokens)
    per layer:  a = LN(h + Dense(SelfAttn(h)))
                c = LN(a + Dense(CrossAttn(a, E)))          E = frame tokens + frame position
                h = LN(c + W2 GELU(W1 c))                   (intermediate_query / output_query)

No final LN. The cross-attention runs through :func:`lvlm_fast.ops.qformer_cross_attention`
chunk by chunk with exact log-sum-exp merges, so K/V and scores are never materialised and
memory is constant in T. Layer 1's queries depend on layer 0's result over *all* frames,
so the module makes one streaming pass over the frame tokens per layer (two passes).

Positions. Row t of the frame-position table is added to every token of frame t (audio:
to each clip's embedding). The released tables have 32 rows (video) and 8 rows (audio)
and raise an index error beyond them; **only rows 0-7 were ever trained** (every released
config uses 8 frames / 8 clips), so video rows 8-31 are near their random N(0, 1) init.
For T beyond the table the knob ``position`` chooses a rule:

* ``"error"`` (default): raise, like the released code - positions are never invented;
* ``"clamp"``: frames t >= rows reuse the last row (video: the untrained row 31);
* ``"interpolate"``: the table is linearly resampled to T rows (align_corners: row 0 and
  the last row stay at the ends), so every frame gets a blend of its neighbours' rows.
  For video this spreads the untrained rows 8-31 over the video.

Neither extension was trained; for T <= rows every mode is the released model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lvlm_fast.ops.qformer_cross_attention import merge, qformer_cross_attention

POSITION_MODES = ("error", "interpolate", "clamp")


class _Attention(nn.Module):
    """BertAttention: ``self.{query,key,value}`` + ``output.{dense,LayerNorm}`` (flattened)."""

    def __init__(self, hidden: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)


class _Layer(nn.Module):
    def __init__(self, hidden: int, enc_width: int, inter: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(hidden, hidden, eps)
        self.crossattention = _Attention(hidden, enc_width, eps)
        self.intermediate_query = nn.Linear(hidden, inter)
        self.output_query = nn.Linear(inter, hidden)
        self.output_query_LayerNorm = nn.LayerNorm(hidden, eps=eps)


# (our parameter suffix, released key suffix) for one layer, both relative to the layer
_LAYER_KEYS = []
for _ours, _theirs in (("attention", "attention"), ("crossattention", "crossattention")):
    for _p in ("query", "key", "value"):
        _LAYER_KEYS.append((f"{_ours}.{_p}", f"{_theirs}.self.{_p}"))
    _LAYER_KEYS.append((f"{_ours}.dense", f"{_theirs}.output.dense"))
    _LAYER_KEYS.append((f"{_ours}.LayerNorm", f"{_theirs}.output.LayerNorm"))
_LAYER_KEYS += [("intermediate_query", "intermediate_query.dense"),
                ("output_query", "output_query.dense"),
                ("output_query_LayerNorm", "output_query.LayerNorm")]  # fmt: skip


class QFormerBranch(nn.Module):
    """One Video-LLaMA Q-Former branch (shared by :class:`VideoQFormer` and
    :class:`AudioQFormer`). ``forward(frames)`` -> (B, num_queries, hidden) Q-Former output;
    :meth:`project` applies the branch's ``llama_proj`` (when built with an LLM width)."""

    RELEASED_PREFIX = ""
    QUERY_KEY = ""
    POSITION_KEY = ""
    PROJ_PREFIX = ""

    def __init__(
        self,
        *,
        num_queries: int,
        encoder_width: int,
        max_positions: int,
        hidden_size: int = 768,
        num_layers: int = 2,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-12,
        llm_hidden_size: int | None = None,
        position: str = "error",
        chunk_frames: int = 256,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self._check_position(position)
        if not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive int, got {chunk_frames!r}")
        self.num_heads = num_heads
        self.encoder_width = encoder_width
        self.position = position
        self.chunk_frames = chunk_frames
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.frame_position = nn.Embedding(max_positions, encoder_width)
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = nn.ModuleList(
            _Layer(hidden_size, encoder_width, intermediate_size, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.llama_proj = nn.Linear(hidden_size, llm_hidden_size) if llm_hidden_size else None

    # ----------------------------------------------------------------------- positions
    @staticmethod
    def _check_position(position: str) -> None:
        if position not in POSITION_MODES:
            raise ValueError(f"position must be one of {POSITION_MODES}, got {position!r}")

    def position_rows(self, t0: int, n: int, total: int, position: str | None = None):
        """(n, E) position rows of frames t0 .. t0+n-1 of a T=``total``-frame input."""
        position = self.position if position is None else position
        self._check_position(position)
        table = self.frame_position.weight
        rows = table.shape[0]
        if total <= rows:
            return table[t0:t0 + n]
        if position == "error":
            raise ValueError(
                f"{total} frames exceed the {rows}-row frame-position table (the released model "
                f"raises an index error; only rows 0-7 were trained). Pass position='clamp' or "
                f"'interpolate' to extend it explicitly, or use at most {rows} frames."
            )
        if position == "clamp":
            idx = torch.arange(t0, t0 + n, device=table.device).clamp_(max=rows - 1)
            return table[idx]
        # interpolate: x_t = t * (rows - 1) / (total - 1), linear between neighbouring rows
        x = torch.arange(t0, t0 + n, device=table.device, dtype=torch.float64)
        x = x * (rows - 1) / (total - 1)
        lo = x.floor().long().clamp_(max=rows - 2)
        w = (x - lo).to(table.dtype)[:, None]
        return table[lo] * (1 - w) + table[lo + 1] * w

    # ----------------------------------------------------------------------- forward
    def _chunks(self, frames) -> tuple[list[torch.Tensor], int]:
        width = self.encoder_width
        if isinstance(frames, torch.Tensor):
            chunks = [frames]
        elif isinstance(frames, Sequence) and frames and all(
            isinstance(c, torch.Tensor) for c in frames
        ):
            chunks = list(frames)
        else:
            raise TypeError("frames must be a tensor or a non-empty sequence of tensor chunks, "
                            f"got {type(frames).__name__}")  # fmt: skip
        out = []
        for i, c in enumerate(chunks):
            name = "frames" if isinstance(frames, torch.Tensor) else f"frames[{i}]"
            if c.dim() == 3:  # audio layout (B, T, E): one token per clip
                c = c.unsqueeze(2)
            if c.dim() != 4 or c.shape[-1] != width or c.shape[1] < 1:
                raise ValueError(f"{name} must be (B, T, S, {width}) or (B, T, {width}) with "
                                 f"T >= 1, got shape {tuple(c.shape)}")  # fmt: skip
            if out and (c.shape[0], c.shape[2]) != (out[0].shape[0], out[0].shape[2]):
                raise ValueError(f"{name} has shape {tuple(c.shape)}: every chunk must share "
                                 f"frames[0]'s batch and tokens per frame")  # fmt: skip
            if not c.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {c.dtype}")
            out.append(c)
        if isinstance(frames, torch.Tensor):  # split a whole video into chunks of frames
            out = list(out[0].split(self.chunk_frames, dim=1))
        return out, sum(c.shape[1] for c in out)

    def _cross(self, att: _Attention, a: torch.Tensor, chunks, total, position):
        q = att.query(a)
        out = lse = None
        t0 = 0
        for c in chunks:
            n = c.shape[1]
            pos = self.position_rows(t0, n, total, position)
            o, l_ = qformer_cross_attention(
                q, c.to(q.dtype), pos.to(q.dtype), att.key.weight, att.key.bias,
                att.value.weight, att.value.bias, self.num_heads, return_lse=True,
            )  # fmt: skip
            out, lse = (o, l_) if out is None else merge(out, lse, o, l_)
            t0 += n
        return out

    def _self(self, att: _Attention, h: torch.Tensor) -> torch.Tensor:
        b, lq, c = h.shape
        nh = self.num_heads

        def heads(x):
            return x.reshape(b, lq, nh, c // nh).transpose(1, 2)

        s = heads(att.query(h)) @ heads(att.key(h)).transpose(-1, -2) / math.sqrt(c // nh)
        ctx = torch.softmax(s, -1) @ heads(att.value(h))
        return ctx.transpose(1, 2).reshape(b, lq, c)

    def forward(
        self, frames: torch.Tensor | Sequence[torch.Tensor], *, position: str | None = None
    ) -> torch.Tensor:
        """Q-Former output (B, num_queries, hidden) over all frames.

        Args:
            frames: (B, T, S, E) frame tokens (video: S = 32 image-Q-Former tokens of 768;
                audio: (B, T, 1024) clip embeddings, S = 1), or a sequence of such chunks
                along T (ragged sizes allowed; the sequence is walked once per layer).
                Without position rows: the module adds them.
            position: overrides the module's ``position`` rule for T > table rows.
        """
        chunks, total = self._chunks(frames)
        if position is not None:
            self._check_position(position)
        self.position_rows(0, 0, total, position)  # fail before any work if T is too long
        b = chunks[0].shape[0]
        h = self.layernorm(self.query_tokens.expand(b, -1, -1))
        for layer in self.layers:
            att, x = layer.attention, layer.crossattention
            a = att.LayerNorm(h + att.dense(self._self(att, h)))
            c = x.LayerNorm(a + x.dense(self._cross(x, a, chunks, total, position)))
            ffn = layer.output_query(F.gelu(layer.intermediate_query(c)))
            h = layer.output_query_LayerNorm(c + ffn)
        return h

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The branch's ``llama_proj``: (B, num_queries, hidden) -> (B, num_queries, llm)."""
        if self.llama_proj is None:
            raise ValueError("this module was built without llm_hidden_size (no llama_proj)")
        return self.llama_proj(hidden)

    # ----------------------------------------------------------------------- loading
    @classmethod
    def released_key_map(cls, num_layers: int = 2, with_proj: bool = True) -> dict[str, str]:
        """{our parameter name: released checkpoint key}."""
        m = {"query_tokens": cls.QUERY_KEY, "frame_position.weight": cls.POSITION_KEY}
        for wb in ("weight", "bias"):
            m[f"layernorm.{wb}"] = f"{cls.RELEASED_PREFIX}embeddings.LayerNorm.{wb}"
            for i in range(num_layers):
                for ours, theirs in _LAYER_KEYS:
                    m[f"layers.{i}.{ours}.{wb}"] = (
                        f"{cls.RELEASED_PREFIX}encoder.layer.{i}.{theirs}.{wb}"
                    )
            if with_proj:
                m[f"llama_proj.{wb}"] = f"{cls.PROJ_PREFIX}.{wb}"
        return m

    @classmethod
    def from_released_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **kwargs):
        """Build from Video-LLaMA's checkpoint layout (``torch.load(path)["model"]``; keys
        of other modules are ignored). A missing key or wrong shape raises a ValueError
        naming the key. Layer count, widths and query count come from the class defaults
        (the released sizes) or ``kwargs``; ``llama_proj`` is loaded when present."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        proj_key = f"{cls.PROJ_PREFIX}.weight"
        if "llm_hidden_size" not in kwargs and proj_key in state_dict:
            kwargs["llm_hidden_size"] = int(state_dict[proj_key].shape[0])
        model = cls(**kwargs)
        with_proj = model.llama_proj is not None
        ours = dict(model.named_parameters())
        loaded = {}
        for name, key in cls.released_key_map(len(model.layers), with_proj).items():
            if key not in state_dict:
                raise ValueError(f"released state dict lacks key {key!r} (for {name})")
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ours[name].shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"released key {key!r} has shape {got}, expected "
                                 f"{tuple(ours[name].shape)}")  # fmt: skip
            loaded[name] = t
        model.load_state_dict(loaded, strict=True)
        return model

    @classmethod
    def from_released_checkpoint(cls, path: str, **kwargs):
        """``torch.load(path)["model"]`` (weights only) -> :meth:`from_released_state_dict`."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        sd = ckpt["model"] if isinstance(ckpt, Mapping) and "model" in ckpt else ckpt
        return cls.from_released_state_dict(sd, **kwargs)


class VideoQFormer(QFormerBranch):
    """Video-LLaMA's Video Q-Former: 32 queries over (B, T, 32, 768) image-Q-Former tokens
    with a 32-row frame-position table (only rows 0-7 trained; see the module doc for
    ``position``). Loads ``video_Qformer.bert.*``, ``video_query_tokens``,
    ``video_frame_position_embedding.weight`` and ``llama_proj.*``."""

    RELEASED_PREFIX = "video_Qformer.bert."
    QUERY_KEY = "video_query_tokens"
    POSITION_KEY = "video_frame_position_embedding.weight"
    PROJ_PREFIX = "llama_proj"

    def __init__(self, *, num_queries: int = 32, encoder_width: int = 768,
                 max_positions: int = 32, **kwargs) -> None:  # fmt: skip
        super().__init__(num_queries=num_queries, encoder_width=encoder_width,
                         max_positions=max_positions, **kwargs)  # fmt: skip


class AudioQFormer(QFormerBranch):
    """Video-LLaMA's Audio Q-Former: 8 queries over (B, T, 1024) ImageBind clip embeddings
    with an 8-row position table (all 8 trained; see the module doc for ``position``).
    Loads ``audio_Qformer.bert.*``, ``audio_query_tokens``,
    ``audio_position_embedding.weight`` and ``audio_llama_proj.*``."""

    RELEASED_PREFIX = "audio_Qformer.bert."
    QUERY_KEY = "audio_query_tokens"
    POSITION_KEY = "audio_position_embedding.weight"
    PROJ_PREFIX = "audio_llama_proj"

    def __init__(self, *, num_queries: int = 8, encoder_width: int = 1024,
                 max_positions: int = 8, **kwargs) -> None:  # fmt: skip
        super().__init__(num_queries=num_queries, encoder_width=encoder_width,
                         max_positions=max_positions, **kwargs)  # fmt: skip


def released_to_blip2_qformer(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """Rename a branch's released keys (``prefix`` e.g. ``"video_Qformer.bert."``) to
    transformers' ``Blip2QFormerModel`` names (method facts section 4): strip the prefix,
    ``embeddings.LayerNorm`` -> ``layernorm``, ``.attention.self.`` -> ``.attention.attention.``,
    ``.crossattention.self.`` -> ``.crossattention.attention.``, drop ``position_ids``."""
    out = {}
    for key, t in state_dict.items():
        if not key.startswith(prefix) or key.endswith("position_ids"):
            continue
        k = key[len(prefix):].replace("embeddings.LayerNorm", "layernorm")
        k = k.replace(".attention.self.", ".attention.attention.")
        out[k.replace(".crossattention.self.", ".crossattention.attention.")] = t
    return out
