"""Video-LLaMA family (issue 13 part 3): ``full`` (released 8 frames) and ``uniform`` (any
frame count, streamed through the fused Video Q-Former) against a plain composition of
transformers modules and the released Q-Former math; audio branch; other strategies raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from lvlm_fast.models import LongVideoVLM
from lvlm_fast.models.families import family_for
from lvlm_fast.models.strategies.base import STRATEGIES, VideoPrompt, get_strategy
from lvlm_fast.models.video_llama_model import VideoLlamaModel, tiny_video_llama
from lvlm_fast.nn.qformer import AudioQFormer, VideoQFormer, released_to_blip2_qformer
from lvlm_fast.ops import keyframe_select
from lvlm_fast.reference.keyframe_select import keyframe_select as ref_keyframe_select

PREFIX = torch.tensor([[1, 5, 9, 33]])
QUESTION = torch.tensor([[40, 41, 42, 7]])


def make_vlm(position: str = "error", seed: int = 0, **kw) -> LongVideoVLM:
    cfg = tiny_video_llama()
    cfg.video_qformer["position"] = position
    torch.manual_seed(seed)
    return LongVideoVLM.from_config(cfg, "full", **kw)


def released_sd(module: VideoQFormer | AudioQFormer) -> dict[str, torch.Tensor]:
    """The module's weights under the released checkpoint keys."""
    ours = dict(module.named_parameters())
    return {theirs: ours[name].detach().clone()
            for name, theirs in module.released_key_map(len(module.layers)).items()}


def hf_branch(module: VideoQFormer | AudioQFormer, encoder_width: int) -> Blip2QFormerModel:
    """transformers' Blip2QFormerModel configured and loaded per the method facts (sec. 4)."""
    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-12,
                             cross_attention_frequency=1, encoder_hidden_size=encoder_width,
                             use_qformer_text_input=False)
    cfg._attn_implementation = "eager"
    hf = Blip2QFormerModel(cfg).eval()
    sd = released_to_blip2_qformer(released_sd(module), module.RELEASED_PREFIX)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    return hf


@torch.no_grad()
def reference_tokens(m: VideoLlamaModel, frames: torch.Tensor, pos_table: torch.Tensor
                     ) -> torch.Tensor:
    """The released Video-LLaMA video path on transformers modules, all frames at once:
    EVA ViT (+ ln_vision) -> image Q-Former -> + frame position -> (1, T*32, 768) ->
    Blip2QFormerModel (video Q-Former) -> llama_proj."""
    inner = m.model
    img = inner.vision_model(pixel_values=frames).last_hidden_state
    q = inner.query_tokens.expand(frames.shape[0], -1, -1)
    tok = inner.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state
    tok = tok + pos_table[: frames.shape[0]].unsqueeze(1)
    e = tok.reshape(1, -1, tok.shape[-1])
    vq = inner.video_qformer
    hf = hf_branch(vq, vq.encoder_width)
    out = hf(query_embeds=vq.query_tokens, encoder_hidden_states=e).last_hidden_state
    return vq.llama_proj(out)


@torch.no_grad()
def reference_logits(m: VideoLlamaModel, visual: torch.Tensor, steps: int
                     ) -> tuple[torch.Tensor, list[int]]:
    """First-token logits and a greedy answer, recomputing the whole sequence each step
    (LlamaModel + lm_head, no cache)."""
    emb = m.get_input_embeddings()
    seq = torch.cat([emb(PREFIX), visual, emb(QUESTION)], dim=1)
    first, toks = None, []
    for _ in range(steps):
        h = m.model.language_model(inputs_embeds=seq).last_hidden_state
        logits = m.lm_head(h[:, -1]).float()
        first = logits if first is None else first
        t = int(logits.argmax(-1))
        toks.append(t)
        seq = torch.cat([seq, emb(torch.tensor([[t]]))], dim=1)
    return first, toks


def prompt(frames: torch.Tensor, **kw) -> VideoPrompt:
    return VideoPrompt(frames, PREFIX, QUESTION, **kw)


def test_family_is_registered_and_one_d() -> None:
    vlm = make_vlm()
    assert family_for(vlm.model).name == "video_llama"
    assert vlm.family.position_plan(4, None, 4, 4) is None
    assert vlm.family.num_end_tokens() == 0
    with pytest.raises(ValueError, match="pixel_values must be"):
        vlm.first_token(prompt(torch.randn(8, 3, 32, 32)))


@pytest.mark.parametrize("t", [20, 8, 5])
def test_full_is_the_released_8_frames_token_for_token(t: int) -> None:
    vlm = make_vlm(vision_chunk_frames=3)
    m = vlm.model
    torch.manual_seed(1)
    frames = torch.randn(t, 3, 28, 28)
    idx = np.arange(0, t, t / 8).astype(int).tolist()  # released load_video
    assert len(idx) == 8
    ref_vis = reference_tokens(m, frames[idx], m.model.video_qformer.frame_position.weight)
    got_vis = vlm.family.video_tokens(vlm, frames, torch.tensor(idx))
    torch.testing.assert_close(got_vis, ref_vis, atol=2e-5, rtol=1e-4)
    ref_first, ref_toks = reference_logits(m, ref_vis, 6)
    torch.testing.assert_close(vlm.first_token(prompt(frames)), ref_first, atol=1e-4,
                               rtol=1e-4)
    assert vlm.last_prefill.visual_tokens == 4 and vlm.last_prefill.frames_encoded == 8
    assert vlm.generate(prompt(frames), 6)[0].tolist() == ref_toks


def interp_table(table: torch.Tensor, t: int) -> torch.Tensor:
    """Linear resampling of the table to t rows, ends kept (align_corners)."""
    x = table.t().unsqueeze(0)
    return F.interpolate(x, size=t, mode="linear", align_corners=True)[0].t()


@pytest.mark.parametrize("position", ["interpolate", "clamp"])
def test_uniform_streams_any_frame_count(position: str) -> None:
    vlm = make_vlm(position, vision_chunk_frames=7)
    m = vlm.model
    torch.manual_seed(2)
    frames = torch.randn(120, 3, 28, 28)
    n = 50  # > the 32-row frame table
    idx = torch.linspace(0, 119, n, dtype=torch.float64).round().long()
    table = m.model.video_qformer.frame_position.weight
    pos = interp_table(table, n) if position == "interpolate" else \
        table[torch.arange(n).clamp(max=table.shape[0] - 1)]
    ref_vis = reference_tokens(m, frames[idx], pos)
    got_vis = vlm.family.video_tokens(vlm, frames, idx)
    torch.testing.assert_close(got_vis, ref_vis, atol=2e-5, rtol=1e-4)
    ref_first, ref_toks = reference_logits(m, ref_vis, 4)
    p = prompt(frames)
    torch.testing.assert_close(vlm.first_token(p, "uniform", num_frames=n), ref_first,
                               atol=1e-4, rtol=1e-4)
    assert vlm.last_prefill.frames_encoded == n
    assert vlm.generate(p, 4, strategy="uniform", num_frames=n)[0].tolist() == ref_toks


def test_uniform_default_position_does_not_invent_rows() -> None:
    vlm = make_vlm()
    frames = torch.randn(40, 3, 28, 28)
    with pytest.raises(ValueError, match="32-row frame-position table"):
        vlm.first_token(prompt(frames), "uniform", num_frames=33)
    # up to the table's rows: every frame of a short video, exact (released math)
    m = vlm.model
    ref = reference_tokens(m, frames[:20], m.model.video_qformer.frame_position.weight)
    ref_first, _ = reference_logits(m, ref, 1)
    torch.testing.assert_close(vlm.first_token(prompt(frames[:20]), "uniform", num_frames=32),
                               ref_first, atol=1e-4, rtol=1e-4)


def test_audio_branch_tokens_come_first() -> None:
    vlm = make_vlm(vision_chunk_frames=4)
    m = vlm.model
    torch.manual_seed(3)
    frames = torch.randn(8, 3, 28, 28)
    audio = torch.randn(1, 8, 16)
    aq = m.model.audio_qformer
    hf = hf_branch(aq, 16)
    with torch.no_grad():
        e = audio + aq.frame_position.weight[:8]
        a_ref = aq.llama_proj(hf(query_embeds=aq.query_tokens,
                                 encoder_hidden_states=e).last_hidden_state)
        v_ref = reference_tokens(m, frames, m.model.video_qformer.frame_position.weight)
    ref_first, ref_toks = reference_logits(m, torch.cat([a_ref, v_ref], 1), 3)
    p = prompt(frames, audio_embeds=audio)
    torch.testing.assert_close(vlm.first_token(p), ref_first, atol=1e-4, rtol=1e-4)
    assert vlm.last_prefill.visual_tokens == 2 + 4
    assert vlm.generate(p, 3)[0].tolist() == ref_toks
    with pytest.raises(ValueError, match="audio_embeds must be"):
        vlm.first_token(prompt(frames, audio_embeds=torch.randn(8, 16)))
    with pytest.raises(ValueError, match="exceed the 8-row"):
        vlm.first_token(prompt(frames, audio_embeds=torch.randn(1, 9, 16)))


def test_without_audio_branch_audio_is_an_error() -> None:
    cfg = tiny_video_llama()
    cfg.audio_qformer = None
    vlm = LongVideoVLM.from_config(cfg)
    assert vlm.model.model.audio_qformer is None
    with pytest.raises(ValueError, match="without the audio branch"):
        vlm.first_token(prompt(torch.randn(8, 3, 28, 28), audio_embeds=torch.randn(1, 8, 16)))


@torch.no_grad()
def reference_frame_embeddings(m: VideoLlamaModel, frames: torch.Tensor) -> torch.Tensor:
    """(T, 768): the mean image-Q-Former token of each frame, all frames at once through
    transformers' Blip2VisionModel + Blip2QFormerModel."""
    inner = m.model
    img = inner.vision_model(pixel_values=frames).last_hidden_state
    q = inner.query_tokens.expand(frames.shape[0], -1, -1)
    return inner.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state.mean(1)


@pytest.mark.parametrize("t, k, tau, selector", [(40, 32, 0.85, False), (23, 6, 0.3, True),
                                                 (40, 12, 0.5, True), (5, 8, 0.85, False)])
def test_vilamp_keyframes_choose_the_video_qformer_frames(t: int, k: int, tau: float,
                                                          selector: bool) -> None:
    """vilamp = keyframe_select (query-free video-mean rule) over one embedding per frame
    (a selector's, or the mean image-Q-Former token); the K keyframes then go through the
    released Video Q-Former math (transformers composition), token for token.

    The tiny model's mean image-Q-Former tokens are nearly identical across frames (random
    init: near-uniform cross-attention), so with them the selection is a near-tie that only
    the op itself decides: that case checks the embedding is the transformers composition's
    and the indices are the op's on it. A selector with well-separated embeddings checks the
    indices against the plain-PyTorch keyframe_select reference."""
    vlm = make_vlm(vision_chunk_frames=6)
    m = vlm.model
    torch.manual_seed(7)
    frames = torch.randn(t, 3, 28, 28)
    knobs: dict = {"num_keyframes": k, "tau_f": tau}
    if selector:
        proj = torch.randn(3 * 28 * 28, 16, generator=torch.Generator().manual_seed(3))
        knobs["selector"] = lambda x: x.flatten(1) @ proj  # frames -> (t, 16)
        knobs["selector_transform"] = lambda x: x  # the frames as given
        emb = frames.flatten(1) @ proj
        idx, _ = ref_keyframe_select(emb, emb.mean(0), k, threshold=tau, fill=True)
    else:
        emb = reference_frame_embeddings(m, frames).float()
        torch.testing.assert_close(vlm.family.frame_embeddings(vlm, frames), emb,
                                   atol=1e-6, rtol=1e-6)
        idx, _ = keyframe_select(emb, emb.mean(0), k, threshold=tau, fill=True)
    assert idx.numel() == min(k, t)
    got_idx = vlm.family.keyframe_indices(get_strategy("vilamp", **knobs).config, vlm, frames)
    assert got_idx.tolist() == idx.tolist()
    if selector and k < t:  # the selection matters: not simply the first K / every frame
        assert idx.tolist() != list(range(k))
    ref_vis = reference_tokens(m, frames[idx], m.model.video_qformer.frame_position.weight)
    ref_first, ref_toks = reference_logits(m, ref_vis, 4)
    p = prompt(frames)
    torch.testing.assert_close(vlm.first_token(p, "vilamp", **knobs), ref_first, atol=1e-4,
                               rtol=1e-4)
    assert vlm.last_prefill.frames_encoded == (0 if selector else t) + min(k, t)
    assert vlm.last_prefill.visual_tokens == 4
    assert vlm.generate(p, 4, strategy="vilamp", **knobs)[0].tolist() == ref_toks


def test_vilamp_refuses_kv_budget_and_needs_position_knob_past_the_table() -> None:
    vlm = make_vlm()
    frames = torch.randn(40, 3, 28, 28)
    with pytest.raises(ValueError, match="kv_budget does not apply to the video_llama"):
        vlm.first_token(prompt(frames), "vilamp", kv_budget=64)
    with pytest.raises(ValueError, match="32-row frame-position table"):
        vlm.first_token(prompt(frames), "vilamp", num_keyframes=33)


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"full", "uniform", "video-llama-seed",
                                                            "vilamp"}))
def test_other_strategies_raise_naming_why(name: str) -> None:
    get_strategy("full")  # imports every strategy
    vlm = make_vlm()
    with pytest.raises(NotImplementedError, match=f"strategy '{name}' does not apply to the "
                                                  "video_llama family"):
        vlm.first_token(prompt(torch.randn(8, 3, 28, 28)), name)


def test_7b_config_runs_on_meta() -> None:
    vlm = LongVideoVLM.from_config("video-llama-7b", device="meta", dtype=torch.float16)
    m = vlm.model
    n = sum(p.numel() for p in m.model.language_model.parameters()) + m.lm_head.weight.numel()
    assert n / 1e9 == pytest.approx(6.74, abs=0.01)  # LLaMA/Vicuna-7B
    assert sum(p.numel() for p in m.model.vision_model.parameters()) / 1e9 == \
        pytest.approx(0.99, abs=0.01)  # EVA ViT-g/14 (39 blocks)
    frames = torch.empty(8, 3, 224, 224, device="meta")
    logits = vlm.first_token(prompt(frames))
    assert logits.shape == (1, 32000)
    assert vlm.last_prefill.visual_tokens == 32


def test_memory_benchmark_paths_agree() -> None:
    """benchmarks/video_llama_memory.py's two paths compute the same first token: the
    released-style composition (all frames at once, transformers' Q-Former with K/V and
    scores materialised) = the fused stream (``uniform``, chunked), beyond 32 frames."""
    from benchmarks.video_llama_memory import hf_video_qformer, released_first_token

    vlm = make_vlm("interpolate", vision_chunk_frames=6)
    torch.manual_seed(4)
    p = prompt(torch.randn(45, 3, 28, 28))
    hf = hf_video_qformer(vlm.model.model.video_qformer)
    want = released_first_token(vlm, hf, p)
    got = vlm.first_token(p, "uniform", num_frames=45)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the package's released-style strategy (what the profiler runs) is the same path
    seed = vlm.first_token(p, "video-llama-seed")
    assert vlm.last_prefill.frames_encoded == 45
    torch.testing.assert_close(seed, want, atol=1e-4, rtol=1e-4)
