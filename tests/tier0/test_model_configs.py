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
    from transformers import LlavaOnevisionForConditionalGeneration

    for name in MODEL_CONFIGS:
        device = "cpu" if name.startswith("tiny") else "meta"
        with torch.device(device):
            LlavaOnevisionForConditionalGeneration(get_config(name))


def test_unknown_config_names_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match="llava-onevision-qwen2-7b"):
        get_config("llava-13b")
