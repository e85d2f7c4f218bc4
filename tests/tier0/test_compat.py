"""transformers compatibility (issue 9, point 16): the KV-cache keyword is picked from the
callee's signature, and a wrapper run (full and videoxl) logs no deprecation warning."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from transformers import LlavaOnevisionForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models._compat import cache_kwarg, cache_kwargs
from lvlm_fast.models.strategies.base import VideoPrompt

pytestmark = pytest.mark.usefixtures("one_thread")


class _Old(torch.nn.Module):
    def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None, **kwargs):
        return past_key_values


class _New(torch.nn.Module):
    def forward(self, inputs_embeds=None, cache=None, use_cache=None, **kwargs):
        return cache


class _KwargsOnly(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return kwargs


def test_cache_kwarg_picks_by_signature():
    assert cache_kwarg(_Old()) == "past_key_values"
    assert cache_kwarg(_New()) == "cache"
    # Remote-code models that take **kwargs only: the long-standing name.
    assert cache_kwarg(_KwargsOnly()) == "past_key_values"
    sentinel = object()
    assert _New()(**cache_kwargs(_New(), sentinel)) is sentinel
    assert _Old()(**cache_kwargs(_Old(), sentinel)) is sentinel


def test_cache_kwarg_sees_through_transformers_deprecate_kwarg():
    deprecation = pytest.importorskip("transformers.utils.deprecation")

    class Decorated(torch.nn.Module):
        @deprecation.deprecate_kwarg("past_key_values", "99.0.0", new_name="cache")
        def forward(self, inputs_embeds=None, cache=None, **kwargs):
            return cache

    assert cache_kwarg(Decorated()) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name must not trip the decorator
        assert Decorated()(**cache_kwargs(Decorated(), 7)) == 7


def test_cache_kwarg_matches_installed_transformers():
    model = LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision"))
    lm = model.model.language_model
    import inspect

    params = inspect.signature(type(lm).forward).parameters
    name = cache_kwarg(lm)
    assert name in params, (transformers.__version__, name, list(params))
    if "cache" in params:  # releases with the new name: never the deprecated one
        assert name == "cache"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("strategy,knobs", [("full", {}), ("videoxl", {"ratio": 4, "window": 8})])
def test_wrapper_run_emits_no_cache_deprecation(strategy, knobs):
    cfg = get_config("tiny-videoxl")
    tc = cfg.text_config  # a head dim the fused summary attention supports
    tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads = 128, 2, 1
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    pr = VideoPrompt(torch.randn(6, 3, 56, 56, generator=g),
                     torch.randint(0, 250, (1, 3), generator=g),
                     torch.randint(0, 250, (1, 4), generator=g))
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vlm = LongVideoVLM(model, strategy, vision_chunk_frames=2, **knobs)
            vlm.generate(pr, 3)
    finally:
        hf_logger.removeHandler(handler)
    msgs = [str(w.message) for w in caught] + handler.messages
    bad = [m for m in msgs if "past_key_values" in m or "deprecat" in m.lower()]
    assert not bad, bad
