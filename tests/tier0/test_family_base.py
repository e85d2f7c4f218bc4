"""The family layer itself: TokenBlocks positions bookkeeping, the registry, and the
preprocessing/prompt side (d) of both shipped families."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.families import (
    FAMILIES,
    TokenBlocks,
    family_for,
    family_for_config,
    family_for_model_type,
    supported_class_names,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "what", "happens",
             "?", "<|vision_start|>", "<|vision_end|>", "<lvlm_fast_video>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    out.add_special_tokens({"additional_special_tokens": words[1:3] + words[8:]})
    out.chat_template = chat_template
    return out


def test_token_blocks_coords_match_a_token_table():
    g = torch.Generator().manual_seed(0)
    n = 9
    b = TokenBlocks(torch.randint(0, 5, (n,), generator=g), torch.randint(1, 4, (n,),
                    generator=g), torch.randint(1, 4, (n,), generator=g))
    table = [(int(b.t[i]), y, x) for i in range(n) for y in range(int(b.h[i]))
             for x in range(int(b.w[i]))]
    total = len(table)
    assert int(b.sizes().sum()) == total
    for lo, hi in [(0, total), (0, 1), (3, 11), (total - 2, total)]:
        u, y, x = b.coords(lo, hi)
        assert list(zip(u.tolist(), y.tolist(), x.tolist(), strict=True)) == table[lo:hi]


def test_token_blocks_grid_per_unit_cat():
    a = TokenBlocks.grid(3, 2, 2, frame_hw=(56, 56), fps=1.0)
    c = TokenBlocks.grid(torch.tensor([5, 6, 7]), 1, 1)
    mix = TokenBlocks.per_unit([a, c])
    assert mix.t.tolist() == [0, 5, 1, 6, 2, 7] and mix.h.tolist() == [2, 1, 2, 1, 2, 1]
    assert mix.frame_hw == (56, 56) and mix.fps == 1.0
    cat = TokenBlocks.cat([a, c])
    assert cat.t.tolist() == [0, 1, 2, 5, 6, 7] and cat.num_blocks == 6


def test_registry_and_errors():
    # every shipped family (later families add to the set)
    assert {"llava_onevision", "qwen2_5_vl", "qwen3_vl"} <= set(FAMILIES)
    assert supported_class_names()[:2] == ("LlavaOnevisionForConditionalGeneration",
                                           "Qwen2_5_VLForConditionalGeneration")
    assert "Qwen3VLForConditionalGeneration" in supported_class_names()
    assert family_for_config(get_config("tiny-qwen2.5-vl")).name == "qwen2_5_vl"
    assert family_for_config(get_config("tiny-videoxl")).name == "llava_onevision"
    with pytest.raises(TypeError, match=r"holds a llama model; supported: Llava.*Qwen2_5_VL"):
        family_for_model_type("llama")
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        family_for(torch.nn.Linear(1, 1))


@pytest.fixture(scope="module")
def families():
    torch.manual_seed(0)
    return {n: LongVideoVLM.from_config(c).family
            for n, c in (("llava", "tiny-llava-onevision"), ("qwen", "tiny-qwen2.5-vl"))}


def test_split_prompt_chat_template(families):
    tok = _tokenizer(CHATML)
    vocab = tok.get_vocab()
    pre, post = families["qwen"].split_prompt(tok, "what happens ?")
    assert pre[-1] == vocab["<|vision_start|>"] and post[0] == vocab["<|vision_end|>"]
    assert tok.decode(pre + post).split() == [
        "<|im_start|>", "user", "<|vision_start|>", "<|vision_end|>", "what", "happens", "?",
        "<|im_end|>", "<|im_start|>", "assistant"]
    pre, post = families["llava"].split_prompt(tok, "what happens ?")
    assert tok.decode(pre).split() == ["<|im_start|>", "user"]
    assert tok.decode(post).split()[:3] == ["what", "happens", "?"]
    # no chat template: the ChatML fallback, same split
    pre2, post2 = families["llava"].split_prompt(_tokenizer(None), "what happens ?")
    assert (pre2, post2) == (pre, post)


def test_preprocessing_and_frame_size(families, tmp_path):
    qwen, llava = families["qwen"], families["llava"]
    assert qwen.preprocessing(tmp_path)["image_mean"] == list(qwen.default_normalization()[0])
    assert llava.preprocessing(tmp_path)["image_std"] == [0.5, 0.5, 0.5]
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "size": {"shortest_edge": 3136,
                                                "longest_edge": 64 * 28 * 28}}))
    pre = qwen.preprocessing(tmp_path)
    assert pre["image_mean"] == [0.1, 0.2, 0.3] and pre["rescale_factor"] == 1 / 255
    h, w = qwen.frame_size(1080, 1920, pre)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 64 * 28 * 28 and w > h
    assert llava.frame_size(1080, 1920, pre) == (56, 56)


def test_llava_encode_all_at_once_equals_chunks(families):
    fam = families["llava"]
    px = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(fam.encode_all_at_once(px), fam.encode(px),
                                   rtol=1e-5, atol=1e-6)
