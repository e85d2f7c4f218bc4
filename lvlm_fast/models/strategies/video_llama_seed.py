"""``video-llama-seed``: Video-LLaMA the way the released code runs it, at any frame count
(the profiler's released-style baseline, issue 13.3; ``video_llama`` family only).

Same tokens as the family's ``uniform`` with ``num_frames = T`` (the fused stream; tested
to fp32 tolerance), with the released code's memory behaviour
(``shared/methods/videollama.md``):

* every frame through EVA ViT-g and the image Q-Former in ONE call
  (``family.encode_all_at_once``; no vision chunks);
* the frame-position rows added, and the ``(1, T*32, 768)`` tokens through transformers'
  ``Blip2QFormerModel`` configured as the released Video Q-Former (cross-attention every
  layer, eager attention: per layer the ``(T*32, 768)`` K and V and the
  ``(heads, 32, T*32)`` score matrix are materialised), holding the model's own Video
  Q-Former weights (:func:`hf_video_qformer`, no copies);
* ``llama_proj`` and the LLM prefill, as the family does (audio tokens first if given).

Beyond the 32-row frame-position table it follows the Video Q-Former's ``position`` knob
(config ``video_qformer``; ``"error"`` by default, as the released model fails there).
Any other family: NotImplementedError. ``frames_encoded = T``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.strategies.base import PrefillResult, Strategy, StrategyConfig, register

if TYPE_CHECKING:
    from lvlm_fast.models.strategies.base import VideoPrompt
    from lvlm_fast.models.wrapper import LongVideoVLM

# VideoQFormer -> its transformers twin (shares the parameters; built once per module)
_HF_QFORMERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hf_video_qformer(vq):
    """transformers' ``Blip2QFormerModel`` as the released Video Q-Former (method facts,
    section 4: cross-attention every layer, eager attention), holding ``vq``'s own
    parameters under the renamed released keys (``assign``: no copies; works on meta)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from lvlm_fast.nn.qformer import released_to_blip2_qformer

    layer = vq.layers[0]
    cfg = Blip2QFormerConfig(hidden_size=vq.query_tokens.shape[-1],
                             num_hidden_layers=len(vq.layers),
                             num_attention_heads=vq.num_heads,
                             intermediate_size=layer.intermediate_query.out_features,
                             hidden_act="gelu", layer_norm_eps=layer.output_query_LayerNorm.eps,
                             cross_attention_frequency=1, encoder_hidden_size=vq.encoder_width,
                             use_qformer_text_input=False)
    cfg._attn_implementation = "eager"
    ours = dict(vq.named_parameters())
    released = {theirs: ours[name] for name, theirs in
                vq.released_key_map(len(vq.layers), with_proj=False).items()}
    with torch.device("meta"):
        hf = Blip2QFormerModel(cfg)
    hf.load_state_dict(released_to_blip2_qformer(released, vq.RELEASED_PREFIX), strict=True,
                       assign=True)
    return hf.eval()


def cached_hf_video_qformer(vq):
    hf = _HF_QFORMERS.get(vq)
    if hf is None:
        hf = _HF_QFORMERS[vq] = hf_video_qformer(vq)
    return hf


def released_video_tokens(vlm: LongVideoVLM, pixel_values: torch.Tensor) -> torch.Tensor:
    """(1, 32, hidden) video tokens the released way: all T frames encoded at once, the
    Video Q-Former as transformers' eager ``Blip2QFormerModel`` (K/V and scores
    materialised), ``llama_proj``."""
    vq = vlm.model.model.video_qformer
    hf = cached_hf_video_qformer(vq)
    t = pixel_values.shape[0]
    tok = vlm.family.encode_all_at_once(pixel_values).squeeze(1)  # (T, 32, 768)
    tok = tok + vq.position_rows(0, t, t).to(tok.dtype).unsqueeze(1)
    e = tok.reshape(1, -1, tok.shape[-1])
    del tok
    out = hf(query_embeds=vq.query_tokens, encoder_hidden_states=e).last_hidden_state
    del e
    return vq.project(out)


@register
class VideoLlamaSeed(Strategy):
    """Released-style Video-LLaMA over all T frames (``video_llama`` family only)."""

    name = "video-llama-seed"
    config_class = StrategyConfig
    holds_all_patch_features = True

    @torch.no_grad()
    def run_video_llama(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        """Called by the ``video_llama`` family's ``run_strategy``."""
        visual = released_video_tokens(vlm, prompt.pixel_values)
        audio = getattr(prompt, "audio_embeds", None)
        if audio is not None:
            visual = torch.cat([vlm.family.audio_tokens(audio), visual], dim=1)
        return vlm.prefill_embeds(prompt.prefix_ids, visual.to(vlm.dtype), prompt.question_ids,
                                  frames_encoded=prompt.pixel_values.shape[0])

    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        raise NotImplementedError(
            f"strategy {self.name!r} is the released Video-LLaMA pipeline: it applies only to "
            f"the video_llama family, not {vlm.family.name}")
