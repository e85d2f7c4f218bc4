"""`videoxl` strategy: streamed windows == the Video-XL driver on the materialised stream,
no summaries + no eviction == `full`, cache after the video == sink + summaries rows,
frames streamed (windows run before the last frame is encoded), meta."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import small_video_prompt, tiny_onevision  # tests/tier0 on sys.path

from lvlm_fast.models import LongVideoVLM, get_strategy
from lvlm_fast.models.strategies import videoxl as vx
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.models.strategies.full import pooled_video_embeds
from lvlm_fast.models.videoxl_driver import run_videoxl

T = 9
MAX_NEW = 5


def _model(head_dim64: bool):
    return tiny_onevision("tiny-videoxl", head_dim64)


@pytest.fixture(scope="module")
def fused_model():
    return _model(True)


@pytest.fixture(scope="module")
def toy_model():
    return _model(False)


def _prompt(t: int = T, seed: int = 0) -> VideoPrompt:
    return small_video_prompt(t, seed)


@pytest.mark.parametrize("which", ["fused_model", "toy_model"])
def test_no_summaries_no_eviction_equals_full(which, request):
    model = request.getfixturevalue(which)
    pr = _prompt()
    full = LongVideoVLM(model, "full")
    ref_logits, ref_tokens = full.first_token(pr), full.generate(pr, MAX_NEW)
    vlm = LongVideoVLM(model, "videoxl", ratio=1000, window=7, evict=False,
                       vision_chunk_frames=2)
    torch.testing.assert_close(vlm.first_token(pr), ref_logits, rtol=1e-5, atol=1e-5)
    assert vlm.last_prefill.visual_tokens == T * 4 + 1
    assert torch.equal(vlm.generate(pr, MAX_NEW), ref_tokens)


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize(("ratio", "window", "vchunk"), [(3, 10, 2), (4, 8, 3)])
def test_streamed_equals_driver_on_materialised_stream(fused_model, evict, ratio, window,
                                                       vchunk):
    pr = _prompt()
    vlm = LongVideoVLM(fused_model, "videoxl", ratio=ratio, window=window, evict=evict,
                       vision_chunk_frames=vchunk)
    logits = vlm.first_token(pr)
    tokens = vlm.generate(pr, MAX_NEW)
    visual, _ = pooled_video_embeds(vlm, pr.pixel_values)
    view = vx.DecoderView(vlm)
    ref = run_videoxl(view, pr.prefix_ids, visual, pr.question_ids, ratio=ratio, window=window,
                      max_new_tokens=MAX_NEW, evict=evict,
                      summary_embed=vx._summary_vector(vlm, view, None))
    torch.testing.assert_close(logits[0], ref.logits[0], rtol=1e-5, atol=1e-5)
    assert tokens[0].tolist() == ref.tokens.tolist()
    n = T * 4 + 1
    res = vlm.last_prefill
    assert res.cache.num_summaries == n // ratio
    assert res.visual_tokens == n + n // ratio
    assert res.llm_tokens == 3 + n + n // ratio + 5
    assert res.frames_encoded == T


def test_cache_after_video_is_sink_plus_summaries(fused_model):
    pr = _prompt()
    vlm = LongVideoVLM(fused_model, "videoxl", ratio=4, window=8, vision_chunk_frames=2)
    vlm.first_token(pr)
    n = T * 4 + 1
    s = n // 4
    res = vlm.last_prefill
    assert vlm.strategy.rows_after_video == 3 + s
    tc = fused_model.config.text_config
    row_bytes = tc.num_hidden_layers * 2 * tc.num_key_value_heads * 64 * 4
    assert res.cache.get_seq_length() == 3 + s + 5  # + the question, kept raw
    assert res.cache.bytes() == (3 + s + 5) * row_bytes
    # capacity from the frame count: sink + summaries + one window (> question)
    assert res.cache.capacity == 3 + s + 8 < 3 + n


def test_frames_are_streamed_window_by_window(fused_model, monkeypatch):
    events = []
    vlm = LongVideoVLM(fused_model, "videoxl", ratio=4, window=8, vision_chunk_frames=2)
    real_iter, real_run = vlm.iter_patch_features, vx.videoxl_driver.run_window

    def iter_spy(*a, **k):
        for item in real_iter(*a, **k):
            events.append("chunk")
            yield item

    def run_spy(*a, **k):
        events.append("window")
        return real_run(*a, **k)

    monkeypatch.setattr(vlm, "iter_patch_features", iter_spy)
    monkeypatch.setattr(vx.videoxl_driver, "run_window", run_spy)
    vlm.first_token(_prompt())
    assert events.count("chunk") == 5 and events.count("window") == 5  # ceil(37 / 8)
    assert events.index("window") < len(events) - 1 - events[::-1].index("chunk")


def test_config_defaults_and_bad_knobs():
    cfg = get_strategy("videoxl").config
    assert (cfg.ratio, cfg.window, cfg.evict) == (16, 1440, True)
    with pytest.raises(ValueError, match="ratio"):
        get_strategy("videoxl", ratio=0)
    with pytest.raises(ValueError, match="window"):
        get_strategy("videoxl", window=0)


def test_summary_embed_knob(fused_model):
    pr = _prompt()
    a = LongVideoVLM(fused_model, "videoxl", ratio=4, window=8).first_token(pr)
    b = LongVideoVLM(fused_model, "videoxl", ratio=4, window=8,
                     summary_embed=torch.ones(128)).first_token(pr)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="summary_embed"):
        LongVideoVLM(fused_model, "videoxl", summary_embed=torch.ones(3)).first_token(pr)


@pytest.mark.parametrize("name,frames,size", [("tiny-videoxl", 30, 56),
                                              ("videoxl-qwen2-7b", 12, 336)])
def test_meta(name, frames, size):
    vlm = LongVideoVLM.from_config(name, "videoxl", device="meta", dtype=torch.bfloat16)
    meta = dict(device="meta")
    pr = VideoPrompt(torch.empty(frames, 3, size, size, dtype=torch.bfloat16, **meta),
                     torch.empty(1, 4, dtype=torch.long, **meta),
                     torch.empty(1, 6, dtype=torch.long, **meta))
    out = vlm.first_token(pr)
    assert out.device.type == "meta" and out.shape == (1, vlm.vocab_size)
    n = frames * vlm.tokens_per_frame + 1
    assert vlm.last_prefill.visual_tokens == n + n // 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


# ------------------------------------------------------------------ short stream (issue 9.12)
def test_short_stream_without_summaries_warns_answer_ignores_video(fused_model):
    """2 frames x 4 tokens + newline = 9 raw tokens < ratio 16: no summary token, every raw
    row evicted, so the answer cannot depend on the video: faithful, but warned about."""
    from lvlm_fast.models.strategies import StrategyWarning

    vlm = LongVideoVLM(fused_model, "videoxl", ratio=16, window=8)
    a, b = _prompt(2, seed=0), _prompt(2, seed=5)
    b = VideoPrompt(b.pixel_values, a.prefix_ids, a.question_ids)  # only the video differs
    with pytest.warns(StrategyWarning, match=r"9 raw visual tokens, fewer than ratio=16.*"
                                             r"does not depend on the video"):
        la = vlm.first_token(a)
    res = vlm.last_prefill
    assert res.cache.num_summaries == 0 and len(res.warnings) == 1
    assert "does not depend on the video" in res.warnings[0]
    with pytest.warns(StrategyWarning):
        lb = vlm.first_token(b)
    torch.testing.assert_close(la, lb)  # the video made no difference


@pytest.mark.parametrize("kw", [{"ratio": 4, "window": 8}, {"ratio": 16, "evict": False}])
def test_no_warning_when_the_video_reaches_the_llm(fused_model, kw):
    import warnings

    from lvlm_fast.models.strategies import StrategyWarning

    vlm = LongVideoVLM(fused_model, "videoxl", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StrategyWarning)
        vlm.first_token(_prompt(2))
    assert vlm.last_prefill.warnings == []
