"""Qwen3-VL through the family layer: chunked vision (+ DeepStack) == transformers' all-frames
vision, positions == ``get_rope_index`` on the processor's timestamped prompt, ``full`` ==
``Qwen3VLForConditionalGeneration.generate`` token for token (fp32 logits within 1e-5),
configs, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 is on sys.path
    check_from_pretrained,
    check_full_equals_generate,
    random_prompt,
    text_ids,
)
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.families import TokenBlocks, family_for
from lvlm_fast.models.families.qwen3_vl import SequentialPlan
from lvlm_fast.models.strategies.base import PrefillResult, Strategy, VideoPrompt

VIDEO, START, END = 251, 252, 253
H, W = 128, 96  # 8 x 6 patches of 16 -> 4 x 3 merged tokens per frame


@pytest.fixture(scope="module")
def qwen3():
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(get_config("tiny-qwen3-vl")).eval()


def _prompt(t: int, p: int = 3, q: int = 4, seed: int = 0, fps: float | None = None,
            hw: tuple[int, int] = (H, W)) -> VideoPrompt:
    return random_prompt(t, hw, p, q, seed, fps, text_ids=text_ids)


def hf_timestamps(num_frames: int, fps: float | None) -> list[float]:
    """transformers' own timestamp rule (frame i at i / fps; fps None -> 24)."""
    return Qwen3VLProcessor._calculate_timestamps(None, list(range(num_frames)),
                                                  24 if fps is None else fps, 2)


def hf_ids(pr: VideoPrompt, units: list[int], tokens_per_unit: list[int],
           num_frames: int, fps: float | None) -> torch.Tensor:
    """The processor's prompt (``replace_video_token``) with the given units kept, each
    with ``tokens_per_unit`` video placeholders: ``<t seconds><vs> pads <ve>`` per unit."""
    ts = hf_timestamps(num_frames, fps)
    ids = pr.prefix_ids[0].tolist()
    for u, n in zip(units, tokens_per_unit, strict=True):
        ids += text_ids(f"<{ts[u]:.1f} seconds>") + [START] + [VIDEO] * n + [END]
    return torch.tensor([ids + pr.question_ids[0].tolist()])


def hf_inputs(vlm: LongVideoVLM, pr: VideoPrompt) -> dict:
    """What the Qwen3-VL processor gives for this prompt (every frame)."""
    flat, thw = vlm.family.patchify(pr.pixel_values)
    t, per = int(thw[0, 0]), int(thw[0, 1] * thw[0, 2]) // 4
    ids = hf_ids(pr, list(range(t)), [per] * t, pr.pixel_values.shape[0], pr.fps)
    return dict(input_ids=ids, pixel_values_videos=flat, video_grid_thw=thw,
                mm_token_type_ids=(ids == VIDEO).int() * 2)


def test_family_registry_and_configs(qwen3):
    fam = family_for(qwen3)
    assert fam.name == "qwen3_vl" and fam.frames_per_unit == 2
    assert fam.token_grid((H, W)) == (4, 3) and fam.deepstack_levels() == 2
    assert fam.feature_size() == 3 * 128
    big = get_config("qwen3-vl-8b")
    assert big.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert big.text_config.rope_parameters["mrope_interleaved"] is True
    assert list(big.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    assert (big.text_config.num_hidden_layers, big.text_config.hidden_size) == (36, 4096)
    meta = LongVideoVLM.from_config("qwen3-vl-8b", device="meta", dtype=torch.bfloat16)
    assert meta.family.token_grid((448, 448)) == (14, 14)
    assert meta.feature_size == 4 * 4096


@pytest.mark.parametrize("frames,chunk", [(6, 2), (5, 4), (4, 3)])
def test_vision_chunks_equal_get_video_features(qwen3, frames, chunk):
    """Chunks of temporal patches == the tower on every frame at once, main and every
    DeepStack level, stacked [main | level 0 | level 1]."""
    vlm = LongVideoVLM(qwen3, vision_chunk_frames=chunk)
    pr = _prompt(frames)
    flat, thw = vlm.family.patchify(pr.pixel_values)
    with torch.no_grad():
        out = qwen3.model.get_video_features(flat, thw, return_dict=True)
    want = torch.cat([out.pooler_output[0]] + [lv[0] for lv in out.deepstack_features], -1)
    got = torch.cat([f for _, f in vlm.iter_patch_features(pr.pixel_values)])
    assert got.shape == (thw[0, 0], 4, 3, 3 * 128)
    torch.testing.assert_close(got.reshape(-1, 3 * 128), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vlm.family.encode_all_at_once(pr.pixel_values), got,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fps", [None, 2.0, 0.5])
@pytest.mark.parametrize("frames", [2, 5, 8])
def test_positions_equal_get_rope_index(qwen3, frames, fps):
    """The family's timestamped layout == the processor's ids, and its positions ==
    ``get_rope_index`` over them (any chunk alone), decode == ``rope_deltas``."""
    vlm = LongVideoVLM(qwen3)
    pr = _prompt(frames, p=4, q=5, fps=fps)
    kw = hf_inputs(vlm, pr)
    want, delta = qwen3.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"],
                                             video_grid_thw=kw["video_grid_thw"])
    units = -(-frames // 2)
    fam = vlm.family
    blocks = TokenBlocks.grid(units, 4, 3, frame_hw=(H, W), fps=fps, num_frames=frames)
    layout = fam.visual_layout(blocks, units * 12, text_ids=text_ids)
    # the layout's text + placeholder rows == the processor's ids
    seq = []
    for piece in layout.pieces:
        seq += [VIDEO] * (piece[1] - piece[0]) if isinstance(piece, tuple) else piece.tolist()
    ids = pr.prefix_ids[0].tolist() + seq + pr.question_ids[0].tolist()
    assert ids == kw["input_ids"][0].tolist()
    plan = fam.position_plan(4, blocks, units * 12, 5, layout=layout)
    assert isinstance(plan, SequentialPlan) and plan.total == len(ids)
    torch.testing.assert_close(plan.chunk(0, plan.total), want, rtol=0, atol=0)
    for lo, hi in [(0, 3), (3, 17), (17, plan.total), (plan.total - 1, plan.total)]:
        torch.testing.assert_close(plan.chunk(lo, hi), want[:, :, lo:hi], rtol=0, atol=0)
    assert int(plan.decode(0)[0, 0, 0]) == plan.total + int(delta)
    assert int(plan.decode(3)[2, 0, 0]) == plan.total + 3 + int(delta)


@pytest.mark.parametrize("frames", [2, 5, 8])
@pytest.mark.parametrize("attention,chunk", [("auto", 7), ("model", 11)])
def test_full_equals_generate(qwen3, frames, attention, chunk):
    """``full`` == ``Qwen3VLForConditionalGeneration.generate`` (timestamps, DeepStack at
    the visual positions of each prefill chunk, interleaved M-RoPE): greedy tokens equal,
    first-token logits within 1e-5 (fp32), prefill chunks that do not divide the prompt
    (a chunk boundary cuts frames, timestamps and DeepStack rows), fused attention (head
    dim 64) and the model's own (SDPA)."""
    vlm = LongVideoVLM(qwen3, "full", vision_chunk_frames=4, prefill_chunk_tokens=chunk,
                       attention=attention)
    pr = _prompt(frames, seed=frames, fps=1.0 if frames == 8 else None)
    kw = hf_inputs(vlm, pr)
    res = check_full_equals_generate(vlm, qwen3, pr, kw)
    assert isinstance(res.positions, SequentialPlan)
    units = -(-frames // 2)
    assert res.visual_tokens == units * 12 and res.frames_encoded == frames
    assert res.llm_tokens == kw["input_ids"].shape[1]


def test_deepstack_matters(qwen3):
    """The DeepStack rows reach the decoder: zeroing them changes the logits (so the
    equality above could fail if they were dropped)."""
    vlm = LongVideoVLM(qwen3, prefill_chunk_tokens=9)
    pr = _prompt(4, seed=2)
    out = vlm.strategy.visual_embeds(vlm, pr)
    (visual, frames), blocks = out, out.blocks
    a = vlm.prefill_embeds(pr.prefix_ids, visual, pr.question_ids, frames_encoded=frames,
                           blocks=blocks, text_ids=text_ids).last_hidden
    cut = visual.clone()
    cut[..., 128:] = 0
    b = vlm.prefill_embeds(pr.prefix_ids, cut, pr.question_ids, frames_encoded=frames,
                           blocks=blocks, text_ids=text_ids).last_hidden
    assert (a - b).abs().max() > 1e-4


def test_from_pretrained(qwen3, tmp_path):
    check_from_pretrained(qwen3, tmp_path, "qwen3_vl", _prompt(4, seed=1))


def test_bad_input(qwen3):
    vlm = LongVideoVLM(qwen3)
    with pytest.raises(ValueError, match=r"multiples of 32"):
        vlm.first_token(_prompt(2, hw=(112, 112)))
    pr = _prompt(2)
    pr.text_ids = None
    with pytest.raises(ValueError, match=r"prompt\.text_ids"):
        vlm.first_token(pr)
    with pytest.raises(ValueError, match=r"feature_size=384"):
        vlm.prefill_embeds(torch.tensor([[5]]), torch.zeros(1, 3, 128), torch.tensor([[6]]),
                           frames_encoded=0)


class _NoPositions(Strategy):
    name = "no-positions"

    def prefill(self, vlm, prompt):
        res = vlm.strategy.prefill(vlm, prompt)
        return PrefillResult(res.last_hidden, res.cache, res.llm_tokens, res.visual_tokens,
                             res.frames_encoded)


def test_custom_strategy_without_positions_is_an_error(qwen3):
    """A custom strategy on an M-RoPE family that leaves ``PrefillResult.positions`` None
    is refused (decoding would silently use 1-D positions)."""
    vlm = LongVideoVLM(qwen3)
    with pytest.raises(ValueError, match="positions"):
        vlm.generate(_prompt(2), max_new_tokens=2, strategy=_NoPositions())


def test_full_streams_deepstack_rows_into_the_prefill(qwen3, monkeypatch):
    """``full`` / ``uniform`` hand the prefill a VisualStream: each vision chunk is encoded
    when the prefill reaches it (no tensor of every frame's DeepStack rows); rows are read
    once, in order."""
    from lvlm_fast.models.strategies.base import VisualStream

    vlm = LongVideoVLM(qwen3, vision_chunk_frames=2, prefill_chunk_tokens=10)
    seen, encoded = [], []
    real_prefill, real_encode = vlm.prefill_embeds, vlm.family.encode

    def spy_prefill(*a, **k):
        seen.append(a[1])
        return real_prefill(*a, **k)

    def spy_encode(frames):
        encoded.append(len(seen))
        return real_encode(frames)

    monkeypatch.setattr(vlm, "prefill_embeds", spy_prefill)
    monkeypatch.setattr(vlm.family, "encode", spy_encode)
    for name, kw in (("full", {}), ("uniform", {"num_frames": 4})):
        seen.clear()
        encoded.clear()
        vlm.first_token(_prompt(6, seed=4), name, **kw)
        assert isinstance(seen[0], VisualStream)
        assert encoded and all(n == 1 for n in encoded)  # encoded during the prefill
    s = VisualStream(4, 2, iter([torch.zeros(1, 3, 2), torch.ones(1, 1, 2)]))
    assert s.take(0, 2).shape == (1, 2, 2) and s.take(2, 4)[0, :, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="in order"):
        VisualStream(4, 2, iter([])).take(1, 2)


def test_vilamp_streams_its_blocks_and_frees_each_once_read(qwen3, monkeypatch):
    """``vilamp`` on DeepStack rows: the prefill gets a VisualStream of one block per vision
    chunk (pass 1 encodes before the prefill, pass 2 during it); a block is freed once the
    prefill has read it (weakrefs checked at every decoder call), and the first-token
    logits equal the held-output path's."""
    import weakref

    from lvlm_fast.models.strategies import vilamp as vilamp_mod
    from lvlm_fast.models.strategies.base import VisualStream

    vlm = LongVideoVLM(qwen3, vision_chunk_frames=2, prefill_chunk_tokens=10)
    pr = _prompt(10, seed=5)
    blocks, alive_at_call, seen = [], [], []
    real_blocks, real_run, real_prefill = vilamp_mod.streamed_blocks, vlm.run_llm, \
        vlm.prefill_embeds

    def spy_blocks(*a, **k):
        for b in real_blocks(*a, **k):
            blocks.append(weakref.ref(b))
            out = [b]
            del b
            yield out.pop()  # the spy keeps no reference either

    def spy_run(*a, **k):
        alive_at_call.append((len(blocks), sum(r() is not None for r in blocks)))
        return real_run(*a, **k)

    def spy_prefill(*a, **k):
        seen.append(a[1])
        return real_prefill(*a, **k)

    monkeypatch.setattr(vilamp_mod, "streamed_blocks", spy_blocks)
    monkeypatch.setattr(vlm, "run_llm", spy_run)
    monkeypatch.setattr(vlm, "prefill_embeds", spy_prefill)
    streamed = vlm.first_token(pr, "vilamp", num_keyframes=2)
    assert isinstance(seen[0], VisualStream)
    assert len(blocks) == 5  # 10 frames = 5 units, one per vision chunk
    # at every decoder call only the block being read (and none before it) is alive
    assert all(alive <= 1 for _, alive in alive_at_call), alive_at_call
    assert max(made for made, _ in alive_at_call) == 5
    monkeypatch.setattr(vilamp_mod, "streams", lambda vlm: False)
    seen.clear()
    held = vlm.first_token(pr, "vilamp", num_keyframes=2)
    assert isinstance(seen[0], torch.Tensor)  # the held path, for the comparison
    torch.testing.assert_close(streamed, held, rtol=1e-5, atol=1e-5)


def test_qwen3_vl_8b_full_on_meta():
    """The shipped 8B config end to end on meta (the profiler's path): 448x448 frames ->
    14 x 14 = 196 tokens per temporal unit, DeepStack rows streamed, nominal timestamps
    (Qwen's count: ``<``, one token per digit or ``.``, `` seconds``, ``>``)."""
    from lvlm_fast.models.families.qwen3_vl import nominal_text_ids

    assert len(nominal_text_ids("<12.5 seconds>")) == 7
    meta = LongVideoVLM.from_config("qwen3-vl-8b", device="meta", dtype=torch.bfloat16)
    pm = VideoPrompt(torch.empty(8, 3, 448, 448, device="meta"),
                     torch.zeros(1, 5, dtype=torch.long, device="meta"),
                     torch.ones(1, 9, dtype=torch.long, device="meta"), fps=2.0)
    assert meta.first_token(pm).shape == (1, 151936)
    res = meta.last_prefill
    assert res.visual_tokens == 4 * 196
    # 4 frames of "<t seconds><vs> ... <ve>": t = 0.2, 1.2, 2.2, 3.2 -> 6 + 2 tokens each
    assert res.llm_tokens == 5 + 9 + 4 * 196 + 4 * 8
    assert meta.fused_attention  # head dim 128


def test_streamed_vision_time_is_not_counted_as_prefill(qwen3, monkeypatch):
    """With rows streamed into the prefill the stages nest: vision time counts once."""
    import time as _time

    vlm = LongVideoVLM(qwen3, vision_chunk_frames=2, prefill_chunk_tokens=10)
    real = vlm.family.encode

    def slow(frames):
        _time.sleep(0.2)
        return real(frames)

    monkeypatch.setattr(vlm.family, "encode", slow)
    t0 = _time.perf_counter()
    vlm.first_token(_prompt(6, seed=4))
    wall = _time.perf_counter() - t0
    assert vlm.timings["vision"] >= 0.6  # 3 chunks of 2 frames
    assert vlm.timings["prefill"] < 0.6 or vlm.timings["prefill"] < wall - 0.6
    assert sum(vlm.timings.values()) <= wall + 1e-3


def test_meta_deepstack_rows_are_held_for_the_decoder_call() -> None:
    """On meta the family cannot give the decoder its DeepStack rows (boolean indexing has
    no meta kernel), but the simulation must still hold them for the call as the real
    kwargs do: decoder_kwargs returns them under HOLD_KWARG, run_llm keeps them alive for
    the decoder call without passing them to the model, and lets them go after."""
    import weakref

    from lvlm_fast.models.families.base import HOLD_KWARG

    vlm = LongVideoVLM.from_config("tiny-qwen3-vl", device="meta", dtype=torch.float32)
    fam, d = vlm.family, vlm.hidden_size
    levels = fam.deepstack_levels()
    assert levels >= 1
    extra = torch.empty(5, levels * d, device="meta")
    kw = fam.decoder_kwargs(torch.ones(1, 5, dtype=torch.bool, device="meta"), extra)
    assert set(kw) == {HOLD_KWARG} and kw[HOLD_KWARG] is extra
    ref = weakref.ref(extra)
    del extra
    seen = []

    def pre_hook(module, args, kwargs):
        seen.append((ref() is not None, HOLD_KWARG in kwargs))

    h = vlm.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        vlm.run_llm(torch.empty(1, 5, d, device="meta"), vlm.make_cache(16), **kw)
    finally:
        h.remove()
    del kw
    assert seen == [(True, False)]  # alive during the call, never a model input
    assert ref() is None  # and released after it
