"""LongVideoVLM core: chunked vision = HF hidden_states path, pooling = HF apply_pooling,
chunked prefill into a preallocated cache, greedy decode, meta tensors, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlavaOnevisionForConditionalGeneration

from lvlm_fast.models import (
    SUPPORTED_MODEL_CLASSES,
    LongVideoVLM,
    PreallocatedKVCache,
    get_config,
)
from lvlm_fast.models.strategies.base import VideoPrompt


def _model(name: str, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(get_config(name)).eval()


@pytest.fixture(scope="module")
def siglip():
    return _model("tiny-llava-onevision")


@pytest.fixture(scope="module")
def clip():
    return _model("tiny-videoxl", seed=1)


def _prompt(t: int, p: int = 3, q: int = 4, seed: int = 0) -> VideoPrompt:
    g = torch.Generator().manual_seed(seed)
    return VideoPrompt(torch.randn(t, 3, 56, 56, generator=g),
                       torch.randint(0, 250, (1, p), generator=g),
                       torch.randint(0, 250, (1, q), generator=g))


def _hf_patch_feats(model, px):
    cfg = model.config
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
        f = hs[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            f = f[:, 1:]
        return model.model.multi_modal_projector(f)


@pytest.mark.parametrize("which", ["siglip", "clip"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_iter_patch_features_matches_hf_hidden_states(which, chunk, request):
    model = request.getfixturevalue(which)
    vlm = LongVideoVLM(model, vision_chunk_frames=chunk)
    px = _prompt(5).pixel_values
    ref = _hf_patch_feats(model, px).view(5, 4, 4, -1)
    starts, got = [], []
    for start, feats in vlm.iter_patch_features(px):
        assert feats.shape[1:] == (4, 4, vlm.hidden_size) and feats.shape[0] <= chunk
        starts.append(start)
        got.append(feats)
    assert starts == list(range(0, 5, chunk))
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-5, atol=1e-6)


def test_iter_patch_features_frame_index(siglip):
    vlm = LongVideoVLM(siglip, vision_chunk_frames=2)
    px = _prompt(6).pixel_values
    idx = torch.tensor([5, 0, 3])
    ref = _hf_patch_feats(siglip, px[idx]).view(3, 4, 4, -1)
    out = list(vlm.iter_patch_features(px, frame_index=idx))
    assert [s for s, _ in out] == [0, 2]
    torch.testing.assert_close(torch.cat([f for _, f in out]), ref, rtol=1e-5, atol=1e-6)


def test_vision_runs_only_needed_layers(clip):
    # tiny-videoxl has 3 layers and feature layer -2: the last layer must never run.
    vlm = LongVideoVLM(clip)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, layer in enumerate(clip.model.vision_tower.encoder.layers)]
    try:
        list(vlm.iter_patch_features(_prompt(2).pixel_values))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


def test_pool_2x2_matches_apply_pooling(siglip):
    vlm = LongVideoVLM(siglip)
    feats = torch.randn(3, 4, 4, vlm.hidden_size)
    ref = siglip.model.apply_pooling(feats.reshape(3, 16, -1))
    got = vlm.pool_2x2(feats)
    assert got.shape == (3, 2, 2, vlm.hidden_size)
    torch.testing.assert_close(got.reshape(3, 4, -1), ref, rtol=0, atol=0)
    odd = torch.randn(2, 5, 3, 8)  # odd grids -> ceil
    assert vlm.pool_2x2(odd).shape == (2, 3, 2, 8)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_prefill_embeds_chunked_matches_single_forward(siglip, chunk):
    vlm = LongVideoVLM(siglip, prefill_chunk_tokens=chunk)
    pr = _prompt(1)
    visual = torch.randn(1, 9, vlm.hidden_size)
    res = vlm.prefill_embeds(pr.prefix_ids, visual, pr.question_ids, frames_encoded=2,
                             reserve=3)
    assert isinstance(res.cache, PreallocatedKVCache)
    assert res.cache.capacity == 3 + 9 + 4 + 3 and res.cache.get_seq_length() == 16
    assert (res.llm_tokens, res.visual_tokens, res.frames_encoded) == (16, 9, 2)
    emb = torch.cat([vlm.embed_tokens(pr.prefix_ids), visual, vlm.embed_tokens(pr.question_ids)],
                    1)
    with torch.no_grad():
        ref = siglip.model.language_model(inputs_embeds=emb).last_hidden_state[:, -1:]
    assert res.last_hidden.shape == (1, 1, vlm.hidden_size)
    torch.testing.assert_close(res.last_hidden, ref, rtol=1e-5, atol=1e-5)


def test_prefill_with_empty_visual(siglip):
    vlm = LongVideoVLM(siglip, prefill_chunk_tokens=2)
    pr = _prompt(1)
    res = vlm.prefill_embeds(pr.prefix_ids, torch.empty(1, 0, vlm.hidden_size), pr.question_ids,
                             frames_encoded=0)
    assert res.llm_tokens == 7 and res.visual_tokens == 0


def test_generate_matches_stepwise_and_masks_eos(siglip):
    vlm = LongVideoVLM(siglip, vision_chunk_frames=2, prefill_chunk_tokens=5)
    pr = _prompt(3)
    toks = vlm.generate(pr, max_new_tokens=6)
    assert toks.shape == (1, 6) and toks.dtype == torch.long
    # cache sized exactly: prompt + 5 decode steps
    assert vlm.last_prefill.cache.capacity == vlm.last_prefill.llm_tokens + 5
    assert vlm.last_prefill.cache.get_seq_length() == vlm.last_prefill.llm_tokens + 5
    first = vlm.first_token(pr)
    assert first.shape == (1, 256) and first.dtype == torch.float32
    assert int(first.argmax()) == int(toks[0, 0])
    eos = int(toks[0, 2])
    masked = vlm.generate(pr, max_new_tokens=6, eos_token_id=eos)
    k = int((toks[0] == eos).nonzero()[0])
    assert masked[0, : k + 1].tolist() == toks[0, : k + 1].tolist()
    assert masked[0, k + 1 :].tolist() == [eos] * (5 - k)


def test_timings_recorded(siglip):
    vlm = LongVideoVLM(siglip)
    vlm.generate(_prompt(2), max_new_tokens=2)
    assert {"vision", "prefill", "decode"} <= set(vlm.timings)


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-videoxl"])
def test_meta_first_token_and_generate(name):
    vlm = LongVideoVLM.from_config(name, device="meta")
    assert vlm.device.type == "meta"
    meta = dict(device="meta")
    pr = VideoPrompt(torch.empty(7, 3, 56, 56, **meta), torch.empty(1, 3, dtype=torch.long, **meta),
                     torch.empty(1, 4, dtype=torch.long, **meta))
    out = vlm.first_token(pr)
    assert out.device.type == "meta" and out.shape == (1, 256) and out.dtype == torch.float32
    assert vlm.last_prefill.llm_tokens == 3 + 7 * 4 + 1 + 4
    toks = vlm.generate(pr, max_new_tokens=3, eos_token_id=1)
    assert toks.device.type == "meta" and toks.shape == (1, 3)


def test_host_frames_are_moved_to_the_model_device_chunk_by_chunk():
    # frames on the host (real CPU tensors), model on meta: every chunk is moved to the
    # model's device as it is encoded, so the device never holds the whole video
    vlm = LongVideoVLM.from_config("tiny-llava-onevision", device="meta", vision_chunk_frames=3)
    host = torch.randn(7, 3, 56, 56)
    chunks = list(vlm.iter_patch_features(host))
    assert [s for s, _ in chunks] == [0, 3, 6]
    assert all(f.device.type == "meta" and f.dtype == vlm.dtype for _, f in chunks)
    ids = dict(dtype=torch.long, device="meta")
    pr = VideoPrompt(host, torch.empty(1, 2, **ids), torch.empty(1, 3, **ids))
    assert vlm.first_token(pr).is_meta


def test_fake_cpu_simulation_matches_measured_peak():
    # Simulation recipe for the profiler: build on meta, then to_empty(device="cpu") inside
    # FakeTensorMode: the same kernels are dispatched as on real CPU tensors (SDPA's fused
    # CPU path rather than the math path meta tensors take), so the peaks agree exactly.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lvlm_fast.profile import LiveTensorTracker

    vlm = LongVideoVLM.from_config("tiny-llava-onevision", vision_chunk_frames=4,
                                   prefill_chunk_tokens=16)
    pr = _prompt(12)
    with LiveTensorTracker() as real:
        vlm.first_token(pr)
    sim = LongVideoVLM.from_config("tiny-llava-onevision", device="meta", vision_chunk_frames=4,
                                   prefill_chunk_tokens=16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        sim.model.to_empty(device="cpu")
        fake_pr = VideoPrompt(torch.empty(12, 3, 56, 56), pr.prefix_ids.clone(),
                              pr.question_ids.clone())
        with LiveTensorTracker() as fake:
            sim.first_token(fake_pr)
    assert real.peak_bytes > 0 and fake.peak_bytes == real.peak_bytes


def test_meta_7b_config_shapes_and_default_chunks():
    vlm = LongVideoVLM.from_config("llava-onevision-qwen2-7b", device="meta", dtype=torch.bfloat16)
    assert vlm.dtype == torch.bfloat16 and vlm.tokens_per_frame == 196
    assert vlm.fused_attention  # head dim 128: prefill/decode use lvlm_fast summary_attention
    per = vlm.vision_bytes_per_frame()
    assert vlm.vision_chunk_frames == (1 << 30) // per >= 1
    assert 1 <= vlm.prefill_chunk_tokens <= 4096
    feats = next(iter(vlm.iter_patch_features(torch.empty(2, 3, 384, 384, device="meta"))))[1]
    assert feats.shape == (2, 27, 27, 3584)
    assert vlm.pool_2x2(feats).shape == (2, 14, 14, 3584)


def test_budget_too_small_says_bytes_needed(siglip):
    per = LongVideoVLM(siglip).vision_bytes_per_frame()
    with pytest.raises(ValueError, match=rf"memory_budget_bytes=10 .*one frame needs {per} bytes"):
        LongVideoVLM(siglip, memory_budget_bytes=10)
    vlm = LongVideoVLM(siglip, memory_budget_bytes=3 * per)
    assert vlm.vision_chunk_frames == 3
    with pytest.raises(ValueError, match="vision_chunk_frames"):
        LongVideoVLM(siglip, vision_chunk_frames=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        LongVideoVLM(siglip, memory_budget_bytes=-1)
    with pytest.raises(ValueError, match="attention"):
        LongVideoVLM(siglip, attention="flash")
    with pytest.raises(ValueError, match="head dim"):
        LongVideoVLM(siglip, attention="fused")  # toy head dim 16


def test_unsupported_model_class_names_supported():
    assert SUPPORTED_MODEL_CLASSES[:2] == ("LlavaOnevisionForConditionalGeneration",
                                           "Qwen2_5_VLForConditionalGeneration")
    assert "Qwen3VLForConditionalGeneration" in SUPPORTED_MODEL_CLASSES
    with pytest.raises(TypeError, match=r"Linear.*LlavaOnevisionForConditionalGeneration, "
                                        r"Qwen2_5_VLForConditionalGeneration"):
        LongVideoVLM(torch.nn.Linear(2, 2))


def test_unknown_strategy_lists_names(siglip):
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; available: .*full"):
        LongVideoVLM(siglip, strategy="nope")


def test_bad_prompt_inputs(siglip):
    vlm = LongVideoVLM(siglip)
    pr = _prompt(2)
    with pytest.raises(ValueError, match=r"pixel_values must be \(T, 3, 56, 56\)"):
        vlm.first_token(VideoPrompt(torch.randn(2, 3, 32, 32), pr.prefix_ids, pr.question_ids))
    with pytest.raises(ValueError, match="question_ids"):
        vlm.first_token(VideoPrompt(pr.pixel_values, pr.prefix_ids,
                                    torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="visual"):
        vlm.prefill_embeds(pr.prefix_ids, torch.randn(1, 3, 7), pr.question_ids, frames_encoded=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.generate(pr, max_new_tokens=0)
    with pytest.raises(TypeError, match="VideoPrompt"):
        vlm.first_token((pr.pixel_values, pr.prefix_ids))


def test_from_pretrained_roundtrip_and_bad_checkpoints(siglip, tmp_path):
    good = tmp_path / "good"
    siglip.save_pretrained(good)
    vlm = LongVideoVLM.from_pretrained(good, dtype=torch.float32, vision_chunk_frames=1)
    pr = _prompt(2)
    torch.testing.assert_close(vlm.first_token(pr), LongVideoVLM(siglip).first_token(pr))

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        LongVideoVLM.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*config\.json"):
        LongVideoVLM.from_pretrained(empty)
    badcfg = tmp_path / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="badcfg"):
        LongVideoVLM.from_pretrained(badcfg)
    corrupt = tmp_path / "corrupt"
    siglip.save_pretrained(corrupt)
    weights = [f for f in os.listdir(corrupt) if f.endswith(".safetensors")]
    assert weights
    with open(corrupt / weights[0], "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="corrupt"):
        LongVideoVLM.from_pretrained(corrupt)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                   "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*LlavaOnevisionForConditionalGeneration"):
        LongVideoVLM.from_pretrained(other)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


# ------------------------------------------------------------------ input checks (issue 9.11)
@pytest.mark.parametrize("value, exc, msg", [
    (True, TypeError, r"max_new_tokens must be a positive int, got bool"),
    (2.0, TypeError, r"max_new_tokens must be a positive int, got float"),
    (0, ValueError, r"max_new_tokens must be a positive int \(>= 1\), got 0"),
    (-3, ValueError, r"max_new_tokens .*got -3"),
])
def test_max_new_tokens_must_be_a_positive_int_not_a_bool(siglip, value, exc, msg):
    vlm = LongVideoVLM(siglip)
    with pytest.raises(exc, match=msg):
        vlm.generate(_prompt(1), max_new_tokens=value)
    with pytest.raises(exc, match=msg):
        vlm.decode(None, value)  # checked before anything is read from the prefill result


@pytest.mark.parametrize("value, exc, msg", [
    (True, TypeError, r"eos_token_id must be an int token id in \[0, 256\) or None, got bool"),
    (1.0, TypeError, r"eos_token_id must be an int .*got float"),
    ("2", TypeError, r"eos_token_id must be an int .*got str"),
    (256, ValueError, r"eos_token_id must be a token id in \[0, 256\) .*got 256"),
    (-1, ValueError, r"eos_token_id must be a token id in \[0, 256\) .*got -1"),
])
def test_eos_token_id_must_be_an_int_in_vocab(siglip, value, exc, msg):
    vlm = LongVideoVLM(siglip)
    with pytest.raises(exc, match=msg):
        vlm.generate(_prompt(1), max_new_tokens=2, eos_token_id=value)


def test_eos_token_id_accepts_numpy_int(siglip):
    np = pytest.importorskip("numpy")
    vlm = LongVideoVLM(siglip)
    pr = _prompt(1)
    assert vlm.generate(pr, 2, eos_token_id=np.int64(3)).tolist() == \
        vlm.generate(pr, 2, eos_token_id=3).tolist()


@pytest.mark.parametrize("where", ["prefix_ids", "question_ids"])
def test_token_ids_out_of_vocab_or_float_are_rejected(siglip, where):
    vlm = LongVideoVLM(siglip)
    pr = _prompt(1)

    def with_ids(ids):
        kw = {"prefix_ids": pr.prefix_ids, "question_ids": pr.question_ids, where: ids}
        return VideoPrompt(pr.pixel_values, **kw)

    with pytest.raises(ValueError, match=rf"prompt.{where} must hold token ids in \[0, 256\) "
                                         r".*got 256"):
        vlm.first_token(with_ids(torch.tensor([[1, 256, 2]])))
    with pytest.raises(ValueError, match=rf"prompt.{where} must hold token ids in \[0, 256\) "
                                         r".*got -5"):
        vlm.first_token(with_ids(torch.tensor([[1, -5]])))
    with pytest.raises(TypeError, match=rf"prompt.{where} must hold integer token ids .*float32"):
        vlm.first_token(with_ids(torch.tensor([[1.0, 2.0]])))
    with pytest.raises(TypeError, match=rf"prompt.{where} must be a \(1, L>=1\) int64"):
        vlm.first_token(with_ids([[1, 2]]))
    # the wrapper's own prefill entry point checks too
    with pytest.raises(ValueError, match=rf"{where} must hold token ids in \[0, 256\)"):
        kw = {"prefix_ids": pr.prefix_ids, "question_ids": pr.question_ids,
              where: torch.tensor([[300]])}
        vlm.prefill_embeds(visual=torch.zeros(1, 0, vlm.hidden_size), frames_encoded=0, **kw)


@pytest.mark.parametrize("where", ["prefix_ids", "question_ids"])
@pytest.mark.parametrize("attr", ["video_token_id", "image_token_id"])
def test_placeholder_token_left_in_the_text_is_rejected(siglip, where, attr):
    vlm = LongVideoVLM(siglip)
    tid = getattr(siglip.config, attr)
    assert vlm.placeholder_token_ids()[attr] == tid
    pr = _prompt(1)
    ids = torch.tensor([[1, 2, tid]])
    kw = {"prefix_ids": pr.prefix_ids, "question_ids": pr.question_ids, where: ids}
    with pytest.raises(ValueError, match=rf"prompt.{where} holds the multimodal placeholder "
                                         rf"token\(s\) {attr}={tid} at position 2"):
        vlm.first_token(VideoPrompt(pr.pixel_values, **kw))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_frames_are_rejected_naming_the_frame(siglip, bad, dtype):
    vlm = LongVideoVLM(siglip)
    pr = _prompt(70)
    px = pr.pixel_values.to(dtype)
    px[67, 2, 10, 11] = bad  # past the first 64-frame block of the locating scan
    with pytest.raises(ValueError, match=r"prompt.pixel_values must be finite: frame 67 holds "
                                         r"NaN or inf"):
        vlm.generate(VideoPrompt(px, pr.prefix_ids, pr.question_ids), max_new_tokens=1)


def test_value_checks_skip_meta_and_count_one_host_read(siglip, monkeypatch):
    # meta ids/frames (the profiler's simulation) have no values: only dtype/shape checks
    vlm = LongVideoVLM.from_config("tiny-llava-onevision", device="meta")
    meta = dict(device="meta")
    pr = VideoPrompt(torch.empty(2, 3, 56, 56, **meta), torch.empty(1, 2, dtype=torch.long, **meta),
                     torch.empty(1, 3, dtype=torch.long, **meta))
    assert vlm.first_token(pr).is_meta
    with pytest.raises(TypeError, match=r"prompt\.prefix_ids must hold integer token ids"):
        vlm.first_token(VideoPrompt(pr.pixel_values, torch.empty(1, 2, **meta), pr.question_ids))
    # real tensors: each id tensor is read back once (one .tolist()), not per token
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    LongVideoVLM(siglip).first_token(_prompt(1))
    assert len(calls) <= 4  # prefix + question, checked in the prompt and again in prefill
