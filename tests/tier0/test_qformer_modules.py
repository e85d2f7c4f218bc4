"""Tier 0: lvlm_fast.nn.VideoQFormer / AudioQFormer vs transformers' Blip2QFormerModel
built from the same random *released-layout* state dict (method facts section 4), the
streaming passes at T = 1,000, the position rule beyond the table, the released-key
loader and its errors."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from lvlm_fast.nn import AudioQFormer, VideoQFormer
from lvlm_fast.nn.qformer import released_to_blip2_qformer

# (hidden, heads, intermediate, layers)
FULL = dict(hidden=768, heads=12, inter=3072, layers=2)
SMALL = dict(hidden=64, heads=4, inter=96, layers=2)


def released_state_dict(branch, *, hidden, heads, inter, layers, enc, nq, rows, llm=None,
                        seed=0):  # fmt: skip
    """A random state dict with the released key names and shapes of one branch."""
    g = torch.Generator().manual_seed(seed)
    p = {"video": "video_Qformer.bert.", "audio": "audio_Qformer.bert."}[branch]

    def r(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    sd = {f"{p}embeddings.LayerNorm.weight": 1 + r(hidden, s=0.1),
          f"{p}embeddings.LayerNorm.bias": r(hidden, s=0.1),
          f"{p}embeddings.position_ids": torch.arange(512)[None]}  # fmt: skip
    for i in range(layers):
        lp = f"{p}encoder.layer.{i}."
        for att, kv in (("attention", hidden), ("crossattention", enc)):
            for n in ("query", "key", "value"):
                width = hidden if n == "query" else kv
                sd[f"{lp}{att}.self.{n}.weight"] = r(hidden, width, s=width**-0.5)
                sd[f"{lp}{att}.self.{n}.bias"] = r(hidden, s=0.1)
            sd[f"{lp}{att}.output.dense.weight"] = r(hidden, hidden, s=hidden**-0.5)
            sd[f"{lp}{att}.output.dense.bias"] = r(hidden, s=0.1)
            sd[f"{lp}{att}.output.LayerNorm.weight"] = 1 + r(hidden, s=0.1)
            sd[f"{lp}{att}.output.LayerNorm.bias"] = r(hidden, s=0.1)
        sd[f"{lp}intermediate_query.dense.weight"] = r(inter, hidden, s=hidden**-0.5)
        sd[f"{lp}intermediate_query.dense.bias"] = r(inter, s=0.1)
        sd[f"{lp}output_query.dense.weight"] = r(hidden, inter, s=inter**-0.5)
        sd[f"{lp}output_query.dense.bias"] = r(hidden, s=0.1)
        sd[f"{lp}output_query.LayerNorm.weight"] = 1 + r(hidden, s=0.1)
        sd[f"{lp}output_query.LayerNorm.bias"] = r(hidden, s=0.1)
    pre = "video" if branch == "video" else "audio"
    sd[f"{pre}_query_tokens"] = r(1, nq, hidden, s=1.0)
    pos_key = ("video_frame_position_embedding.weight" if branch == "video"
               else "audio_position_embedding.weight")  # fmt: skip
    sd[pos_key] = r(rows, enc, s=1.0)
    if llm:
        proj = "llama_proj" if branch == "video" else "audio_llama_proj"
        sd[f"{proj}.weight"] = r(llm, hidden)
        sd[f"{proj}.bias"] = r(llm)
    sd["unrelated.module.weight"] = torch.zeros(3)  # other modules of the checkpoint
    return sd


def hf_qformer(sd, branch, *, hidden, heads, inter, layers, enc):
    """transformers' Blip2QFormerModel configured and loaded as the method facts say."""
    cfg = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=inter,
                             hidden_act="gelu", layer_norm_eps=1e-12,
                             cross_attention_frequency=1, encoder_hidden_size=enc,
                             use_qformer_text_input=False)  # fmt: skip
    cfg._attn_implementation = "eager"
    model = Blip2QFormerModel(cfg).eval()
    mapped = released_to_blip2_qformer(sd, f"{branch}_Qformer.bert.")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "position_ids" not in k], missing
    return model


def hf_forward(hf, sd, branch, frames, pos_rows):
    """The released composition: frames + position rows, flattened, through the Q-Former."""
    q = sd["video_query_tokens" if branch == "video" else "audio_query_tokens"]
    b = frames.shape[0]
    if frames.dim() == 3:
        frames = frames[:, :, None]
    enc = (frames + pos_rows[None, :, None]).reshape(b, -1, frames.shape[-1])
    with torch.no_grad():
        return hf(query_embeds=q.expand(b, -1, -1), encoder_hidden_states=enc).last_hidden_state


def _video_frames(b, t, s, e, seed=1):
    return torch.randn(b, t, s, e, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [1, 8, 32])
def test_video_equals_blip2_qformer(t):
    sd = released_state_dict("video", **FULL, enc=768, nq=32, rows=32, llm=48)
    ours = VideoQFormer.from_released_state_dict(sd, chunk_frames=5).eval()
    hf = hf_qformer(sd, "video", **FULL, enc=768)
    frames = _video_frames(2, t, 32, 768)
    with torch.no_grad():
        out = ours(frames)
    ref = hf_forward(hf, sd, "video", frames, sd["video_frame_position_embedding.weight"][:t])
    assert out.shape == (2, 32, 768)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # llama_proj loaded too
        torch.testing.assert_close(ours.project(out),
                                   out @ sd["llama_proj.weight"].T + sd["llama_proj.bias"])


@pytest.mark.parametrize("t", [1, 3, 8])
def test_audio_equals_blip2_qformer(t):
    sd = released_state_dict("audio", **FULL, enc=1024, nq=8, rows=8)
    ours = AudioQFormer.from_released_state_dict(sd).eval()
    assert ours.llama_proj is None
    hf = hf_qformer(sd, "audio", **FULL, enc=1024)
    clips = torch.randn(1, t, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours(clips)
    ref = hf_forward(hf, sd, "audio", clips, sd["audio_position_embedding.weight"][:t])
    assert out.shape == (1, 8, 768)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ragged_chunk_sequence_equals_whole():
    sd = released_state_dict("video", **SMALL, enc=48, nq=32, rows=32)
    m = VideoQFormer.from_released_state_dict(sd, hidden_size=64, num_heads=4,
                                              intermediate_size=96, encoder_width=48).eval()
    frames = _video_frames(1, 20, 4, 48)
    with torch.no_grad():
        whole = m(frames)
        parts = m([frames[:, :1], frames[:, 1:8], frames[:, 8:19], frames[:, 19:]])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["clamp", "interpolate"])
def test_thousand_frames_equals_reference(position):
    # T = 1,000 (two streaming passes of 64-frame chunks) vs the non-streaming HF model on
    # the whole flattened sequence with the same position rule applied to the table
    sd = released_state_dict("video", **SMALL, enc=48, nq=32, rows=32)
    m = VideoQFormer.from_released_state_dict(
        sd, hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48,
        position=position, chunk_frames=64).eval()  # fmt: skip
    hf = hf_qformer(sd, "video", **SMALL, enc=48)
    t = 1000
    frames = _video_frames(1, t, 4, 48)
    table = sd["video_frame_position_embedding.weight"]
    if position == "clamp":
        rows = table[torch.arange(t).clamp(max=31)]
    else:  # linear resampling of the 32 rows onto 1,000 frames, ends aligned
        rows = torch.nn.functional.interpolate(table.T[None], size=t, mode="linear",
                                               align_corners=True)[0].T  # fmt: skip
    with torch.no_grad():
        out = m(frames)
    torch.testing.assert_close(out, hf_forward(hf, sd, "video", frames, rows),
                               atol=2e-5, rtol=2e-5)  # fmt: skip


def test_audio_thousand_clips_full_width():
    sd = released_state_dict("audio", **FULL, enc=1024, nq=8, rows=8)
    m = AudioQFormer.from_released_state_dict(sd, position="clamp", chunk_frames=300).eval()
    hf = hf_qformer(sd, "audio", **FULL, enc=1024)
    clips = torch.randn(1, 1000, 1024, generator=torch.Generator().manual_seed(3))
    rows = sd["audio_position_embedding.weight"][torch.arange(1000).clamp(max=7)]
    with torch.no_grad():
        out = m(clips)
    torch.testing.assert_close(out, hf_forward(hf, sd, "audio", clips, rows),
                               atol=2e-5, rtol=2e-5)  # fmt: skip


def test_beyond_table_default_is_an_error():
    m = VideoQFormer(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48)
    assert m.position == "error"
    m(_video_frames(1, 32, 2, 48))  # the whole table is fine
    with pytest.raises(ValueError, match="33 frames exceed the 32-row"):
        m(_video_frames(1, 33, 2, 48))
    a = AudioQFormer(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48)
    with pytest.raises(ValueError, match="9 frames exceed the 8-row"):
        a(torch.randn(1, 9, 48))
    # the per-call override and every mode agree inside the table
    x = _video_frames(1, 12, 2, 48)
    with torch.no_grad():
        outs = [m(x, position=p) for p in ("error", "clamp", "interpolate")]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)
    with torch.no_grad():
        m(_video_frames(1, 40, 2, 48), position="clamp")


def test_interpolate_rows_endpoints():
    m = VideoQFormer(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48)
    table = m.frame_position.weight.detach()
    rows = m.position_rows(0, 63, 63, "interpolate").detach()
    torch.testing.assert_close(rows[0], table[0])
    torch.testing.assert_close(rows[-1], table[-1])
    torch.testing.assert_close(rows[2], table[1])  # 62 / 31 = 2 frames per row
    torch.testing.assert_close(rows[1], (table[0] + table[1]) / 2)
    assert torch.equal(m.position_rows(40, 5, 50, "clamp"), table[[31] * 5])


def test_gradients_flow_through_both_passes():
    m = VideoQFormer(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48,
                     chunk_frames=3)  # fmt: skip
    frames = _video_frames(1, 7, 2, 48).requires_grad_(True)
    m(frames).square().sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        if name.startswith("frame_position"):
            assert p.grad[:7].abs().sum() > 0 and p.grad[7:].abs().sum() == 0
        elif "attention.key.bias" not in name:  # key biases shift scores uniformly: grad 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loader_errors_name_the_key(tmp_path):
    sd = released_state_dict("audio", **SMALL, enc=48, nq=8, rows=8)
    kw = dict(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48)
    AudioQFormer.from_released_state_dict(sd, **kw)
    missing = dict(sd)
    del missing["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]
    with pytest.raises(ValueError, match=r"lacks key 'audio_Qformer\.bert\.encoder\.layer\.1\."
                                         r"crossattention\.self\.key\.weight'"):
        AudioQFormer.from_released_state_dict(missing, **kw)
    bad = dict(sd)
    bad["audio_position_embedding.weight"] = torch.zeros(8, 47)
    with pytest.raises(ValueError, match=r"'audio_position_embedding\.weight' has shape "
                                         r"\(8, 47\), expected \(8, 48\)"):
        AudioQFormer.from_released_state_dict(bad, **kw)
    with pytest.raises(ValueError, match="lacks key 'video_query_tokens'"):  # video on audio
        VideoQFormer.from_released_state_dict(sd, **kw)
    path = tmp_path / "al.pth"
    torch.save({"model": sd}, path)
    m = AudioQFormer.from_released_checkpoint(str(path), **kw)
    torch.testing.assert_close(m.query_tokens.detach(), sd["audio_query_tokens"])


def test_bad_frames_and_knobs():
    m = VideoQFormer(hidden_size=64, num_heads=4, intermediate_size=96, encoder_width=48)
    with pytest.raises(ValueError, match=r"frames must be \(B, T, S, 48\)"):
        m(torch.randn(1, 3, 2, 47))
    with pytest.raises(ValueError, match=r"frames\[1\] has shape"):
        m([torch.randn(1, 3, 2, 48), torch.randn(1, 3, 5, 48)])
    with pytest.raises(TypeError, match="frames must be a tensor"):
        m([])
    with pytest.raises(ValueError, match="position must be one of"):
        m(torch.randn(1, 3, 2, 48), position="wrap")
    with pytest.raises(ValueError, match="position must be one of"):
        VideoQFormer(position="nearest")
    with pytest.raises(ValueError, match="no llama_proj"):
        m.project(torch.randn(1, 32, 64))
