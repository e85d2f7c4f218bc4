"""Video-LLaMA from its released files (issue 13 part 3): a tiny random model is written out
as the released VL / AL ``.pth`` files (``torch.load(p)["model"]`` layout), a LAVIS-layout
image-encoder ``.pth`` and a LLaMA folder, then rebuilt with
:func:`lvlm_fast.models.video_llama_model.from_released_checkpoint`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from lvlm_fast.models import LongVideoVLM
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.models.video_llama_model import (
    VideoLlamaModel,
    from_released_checkpoint,
    lavis_image_encoder_key_map,
    tiny_video_llama,
)

PREFIX = torch.tensor([[1, 5, 9]])
QUESTION = torch.tensor([[40, 41, 7]])


def released_branch(module, extra_buffer: str) -> dict[str, torch.Tensor]:
    ours = dict(module.named_parameters())
    sd = {theirs: ours[name].detach().clone()
          for name, theirs in module.released_key_map(len(module.layers)).items()}
    sd[extra_buffer] = torch.arange(512).view(1, -1)  # the BERT position_ids buffer
    return sd


def lavis_image_encoder(model: VideoLlamaModel) -> dict[str, torch.Tensor]:
    """The image encoder in LAVIS's layout (the inverse of the loader's renames)."""
    ours = {k: v.detach().clone() for k, v in model.model.named_parameters()}
    sd = {theirs: ours[name] for name, theirs in lavis_image_encoder_key_map(model.config).items()}
    for i in range(model.config.vision_config.num_hidden_layers):
        bias = ours[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"]
        h = bias.shape[0] // 3
        sd[f"visual_encoder.blocks.{i}.attn.q_bias"] = bias[:h]
        sd[f"visual_encoder.blocks.{i}.attn.v_bias"] = bias[2 * h:]
    for name, t in ours.items():
        if name.startswith("qformer."):
            k = name[len("qformer."):].replace("layernorm", "embeddings.LayerNorm")
            k = k.replace(".attention.attention.", ".attention.self.")
            k = k.replace(".crossattention.attention.", ".crossattention.self.")
            sd["Qformer.bert." + k] = t
    return sd


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[VideoLlamaModel, dict[str, Path]]:
    torch.manual_seed(0)
    model = VideoLlamaModel(tiny_video_llama()).eval()
    with torch.no_grad():  # EVA has no k bias: the released qkv bias is (q, 0, v)
        for layer in model.model.vision_model.encoder.layers:
            h = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[h:2 * h] = 0
    d = tmp_path_factory.mktemp("videollama")
    inner = model.model
    paths = {"vl": d / "finetune-vicuna7b-v2.pth", "al": d / "finetune_vicuna7b_audiobranch.pth",
             "img": d / "blip2_image_encoder.pth", "llm": d / "vicuna"}
    torch.save({"model": released_branch(inner.video_qformer,
                                         "video_Qformer.bert.embeddings.position_ids")},
               paths["vl"])
    torch.save({"model": released_branch(inner.audio_qformer,
                                         "audio_Qformer.bert.embeddings.position_ids")},
               paths["al"])
    torch.save({"model": lavis_image_encoder(model)}, paths["img"])
    llm = LlamaForCausalLM(model.config.text_config)
    llm.model.load_state_dict(inner.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.save_pretrained(paths["llm"])
    return model, paths


def load(paths: dict[str, Path], **kw) -> VideoLlamaModel:
    cfg = tiny_video_llama()
    args = dict(image_encoder_ckpt=paths["img"], audio_ckpt=paths["al"],
                vision_config=cfg.vision_config, qformer_config=cfg.qformer_config,
                video_qformer=cfg.video_qformer, audio_qformer=cfg.audio_qformer)
    args.update(kw)
    return from_released_checkpoint(paths["vl"], paths["llm"], **args)


def test_rebuilt_model_equals_the_original(released) -> None:
    model, paths = released
    loaded = load(paths)
    a = dict(model.state_dict())
    b = dict(loaded.state_dict())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    torch.manual_seed(5)
    frames = torch.randn(12, 3, 28, 28)
    p = VideoPrompt(frames, PREFIX, QUESTION, audio_embeds=torch.randn(1, 8, 16))
    want = LongVideoVLM(model).first_token(p)
    got = LongVideoVLM(loaded, vision_chunk_frames=5).first_token(p)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_audio_ckpt_has_no_audio_branch(released) -> None:
    _, paths = released
    loaded = load(paths, audio_ckpt=None)
    assert loaded.model.audio_qformer is None and loaded.config.audio_qformer is None


def test_position_knob_reaches_the_video_qformer(released) -> None:
    _, paths = released
    loaded = load(paths, position="clamp")
    assert loaded.model.video_qformer.position == "clamp"
    vlm = LongVideoVLM(loaded)
    vlm.first_token(VideoPrompt(torch.randn(40, 3, 28, 28), PREFIX, QUESTION), "uniform",
                    num_frames=40)


def _resave(path: Path, dst: Path, edit) -> Path:
    sd = dict(torch.load(path, weights_only=True)["model"])
    edit(sd)
    torch.save({"model": sd}, dst)
    return dst


def test_missing_or_misshaped_keys_are_named(released, tmp_path) -> None:
    _, paths = released
    bad = _resave(paths["vl"], tmp_path / "vl.pth",
                  lambda sd: sd.pop("video_frame_position_embedding.weight"))
    with pytest.raises(ValueError, match=re.escape("video_frame_position_embedding.weight")):
        load({**paths, "vl": bad})
    bad = _resave(paths["img"], tmp_path / "img.pth",
                  lambda sd: sd.pop("visual_encoder.blocks.1.attn.q_bias"))
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.1\.attn\.q_bias"):
        load({**paths, "img": bad})
    bad = _resave(paths["img"], tmp_path / "img2.pth",
                  lambda sd: sd.update({"ln_vision.weight": torch.ones(5)}))
    with pytest.raises(ValueError, match=r"'ln_vision.weight' has shape \(5,\)"):
        load({**paths, "img": bad})
    bad = _resave(paths["img"], tmp_path / "img3.pth",
                  lambda sd: sd.pop("Qformer.bert.encoder.layer.0.crossattention.self.key.weight"))
    name = re.escape("encoder.layer.0.crossattention.attention.key.weight")
    with pytest.raises(ValueError, match=name):
        load({**paths, "img": bad})
    with pytest.raises(FileNotFoundError, match="audio_ckpt"):
        load({**paths}, audio_ckpt=tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="llm_path"):
        from_released_checkpoint(paths["vl"], tmp_path / "no_llm", image_encoder_ckpt=paths["img"])
