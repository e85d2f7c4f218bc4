"""Tier 0: the memory-vs-frames profiler core (lvlm_fast.profile.memory).

Simulated (meta, no weights) and measured (random weights on CPU) runs of the same tiny
pipeline must agree within 5 % for every registered strategy; the accounting adds weights
and inputs exactly; the simulation's shape cache changes nothing; bad input is clear.
"""

from __future__ import annotations

import gc
import re

import pytest
import torch
import torch.nn.functional as F

from lvlm_fast.models.strategies import STRATEGIES
from lvlm_fast.profile.memory import (
    PeakBreakdownTracker,
    Profiler,
    SimulationTracker,
    make_prompt,
    model_static_bytes,
    profile_pipeline,
)

TINY = "tiny-llava-onevision"
TINY_QWEN = "tiny-qwen2.5-vl"
TINY_VL = "tiny-video-llama"
# One tiny config per supported family; Qwen2.5-VL at 112 x 112 frames (4 x 4 merged
# tokens, four 56-pixel attention windows per temporal patch) to keep the runs small;
# Video-LLaMA at its own 28 x 28 (the tiny EVA ViT's image_size).
TINY_Q3 = "tiny-qwen3-vl"
TINY_Q35 = "tiny-qwen3.5"
FAMILIES = {TINY: None, TINY_QWEN: (112, 112), TINY_VL: None, TINY_Q3: (64, 64),
            TINY_Q35: (64, 64)}
# Simulated runs of the same algorithm the CPU measurement runs: Qwen3.5's Gated DeltaNet
# through transformers' plain-PyTorch rule (kernel_standins=False; the default simulation
# counts FLA's kernel instead, whose allocations tests/tier0/test_profile_kernel_standins.py
# checks against the stated table).
SAME_ALGORITHM = {TINY_Q35: dict(kernel_standins=False)}
# Video-LLaMA's LLM reads only the Video Q-Former's 32 tokens: it runs these (full = the
# released 8 frames, uniform = the fused stream, video-llama-seed = released-style).
VIDEO_LLAMA_STRATEGIES = {"full", "uniform", "video-llama-seed"}
# Small chunks that do not divide the frame / token counts: several vision chunks and
# several prefill chunks with ragged tails, like the 7B runs. 7 frames: an odd count, so
# Qwen2.5-VL's last temporal patch repeats the last frame.
KW = dict(vision_chunk_frames=3, prefill_chunk_tokens=16)
FRAMES = 7
# (strategy, family config) pairs a strategy refuses with NotImplementedError, by design:
# stream's slot-position rule is 1-D RoPE only; video-llama-seed is the released Video-LLaMA
# pipeline; Video-LLaMA refuses the strategies that act on per-frame LLM tokens.
UNSUPPORTED = {("stream", TINY_QWEN), ("video-llama-seed", TINY), ("video-llama-seed", TINY_QWEN),
               ("video-llama-seed", TINY_Q3), ("video-llama-seed", TINY_Q35),
               ("stream", TINY_Q3), ("stream", TINY_Q35),
               *((s, TINY_VL) for s in STRATEGIES if s not in VIDEO_LLAMA_STRATEGIES)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.fixture(scope="module")
def family_profilers() -> dict[str, tuple[Profiler, Profiler]]:
    return {name: (Profiler(name, dtype="fp32", simulate=True, vlm_kwargs=KW, frame_hw=hw,
                            **SAME_ALGORITHM.get(name, {})),
                   Profiler(name, dtype="fp32", simulate=False, vlm_kwargs=KW, frame_hw=hw))
            for name, hw in FAMILIES.items()}


@pytest.fixture(scope="module")
def profilers(family_profilers) -> tuple[Profiler, Profiler]:
    return family_profilers[TINY]


@pytest.mark.parametrize("model", sorted(FAMILIES))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_simulated_matches_measured(family_profilers, model: str, strategy: str) -> None:
    sim, real = family_profilers[model]
    try:
        a = sim.run(strategy, FRAMES)
    except NotImplementedError as exc:
        # a strategy without a rule for this family: the real run refuses it the same way
        with pytest.raises(NotImplementedError, match=re.escape(str(exc)[:60])):
            real.run(strategy, FRAMES)
        assert (strategy, model) in UNSUPPORTED
        return
    b = real.run(strategy, FRAMES)
    assert type(sim.family) is type(real.family)
    assert a["frame_size"] == b["frame_size"] == "x".join(map(str, sim.frame_hw))
    assert a["simulated"] is True and b["simulated"] is False
    assert a["method"] == "meta-live-tracker" and b["method"] == "cpu-live-tracker"
    assert a["llm_tokens"] == b["llm_tokens"] and a["llm_tokens"] > 0
    assert a["weight_bytes"] == b["weight_bytes"] and a["input_bytes"] == b["input_bytes"]
    assert a["peak_bytes"] == pytest.approx(b["peak_bytes"], rel=0.05)
    # The weights dominate a tiny model's total: check the pass itself too.
    assert b["pass_peak_bytes"] > 0
    assert a["pass_peak_bytes"] == pytest.approx(b["pass_peak_bytes"], rel=0.05)


@pytest.mark.parametrize("strategy", ["uniform", "video-llama-seed"])
def test_video_llama_paths_beyond_the_position_table(strategy: str) -> None:
    """Both Video-LLaMA profile paths at 40 frames (past the 32-row frame table, position
    set through ``model_overrides`` as ``--model-set`` does): simulated == measured; the
    released-style path encodes every frame at once and holds the K/V and scores, so its
    pass peak is above the fused stream's; with the default position="error" it raises."""
    n, kw = 40, dict(vision_chunk_frames=6, prefill_chunk_tokens=16)
    over = {"video_qformer.position": "interpolate"}
    knobs = {"uniform": {"num_frames": n}}
    sim, real = (Profiler(TINY_VL, dtype="fp32", simulate=s, vlm_kwargs=kw,
                          strategy_overrides=knobs, model_overrides=over) for s in (True, False))
    assert sim.model.model.video_qformer.position == "interpolate"
    a, b = sim.run(strategy, n), real.run(strategy, n)
    assert a["llm_tokens"] == b["llm_tokens"] == 4 + 16 + 32  # 4 video queries (tiny)
    assert a["frames_encoded"] == b["frames_encoded"] == n
    assert b["pass_peak_bytes"] > 0
    assert a["pass_peak_bytes"] == pytest.approx(b["pass_peak_bytes"], rel=0.05)
    other = sim.run("uniform" if strategy == "video-llama-seed" else "video-llama-seed", n)
    seed, stream = (a, other) if strategy == "video-llama-seed" else (other, a)
    assert seed["pass_peak_bytes"] > stream["pass_peak_bytes"]
    plain = Profiler(TINY_VL, dtype="fp32", simulate=True, vlm_kwargs=kw,
                     strategy_overrides=knobs)
    with pytest.raises(ValueError, match="40 frames exceed the 32-row frame-position table"):
        plain.run(strategy, n)
    with pytest.raises(ValueError, match=re.escape("model config has no 'video_qformer.nope'")):
        Profiler(TINY_VL, model_overrides={"video_qformer.nope.x": 1})


def test_peak_is_weights_plus_inputs_plus_pass() -> None:
    # frames uploaded to the device as a whole (--frames-on-device): they count
    sim = Profiler(TINY, dtype="fp32", simulate=True, vlm_kwargs=KW, inputs_on_device=True)
    row = sim.run("full", FRAMES)
    assert row["inputs_counted"] is True
    model = sim.model_for("full")
    n_params = sum(p.numel() * p.element_size() for p in model.parameters())
    n_bufs = sum(b.numel() * b.element_size() for b in model.buffers())
    assert row["weight_bytes"] == n_params + n_bufs == model_static_bytes(model)
    assert row["weights_added_bytes"] == 0
    size = sim.config.vision_config.image_size
    assert row["input_bytes"] == FRAMES * 3 * size * size * 4 + (16 + 32) * 8
    assert row["peak_bytes"] == row["weight_bytes"] + row["input_bytes"] + row["pass_peak_bytes"]
    # full: every pooled token of every frame + one newline, plus the prompt.
    assert row["visual_tokens"] == FRAMES * 4 + 1
    assert row["llm_tokens"] == row["visual_tokens"] + 16 + 32


def test_installed_modules_count_for_their_strategy_only() -> None:
    """videoxl installs its summary q/k/v projections on the model: they count for videoxl
    (in the pass on its first run, as weights afterwards) and never for another strategy.
    Without checkpoint summary weights they share the base q/k/v (issue 9.14): 0 bytes;
    separate copies (share_base=False) count as added weights."""
    from lvlm_fast.nn.summary_proj import install_summary_projections

    prof = Profiler(TINY, dtype="fp32", simulate=True, vlm_kwargs=KW)
    fresh = prof.weight_bytes
    first, again = prof.run("videoxl", 5), prof.run("videoxl", 6)
    assert first["weight_bytes"] == fresh and first["weights_added_bytes"] == 0
    assert again["weight_bytes"] == fresh
    assert prof.run("full", 5)["weight_bytes"] == fresh
    # untied copies are real bytes: counted as weights from then on, for every strategy
    # run on this model (they stay installed), never hidden
    lm = prof.model_for("videoxl").model.language_model
    qkv = sum(p.nbytes for layer in lm.layers for n in "qkv"
              for p in getattr(layer.self_attn, f"{n}_proj").base.parameters())
    install_summary_projections(lm, share_base=False)
    assert prof.run("videoxl", 7)["weight_bytes"] == fresh + qkv


def test_frames_on_host_are_reported_not_counted() -> None:
    # the default: frames in host memory, streamed to the device one vision chunk at a time
    row = profile_pipeline(TINY, "full", 5, dtype="fp32", simulate=True, vlm_kwargs=KW)
    assert row["inputs_counted"] is False and row["input_bytes"] > 0
    assert row["peak_bytes"] == row["weight_bytes"] + row["pass_peak_bytes"]


def test_full_grows_with_frames_by_its_kv_cache(profilers) -> None:
    sim, _ = profilers
    a, b = sim.run("full", 6), sim.run("full", 12)
    tc = sim.config.text_config
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * \
        (tc.hidden_size // tc.num_attention_heads) * 4
    assert b["peak_bytes"] - a["peak_bytes"] >= (b["llm_tokens"] - a["llm_tokens"]) * kv_per_token


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_vision_chunk_replay_changes_no_number(model: str) -> None:
    """Replayed vision chunks (VisionChunkReplay) give the peaks, token counts and
    allocation counts of running every chunk, for every strategy (11 frames in chunks of 3
    frames, 4 on Qwen2.5-VL (whole temporal patches): repeated chunks and a ragged one per
    pass), and they are actually replayed."""
    n = 11
    replay = Profiler(model, dtype="bf16", simulate=True, vlm_kwargs=KW, frame_hw=FAMILIES[model])
    plain = Profiler(model, dtype="bf16", simulate=True, vlm_kwargs=KW, frame_hw=FAMILIES[model])
    plain.replay_chunks = False
    for s in sorted(STRATEGIES):
        if (s, model) in UNSUPPORTED:
            continue
        a, b = replay.run(s, n), plain.run(s, n)
        assert b["vision_chunks_replayed"] == 0
        # chunks, and vision blocks of one kind (vilamp-seed's all-frames call included)
        # (video-llama-seed: one all-frames call, whose EVA ViT blocks are not among
        # vision_blocks: nothing to replay within one run, numbers still checked below)
        assert a["vision_chunks_replayed"] > 0 or s == "video-llama-seed", s
        for k in ("peak_bytes", "pass_peak_bytes", "llm_tokens", "allocations"):
            assert a[k] == b[k], (s, k)
    # the breakdown at the peak lists the same tensors with and without replay
    ra = replay.run("full", n, breakdown=4)["breakdown"]
    rb = plain.run("full", n, breakdown=4)["breakdown"]
    assert [(i["nbytes"], i["shape"]) for i in ra] == [(i["nbytes"], i["shape"]) for i in rb]


def test_vision_blocks_are_the_towers_repeated_layers() -> None:
    from lvlm_fast.profile.memory import build_model, vision_blocks

    q = build_model(TINY_QWEN, simulate=True)
    assert vision_blocks(q) == list(q.model.visual.blocks)
    lv = build_model(TINY, simulate=True)
    assert vision_blocks(lv) == list(lv.model.vision_tower.encoder.layers)


def test_vision_chunk_replay_raises_the_peak_inside_a_chunk() -> None:
    """The replayed peak is the chunk's own peak on top of what is alive, not just its
    output: a fake encode whose temporary (4 KiB) is larger than its output (400 B)."""
    from lvlm_fast.profile.memory import VisionChunkReplay

    def encode(frames):
        tmp = torch.empty(1024, device="meta")
        del tmp
        return torch.empty(100, device="meta")

    memo = VisionChunkReplay()
    for expect_hits in (0, 1):
        keep, frames = [], torch.empty(2, 3, device="meta")  # frames: from before
        with SimulationTracker() as tr:
            f = memo.wrap(encode, tr)
            keep.append(torch.empty(10, device="meta"))  # 40 B alive beside the chunk
            out = f(frames)
        assert (tr.peak_bytes, tr.current_bytes) == (40 + 4096, 40 + 400)
        assert out.shape == (100,) and memo.hits == expect_hits

    kept = []

    def leaky(frames):  # keeps state alive: recorded as not replayable
        kept.append(torch.empty(8, device="meta"))
        return torch.empty(4, device="meta")

    memo = VisionChunkReplay()
    one = torch.empty(1, device="meta")
    for _ in range(2):
        with SimulationTracker() as tr:
            memo.wrap(leaky, tr)(one)
        assert tr.peak_bytes == 32 + 16  # run for real both times
    assert memo.hits == 0 and list(memo.records.values()) == [None]


def test_profile_frame_size_per_family() -> None:
    """A 448 x 448 video resized by each family's rule: LLaVA-OneVision squares it to the
    tower's image_size; Qwen2.5-VL keeps 448 x 448 (multiple of 28 within its bounds)."""
    from lvlm_fast.profile.memory import profile_frame_hw

    assert profile_frame_hw("llava-onevision-qwen2-7b") == (384, 384)
    assert profile_frame_hw(TINY) == (56, 56)
    assert profile_frame_hw(TINY_QWEN) == (448, 448)
    p = make_prompt(TINY_QWEN, 3, dtype=torch.float32, device="cpu", frame_hw=(56, 84))
    assert p.pixel_values.shape == (3, 3, 56, 84)
    ids = torch.cat([p.prefix_ids, p.question_ids], 1)
    assert int(ids.max()) < 250  # below image/video/vision start/end ids 250..253
    with pytest.raises(ValueError, match="frame_hw must be"):
        Profiler(TINY_QWEN, simulate=True, frame_hw=(0, 56))


def test_shape_cache_changes_no_number() -> None:
    cached = Profiler(TINY, dtype="bf16", simulate=True, vlm_kwargs=KW)
    plain = Profiler(TINY, dtype="bf16", simulate=True, vlm_kwargs=KW)
    plain.op_cache = False
    for s in ("vilamp", "videoxl"):
        a, b = cached.run(s, 5), plain.run(s, 5)
        assert a["op_cache_hits"] > a["op_cache_misses"] > 0
        assert b["op_cache_hits"] == 0
        assert (a["peak_bytes"], a["llm_tokens"]) == (b["peak_bytes"], b["llm_tokens"])


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_simulated_sdpa_output_has_the_fused_kernel_layout(layout: str) -> None:
    x = torch.randn(1, 4, 6, 8) if layout == "bhld" else torch.randn(1, 6, 4, 8).transpose(1, 2)
    real = F.scaled_dot_product_attention(x, x, x, is_causal=True)
    xm = x.to("meta")
    with torch.inference_mode(), SimulationTracker() as tr:
        fake = F.scaled_dot_product_attention(xm, xm, xm, is_causal=True)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    assert tr.peak_bytes == real.untyped_storage().nbytes()


def test_breakdown_lists_the_tensors_alive_at_the_peak() -> None:
    def f():
        a = torch.ones(1000)
        b = torch.ones(2000)  # peak: a + b = 12,000 B
        del a
        c = torch.ones(500)
        return b, c

    gc.collect()
    with PeakBreakdownTracker() as tr:
        f()
    assert tr.peak_bytes == 12000
    top = tr.top(5)
    assert [(t.nbytes, t.shape, t.op) for t in top] == [(8000, (2000,), "ones"),
                                                        (4000, (1000,), "ones")]


def test_breakdown_row(profilers) -> None:
    sim, _ = profilers
    row = sim.run("full", FRAMES, breakdown=3)
    assert len(row["breakdown"]) == 3
    assert row["breakdown"][0]["nbytes"] >= row["breakdown"][-1]["nbytes"] > 0
    assert row["peak_bytes"] == sim.run("full", FRAMES)["peak_bytes"]


def test_largest_fitting_bisects_between_sweep_points(profilers) -> None:
    sim, _ = profilers
    budget = sim.run("full", 9)["peak_bytes"]
    fit, capped = sim.largest_fitting("full", budget, [4, 13])
    assert not capped and fit >= 9
    assert sim.run("full", fit)["peak_bytes"] <= budget < sim.run("full", fit + 1)["peak_bytes"]
    assert sim.largest_fitting("full", 10**15, [4, 13]) == (13, True)
    assert sim.largest_fitting("full", sim.weight_bytes, [4, 13]) == (None, False)


def test_make_prompt_ids_avoid_the_video_token() -> None:
    p = make_prompt(TINY, 3, dtype=torch.float32, device="cpu")
    assert p.pixel_values.shape == (3, 3, 56, 56)
    ids = torch.cat([p.prefix_ids, p.question_ids], 1)
    assert int(ids.max()) < 254


def test_bad_input_is_clear() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'.*full"):
        profile_pipeline(TINY, "nope", 4, simulate=True)
    with pytest.raises(ValueError, match=r"unknown model config 'llava-13b'.*tiny-llava"):
        profile_pipeline("llava-13b", "full", 4)
    with pytest.raises(ValueError, match="frames must be a positive int"):
        profile_pipeline(TINY, "full", 0, simulate=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        profile_pipeline(TINY, "full", 4, dtype="int3")
    from transformers import LlamaConfig

    with pytest.raises(TypeError, match=r"supported: .*LlavaOnevisionForConditionalGeneration.*"
                                        r"Qwen2_5_VLForConditionalGeneration"):
        profile_pipeline(LlamaConfig(), "full", 4)
    # A per-chunk working-memory budget below one frame: the wrapper says what one needs.
    with pytest.raises(ValueError, match=r"too small.*needs \d+ bytes"):
        profile_pipeline(TINY, "full", 4, vlm_kwargs={"memory_budget_bytes": 16})


def test_memtracker_cannot_track_the_chunked_pipeline() -> None:
    """Why lvlm_fast's tracker is used (memory.py docstring): torch's MemTracker refuses a
    module that runs twice in one session, and the pipeline runs every layer per chunk."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lvlm_fast.models.wrapper import LongVideoVLM

    sim = Profiler(TINY, dtype="fp32", simulate=True)
    vlm = LongVideoVLM(sim.model, "full", **KW)
    prompt = make_prompt(sim.config, 7, dtype=torch.float32, device="meta")
    mt = MemTracker()
    mt.track_external(sim.model, prompt.pixel_values)
    with pytest.raises(NotImplementedError, match="multiple iterative calls"), \
            torch.inference_mode(), mt:
        vlm.first_token(prompt)
