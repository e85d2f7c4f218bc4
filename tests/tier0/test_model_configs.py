"""Shipped model configs build (on meta for 7B) with their published sizes."""

import pytest
import torch

from lvlm_fast.models.configs import MODEL_CONFIGS, get_config


@pytest.mark.parametrize("name,billions", [("llava-onevision-qwen2-7b", 8.03),
                                           ("videoxl-qwen2-7b", 7.94)])
def test_7b_configs_param_count(name: str, billions: float) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(get_config(name))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(billions, abs=0.01)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (3584, 28, 4)


def test_every_config_builds_for_real_or_meta() -> None:
    from lvlm_fast.models.families import family_for_config

    for name in MODEL_CONFIGS:
        device = "cpu" if name.startswith("tiny") else "meta"
        config = get_config(name)
        with torch.device(device):
            family_for_config(config).build(config)


def test_qwen2_5_vl_7b_config_is_the_published_one() -> None:
    """Qwen2.5-VL-7B-Instruct: 8.29 B parameters, of which the ViT 0.68 B."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(get_config("qwen2.5-vl-7b"))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(8.29, abs=0.01)
    assert sum(p.numel() for p in model.model.visual.parameters()) / 1e9 == \
        pytest.approx(0.677, abs=0.001)
    text, vis = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size) == (3584, 28, 28, 4, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vis.depth, vis.hidden_size, vis.window_size, vis.fullatt_block_indexes,
            vis.tokens_per_second) == (32, 1280, 112, [7, 15, 23, 31], 2)


def test_unknown_config_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="llava-onevision-qwen2-7b"):
        get_config("llava-13b")
