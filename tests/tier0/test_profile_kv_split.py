"""The profiler's split of the cache a pass leaves: KV bytes (preallocated K/V buffers of the
full-attention layers, growing with the tokens kept) against recurrent-state bytes (a hybrid
decoder's linear-attention conv + recurrent states: constant in tokens, 0 elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen3_5ForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.profile.command import CSV_FIELDS
from lvlm_fast.profile.memory import Profiler, cache_split

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


def test_row_has_kv_and_state_bytes_on_an_attention_only_model():
    p = Profiler("tiny-llava-onevision", simulate=False, dtype="float32", device="cpu")
    row = p.run("full", 2)
    tc = get_config("tiny-llava-onevision").text_config
    head = tc.hidden_size // tc.num_attention_heads
    # every layer: K and V of (1, kv heads, prompt rows, head dim) fp32, no decode reserve
    want = tc.num_hidden_layers * 2 * tc.num_key_value_heads * row["llm_tokens"] * head * 4
    assert row["kv_bytes"] == want and row["state_bytes"] == 0
    assert {"kv_bytes", "state_bytes"} <= set(CSV_FIELDS)


def test_split_on_the_hybrid_cache():
    """Qwen3.5: KV bytes only for the 2 full-attention layers and growing with frames; the 2
    linear-attention layers' states the same at every frame count."""
    torch.manual_seed(0)
    vlm = LongVideoVLM(Qwen3_5ForConditionalGeneration(get_config("tiny-qwen3.5")).eval(),
                       prefill_chunk_tokens=9)
    text_ids = lambda s: [3 + ord(c) % 190 for c in s]
    splits = []
    for frames in (2, 6):
        g = torch.Generator().manual_seed(frames)
        pr = VideoPrompt(torch.randn(frames, 3, 64, 64, generator=g), torch.tensor([[7, 252]]),
                         torch.tensor([[253, 5]]), text_ids=text_ids)
        res = vlm.prefill(pr)
        kv, st = cache_split(res)
        rows = res.llm_tokens
        assert kv == 2 * 2 * 1 * rows * 64 * 4  # 2 full layers x K,V x 1 kv head x dim 64
        assert st == 2 * (1 * 256 * 4 + 4 * 32 * 32) * 4  # conv (256 ch, kernel 4) + (4,32,32)
        splits.append((kv, st))
    assert splits[1][0] > splits[0][0] and splits[1][1] == splits[0][1]
    assert cache_split(object()) == (None, None)  # a result without a preallocated cache
