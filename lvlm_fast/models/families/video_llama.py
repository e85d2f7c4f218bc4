"""Video-LLaMA (v1): :class:`lvlm_fast.models.video_llama_model.VideoLlamaModel`.

Unlike every other family, the LLM does not see per-frame tokens: each frame becomes 32
image-Q-Former tokens (768-d), and the **Video Q-Former** turns all frames' tokens into 32
queries, projected by ``llama_proj`` to **32 LLM tokens per video, whatever T is**
(``shared/methods/videollama.md``).

- Vision (:meth:`encode`): per frame EVA ViT-g (``Blip2VisionModel``, its post-norm is
  ``ln_vision``) then the image Q-Former (``Blip2QFormerModel`` over 32 query tokens):
  ``(f, 1, 32, 768)`` per chunk (a ``1 x 32`` grid of image-Q-Former tokens, NOT LLM
  space). :meth:`pool` is the identity.
- Video tokens: the per-frame tokens of the selected frames go through
  :class:`lvlm_fast.nn.VideoQFormer` (the streaming fused cross-attention op, two passes:
  no ``(T*32, 768)`` K/V and no score matrix), then ``llama_proj``: ``(1, 32, hidden)``.
- Audio (optional): ``VideoPrompt.audio_embeds`` = ``(1, n_clips, 1024)`` ImageBind clip
  embeddings given by the caller -> Audio Q-Former -> 8 tokens placed before the video's
  32 (the demo's order: audio, then video).
- Positions: 1-D RoPE (LLaMA); no end token, no separator.
- Preprocessing: frames resized to 224 x 224 (aspect not kept), CLIP mean/std; user turn
  ``<Video><ImageHere></Video> {question}`` in the Vicuna ``###Human: ... ###Assistant:``
  template.

Strategies (the family runs them: :meth:`run_strategy`):

- ``full`` = the released behaviour: the released code's **8 frames** at indices
  ``int(i * T / 8)`` (``np.arange(0, T, T / 8)``) of the prompt's T frames (T = 8: every
  frame), all through the Video Q-Former. Equals the plain transformers composition
  (``Blip2VisionModel`` + ``Blip2QFormerModel`` twice + ``llama_proj`` + ``LlamaModel``)
  token for token (tested).
- ``uniform`` (``num_frames``, any count) = the stream mode: ``num_frames`` uniform frames
  (every frame when T <= num_frames) encoded chunk by chunk and streamed through the fused
  op. Beyond the 32-row frame-position table the Video Q-Former's ``position`` knob
  (``"error"`` default, ``"clamp"``, ``"interpolate"``; config ``video_qformer``) decides;
  only rows 0-7 were trained. The per-frame image-Q-Former tokens (T x 32 x 768) are held
  for the two passes.
- ``video-llama-seed`` (:mod:`lvlm_fast.models.strategies.video_llama_seed`) = the released
  code's memory behaviour at any frame count: every frame encoded in one call, the Video
  Q-Former as transformers' eager ``Blip2QFormerModel`` (K/V and scores materialised); same
  tokens as ``uniform`` with ``num_frames = T`` (tested). The profiler's baseline.
- ``vilamp`` = ViLAMP's differential keyframe selection choosing WHICH frames the Video
  Q-Former reads: :func:`lvlm_fast.ops.keyframe_select` over one embedding per frame (the
  ``selector``'s image features when one is given, else the mean of the frame's 32
  image-Q-Former tokens, computed chunk by chunk), the same query-free / query-aware rules
  and knobs as on the other families (``num_keyframes`` K = 32 by default, exactly the
  frame-position table's rows; ``tau_f``, ``floor``, ``diversity_query``, ``selector``,
  ``question``, ``query_embedding``). The K keyframes, in time order, then go through the
  Video Q-Former as ``uniform``'s frames do. Differential feature merging does not apply
  (there are no per-frame LLM tokens to merge): ``dfm``, ``dfm_tau``, ``keyframe_tokens``
  and ``newline`` are ignored; ``kv_budget`` is refused (32 LLM tokens per video).
  Frames are encoded twice (all of them for the selection, the K keyframes again for the
  Q-Former), so no per-frame token is held beyond one chunk during selection.
- Every other strategy raises ``NotImplementedError``: they reduce, merge or score the
  per-frame LLM tokens the decoder reads (pooling, DFM, summaries, KV eviction), and this
  family's decoder never reads per-frame tokens, only the Video Q-Former's 32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lvlm_fast.models.families.base import CLIP_MEAN, CLIP_STD, ModelFamily, register_family

if TYPE_CHECKING:
    from lvlm_fast.models.strategies.base import PrefillResult, Strategy, VideoPrompt
    from lvlm_fast.models.wrapper import LongVideoVLM

SUPPORTED_STRATEGIES = ("full", "uniform", "video-llama-seed", "vilamp")


def released_frame_indices(total: int, count: int = 8) -> list[int]:
    """The released loader's frames: ``np.arange(0, total, total / count).astype(int)``
    (repeats frames when ``total < count``)."""
    step = total / count
    return [int(i * step) for i in range(count)]


@register_family
class VideoLlamaFamily(ModelFamily):
    name = "video_llama"
    model_types = ("video_llama",)
    class_names = ("VideoLlamaModel",)
    frames_per_unit = 1

    @classmethod
    def model_class(cls) -> type:
        from lvlm_fast.models.video_llama_model import VideoLlamaModel

        return VideoLlamaModel

    # ------------------------------------------------------------------ vision
    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens

    def check_pixels(self, pixel_values: Any) -> None:
        s = self.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or pixel_values.shape[1] != 3 or pixel_values.shape[2] != s \
                or pixel_values.shape[3] != s:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) \
                else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (T, 3, {s}, {s}) (frames resized to the "
                             f"EVA ViT's image_size), got {got}")
        if pixel_values.shape[0] < 1:
            raise ValueError("pixel_values holds no frames (T = 0)")

    def feature_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return 1, self.num_query_tokens

    def token_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return 1, self.num_query_tokens

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, 3, S, S) -> (f, 1, 32, 768) image-Q-Former tokens (fp32 Q-Former math in the
        model's dtype; not LLM space: the Video Q-Former and ``llama_proj`` come after)."""
        p = self.model.lm_head.weight
        x = self.model.image_tokens(frames.to(device=p.device, dtype=p.dtype, non_blocking=True))
        return x.unsqueeze(1)

    def encode_all_at_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The released call: every frame through the EVA ViT and the image Q-Former at once."""
        return self.encode(pixel_values)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def vision_bytes_per_frame(self) -> int:
        vc, qc = self.config.vision_config, self.config.qformer_config
        item = self.model.lm_head.weight.dtype.itemsize
        n = (vc.image_size // vc.patch_size) ** 2 + 1
        acts = n * (6 * vc.hidden_size + vc.intermediate_size) * item
        flash = self.model.lm_head.weight.device.type == "cuda"
        scores = 0 if flash else vc.num_attention_heads * n * n * 4
        q = self.num_query_tokens
        qformer = q * (6 * qc.hidden_size + qc.intermediate_size) * item \
            + qc.num_attention_heads * q * n * 4 + n * 2 * qc.hidden_size * item
        return int(acts + scores + qformer + 3 * vc.image_size ** 2 * item)

    # ------------------------------------------------------------------ layout
    def end_tokens(self) -> torch.Tensor:
        p = self.model.lm_head.weight
        return p.new_zeros((0, self.hidden_size))

    def num_end_tokens(self) -> int:
        return 0

    # ------------------------------------------------------------------ video tokens
    def video_tokens(self, vlm: LongVideoVLM, pixel_values: torch.Tensor,
                     frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 32, hidden) video tokens of the (selected) frames: image-Q-Former tokens
        chunk by chunk (``vlm.vision_chunk_frames``), then the Video Q-Former's streaming
        passes over the chunks and ``llama_proj``."""
        chunks = [feats.squeeze(1).unsqueeze(0)  # (1, t, 32, 768)
                  for _start, feats in vlm.iter_patch_features(pixel_values, frame_index)]
        with vlm._stage("video_qformer"):
            return self.model.video_tokens(chunks)

    def audio_tokens(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(1, n_clips, 1024) clip embeddings -> (1, 8, hidden) audio tokens."""
        if not isinstance(audio_embeds, torch.Tensor) or audio_embeds.dim() != 3 \
                or audio_embeds.shape[0] != 1:
            got = tuple(audio_embeds.shape) if isinstance(audio_embeds, torch.Tensor) \
                else type(audio_embeds).__name__
            raise ValueError(f"audio_embeds must be (1, n_clips, 1024) ImageBind clip "
                             f"embeddings, got {got}")
        p = self.model.lm_head.weight
        return self.model.audio_tokens(audio_embeds.to(device=p.device, dtype=p.dtype))

    def frame_embeddings(self, vlm: LongVideoVLM, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 768) float32: the mean image-Q-Former token of every frame, chunk by chunk
        (``vilamp``'s selection embedding without a selector)."""
        emb = None
        for start, feats in vlm.iter_patch_features(pixel_values):
            m = feats.float().mean(dim=(1, 2))  # (f, 1, 32, 768) -> (f, 768)
            if emb is None:
                emb = torch.empty((pixel_values.shape[0], m.shape[1]), dtype=torch.float32,
                                  device=m.device)
            emb[start:start + m.shape[0]] = m
        return emb

    def keyframe_indices(self, cfg: Any, vlm: LongVideoVLM, pixel_values: torch.Tensor
                         ) -> torch.Tensor:
        """``vilamp``'s K keyframe indices (time order, on device; module doc)."""
        from lvlm_fast.models.strategies.vilamp import (
            select_keyframes,
            selector_embeddings,
            selector_query,
        )

        if cfg.kv_budget is not None:
            raise ValueError(f"kv_budget does not apply to the {self.name} family: its LLM "
                             "reads 32 Video Q-Former tokens per video, not per-frame tokens")
        emb = (selector_embeddings(cfg, vlm, pixel_values) if cfg.selector is not None
               else self.frame_embeddings(vlm, pixel_values))
        idx, _ref = select_keyframes(cfg, emb, selector_query(cfg, emb.device))
        return idx.to(torch.int64)

    def run_strategy(self, strategy: Strategy, vlm: LongVideoVLM, prompt: VideoPrompt
                     ) -> PrefillResult:
        """``full`` (released 8 frames), ``uniform`` (any frame count, streaming),
        ``vilamp`` (keyframe selection picks the frames) and ``video-llama-seed``
        (released-style, any frame count); NotImplementedError for the rest (module doc)."""
        from lvlm_fast.models.strategies.uniform import uniform_index

        px = prompt.pixel_values
        t = px.shape[0]
        selection_frames = 0
        if strategy.name == "video-llama-seed":
            return strategy.run_video_llama(vlm, prompt)
        if strategy.name == "full":
            n = self.config.num_frames
            idx = torch.tensor(released_frame_indices(t, n), dtype=torch.int64,
                               device=px.device)
        elif strategy.name == "uniform":
            n = strategy.config.num_frames
            idx = None if t <= n else uniform_index(t, n, px.device)
        elif strategy.name == "vilamp":
            idx = self.keyframe_indices(strategy.config, vlm, px)
            # without a selector every frame went through the vision tower once already
            selection_frames = t if strategy.config.selector is None else 0
        else:
            raise NotImplementedError(
                f"strategy {strategy.name!r} does not apply to the {self.name} family: it "
                "reduces or scores the per-frame tokens the LLM reads, and Video-LLaMA's LLM "
                "reads only the Video Q-Former's 32 tokens per video (whatever the frame "
                f"count). Supported here: {', '.join(SUPPORTED_STRATEGIES)} (uniform with any "
                "num_frames streams through the fused Video Q-Former)")
        frames = (t if idx is None else idx.shape[0]) + selection_frames
        visual = self.video_tokens(vlm, px, idx)
        audio = getattr(prompt, "audio_embeds", None)
        if audio is not None:
            visual = torch.cat([self.audio_tokens(audio), visual], dim=1)
        return vlm.prefill_embeds(prompt.prefix_ids, visual.to(vlm.dtype), prompt.question_ids,
                                  frames_encoded=frames)

    # ------------------------------------------------------------------ preprocessing
    def frame_size(self, height: int, width: int, preprocessing: dict[str, Any]
                   ) -> tuple[int, int]:
        return self.image_size, self.image_size

    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return CLIP_MEAN, CLIP_STD

    def video_text(self) -> str:
        return "<Video>{video}</Video> "

    def fallback_template(self, user_text: str) -> str:
        """Video-LLaMA's Vicuna conversation (``conv_llava_llama_2`` style ``###`` turns)."""
        return f"###Human: {user_text}###Assistant: "
