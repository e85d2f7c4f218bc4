"""`lvlm-fast run` end to end on a tiny random checkpoint + offline tokenizer saved to a temp
folder and a generated video; --help; bad input (missing/corrupt checkpoint or video,
unknown strategy/knob, too many frames, budget too small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from lvlm_fast.cli import main
from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models import command as cmd
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.video import read_frames, sample_indices, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_FRAMES = 12


def _save_tokenizer(path) -> None:
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 254)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision")).eval()
    model.save_pretrained(d / "ckpt")
    _save_tokenizer(d / "ckpt")
    rng = np.random.default_rng(0)
    write_video(str(d / "v.mp4"), rng.integers(0, 255, (N_FRAMES, 64, 80, 3), dtype=np.uint8))
    return d


def _run(capsys, *argv):
    code = main(["run", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_full_end_to_end_matches_api(files, capsys):
    ckpt, video = files / "ckpt", files / "v.mp4"
    code, out, err = _run(capsys, video, "--model", ckpt, "--question", "w5 w7 w9",
                          "--strategy", "full", "--frames", 5, "--max-new-tokens", 6,
                          "--vision-chunk", 2, "--prefill-chunk", 7,
                          "--json", files / "r.json")
    assert code == 0, err
    answer, _, report = out.partition("\n--\n")
    # the same pipeline through the Python API
    vlm = LongVideoVLM.from_pretrained(ckpt, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    pre_ids, post_ids, template = cmd.build_prompt(tok, "w5 w7 w9")
    assert template == "ChatML"
    idx = sample_indices(N_FRAMES, "uniform", count=5)
    px = torch.empty(5, 3, 56, 56)
    cmd.preprocess(read_frames(str(video), idx), 56,
                   cmd.preprocess_config(str(ckpt), vlm.config.vision_config), px)
    ids = vlm.generate(VideoPrompt(px, torch.tensor([pre_ids]), torch.tensor([post_ids])), 6,
                       eos_token_id=1)[0].tolist()
    if 1 in ids:
        ids = ids[: ids.index(1)]
    assert answer.strip() == tok.decode(ids, skip_special_tokens=True).strip()
    assert answer.strip()  # random model: some words
    llm = len(pre_ids) + 5 * 4 + 1 + len(post_ids)
    assert f"frames read      5 of {N_FRAMES} (5 through the vision tower)" in report
    assert f"LLM tokens       {llm} (21 visual)" in report
    assert "peak memory" in report and "time (s)" in report and "vision" in report
    assert "2 frames / vision chunk, 7 tokens / prefill chunk" in report
    r = json.loads((files / "r.json").read_text())
    assert r["frames_read"] == 5 and r["llm_tokens"] == llm and r["peak_bytes"] > 0
    assert r["preprocess"] == "SigLIP defaults"
    assert set(r["seconds"]) >= {"decode video", "preprocess", "vision", "prefill", "generate"}


def test_run_videoxl_fps_and_knobs(files, capsys):
    code, out, err = _run(capsys, files / "v.mp4", "--model", files / "ckpt", "--question",
                          "w3", "--strategy", "videoxl", "--set", "ratio=4", "--set",
                          "window=8", "--fps", 5, "--max-new-tokens", 2)
    assert code == 0, err
    n_frames = len(sample_indices(N_FRAMES, "fps", fps=5, source_fps=10))
    assert n_frames == 6
    n = n_frames * 4 + 1
    assert f"frames read      {n_frames} of {N_FRAMES}" in out
    assert f"({n + n // 4} visual)" in out
    assert "'ratio': 4, 'window': 8, 'evict': True" in out


def test_preprocess_config_from_checkpoint(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1], "rescale_factor": 0.5}))
    pre = cmd.preprocess_config(str(tmp_path), get_config("tiny-videoxl").vision_config)
    assert pre["image_mean"] == (0.1, 0.2, 0.3) and pre["rescale_factor"] == 0.5
    clip = cmd.preprocess_config(str(tmp_path / "none"), get_config("tiny-videoxl").vision_config)
    assert clip["source"] == "CLIP defaults"
    assert clip["image_mean"][0] == pytest.approx(0.4815, 1e-3)
    out = torch.empty(2, 3, 8, 8)
    cmd.preprocess(torch.full((2, 16, 12, 3), 255, dtype=torch.uint8), 8, pre, out)
    torch.testing.assert_close(out[:, 0], torch.full((2, 8, 8), 127.5 - 0.1))


def test_parse_helpers():
    assert cmd.parse_bytes("2GiB") == 2 * 2**30 and cmd.parse_bytes("1e9") == 10**9
    assert cmd.parse_bytes("512 MiB") == 512 * 2**20
    assert cmd.parse_knob("ratio=8") == ("ratio", 8)
    assert cmd.parse_knob("evict=false") == ("evict", False)


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["run", "--help"])
    assert ex.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--question", "--strategy", "--frames", "--fps", "--set",
                 "--max-new-tokens", "--budget", "--vision-chunk", "--prefill-chunk",
                 "--device", "--dtype", "--json", "VIDEO", "Preprocessing", "Report"):
        assert flag in text, flag


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "no_tokenizer",
                                  "missing_video", "corrupt_video", "unknown_strategy",
                                  "bad_knob", "too_many_frames", "tiny_budget"])
def test_bad_input_clear_errors(files, capsys, tmp_path, case):
    ckpt, video = files / "ckpt", files / "v.mp4"
    extra: list = []
    expect = None
    if case == "missing_ckpt":
        ckpt = tmp_path / "nowhere"
        expect = "nowhere"
    elif case == "corrupt_ckpt":
        bad = tmp_path / "bad"
        bad.mkdir()
        for f in os.listdir(files / "ckpt"):
            data = (files / "ckpt" / f).read_bytes()
            (bad / f).write_bytes(data[:200] if f.endswith(".safetensors") else data)
        ckpt, expect = bad, "cannot load the weights.*bad"
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        for f in os.listdir(files / "ckpt"):
            if not f.startswith("tokenizer"):
                bare.mkdir(exist_ok=True)
                (bare / f).write_bytes((files / "ckpt" / f).read_bytes())
        ckpt, expect = bare, "tokenizer.*bare"
    elif case == "missing_video":
        video, expect = tmp_path / "gone.mp4", "gone.mp4"
    elif case == "corrupt_video":
        video = tmp_path / "junk.mp4"
        video.write_bytes(os.urandom(2000))
        expect = "junk.mp4"
    elif case == "unknown_strategy":
        extra, expect = ["--strategy", "nope"], "unknown strategy 'nope'; available: .*full"
    elif case == "bad_knob":
        extra, expect = ["--strategy", "videoxl", "--set", "nope=1"], "nope"
    elif case == "too_many_frames":
        extra, expect = ["--frames", 50], f"50 frames but the video has {N_FRAMES}"
    elif case == "tiny_budget":
        extra, expect = ["--budget", "10"], "too small .* needs [0-9]+ bytes"
    code, out, err = _run(capsys, video, "--model", ckpt, "--question", "w3",
                          "--max-new-tokens", 1, *extra)
    assert code == 2 and out == ""
    assert err.startswith("lvlm-fast run: error: ")
    import re

    assert re.search(expect, err), err


def test_entry_point_subprocess(files):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "lvlm_fast.cli", "run", str(files / "v.mp4"), "--model",
         str(files / "ckpt"), "--question", "w4 w2", "--strategy", "uniform", "--set",
         "num_frames=3", "--max-new-tokens", "3"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"frames read      {cmd.DEFAULT_FRAMES if N_FRAMES > 32 else N_FRAMES} of" in proc.stdout
    assert "(3 through the vision tower)" in proc.stdout


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


# ------------------------------------------------------------------ issue 9.11-9.15 (run)
def test_run_report_host_frames_timing_mode_and_json(files, capsys):
    code, out, err = _run(capsys, files / "v.mp4", "--model", files / "ckpt", "--question",
                          "w3", "--frames", 4, "--max-new-tokens", 1, "--json",
                          files / "h.json")
    assert code == 0, err
    r = json.loads((files / "h.json").read_text())
    assert r["frames_host_bytes"] == 4 * 3 * 56 * 56 * 4  # fp32 on CPU
    assert r["frames_pinned_bytes"] == 0 and r["frames_pin_method"] == "pageable"
    assert r["sync_timings"] is False and r["warnings"] == []
    assert "host frames      0.1 MiB, pinned 0.0 MiB (pageable)" in out
    assert "warning" not in out


def test_sync_timings_is_opt_in(files, capsys, monkeypatch):
    seen = []
    real = LongVideoVLM.generate

    def spy(self, *a, **k):
        seen.append(self.sync_timings)
        return real(self, *a, **k)

    monkeypatch.setattr(LongVideoVLM, "generate", spy)
    base = [files / "v.mp4", "--model", files / "ckpt", "--question", "w3", "--frames", 2,
            "--max-new-tokens", 1, "--json", files / "s.json"]
    assert _run(capsys, *base)[0] == 0
    assert json.loads((files / "s.json").read_text())["sync_timings"] is False
    assert _run(capsys, *base, "--sync-timings")[0] == 0
    assert json.loads((files / "s.json").read_text())["sync_timings"] is True
    assert seen == [False, True]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--sync-timings" in capsys.readouterr().out


def test_videoxl_short_stream_warning_in_report(files, capsys):
    # 1 frame x 4 tokens + newline = 5 raw tokens < ratio 16: no summary token survives
    with pytest.warns(UserWarning, match="does not depend on the video"):
        code, out, err = _run(capsys, files / "v.mp4", "--model", files / "ckpt",
                              "--question", "w3", "--strategy", "videoxl", "--frames", 1,
                              "--max-new-tokens", 1)
    assert code == 0, err
    assert "warning          videoxl: the video gave 5 raw visual tokens, fewer than " \
           "ratio=16" in out
    assert "does not depend on the video" in out


def test_placeholder_token_in_question_is_a_clear_error(files, capsys, tmp_path):
    # a tokenizer that maps "<video>" to the model's video_token_id (as real LLaVA ones do)
    ckpt = tmp_path / "ph"
    ckpt.mkdir()
    for f in os.listdir(files / "ckpt"):
        if not f.startswith(("tokenizer", "special_tokens")):
            (ckpt / f).write_bytes((files / "ckpt" / f).read_bytes())
    vid = get_config("tiny-llava-onevision").video_token_id
    vocab = {"[UNK]": 0, "<eos>": 1, "<video>": vid, **{f"w{i}": i for i in range(2, 254)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(ckpt)
    code, out, err = _run(capsys, files / "v.mp4", "--model", ckpt, "--question",
                          "w3 <video> w4", "--frames", 2, "--max-new-tokens", 1)
    assert code == 2 and out == ""
    assert err.startswith("lvlm-fast run: error: ")
    assert f"question_ids holds the multimodal placeholder token(s) video_token_id={vid}" in err


# ------------------------------------------------------------------ issue 10.3 (Qwen2.5-VL)
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
QWEN_BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 56 * 112}


def _processor_patches(frames: torch.Tensor, tps: int = 2, patch: int = 14, merge: int = 2):
    """transformers' Qwen2VLVideoProcessor._patchify_video (copied: it needs torchvision,
    absent here): last frame repeated to a multiple of temporal_patch_size, then the
    (t, tps, c, h/m, m, p, w/m, m, p) -> (t, h/m, w/m, m, m, c, tps, p, p) layout."""
    v = frames[None]
    if pad := -v.shape[1] % tps:
        v = torch.cat((v, v[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    b, t, c, h, w = v.shape
    gt, gh, gw = t // tps, h // patch, w // patch
    x = v.view(b, gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(gt * gh * gw, c * tps * patch * patch)
    return x, torch.tensor([[gt, gh, gw]])


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory):
    """A tiny random Qwen2_5_VLForConditionalGeneration + a word-level tokenizer that knows
    the vision start/end/pad tokens and carries a ChatML chat template + a preprocessor
    config with pixel bounds, all saved offline; a 10 fps 72 x 100 video."""
    from tokenizers import AddedToken
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = tmp_path_factory.mktemp("qwen_run")
    cfg = get_config("tiny-qwen2.5-vl")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(d / "ckpt")
    specials = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                "<|vision_start|>": cfg.vision_start_token_id,
                "<|vision_end|>": cfg.vision_end_token_id, "<|im_start|>": 248,
                "<|im_end|>": 249}
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 248)}, **specials}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.chat_template = QWEN_TEMPLATE
    fast.save_pretrained(d / "ckpt")
    (d / "ckpt" / "preprocessor_config.json").write_text(json.dumps(QWEN_BOUNDS))
    rng = np.random.default_rng(1)
    write_video(str(d / "v.mp4"), rng.integers(0, 255, (N_FRAMES, 72, 100, 3), dtype=np.uint8),
                fps=10)
    return d


def _transformers_answer(ckpt, pixels, pre, post, second_per_grid, n_new):
    """transformers' own Qwen2.5-VL generate on the processor's layout: input ids with one
    <|video_pad|> per merged token between vision start/end, the processor's flat patches,
    video_grid_thw and second_per_grid_ts (its M-RoPE temporal step)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    flat, thw = _processor_patches(pixels)
    n_vis = int(thw.prod()) // 4
    ids = torch.tensor([pre + [model.config.video_token_id] * n_vis + post])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         pixel_values_videos=flat, video_grid_thw=thw,
                         second_per_grid_ts=torch.tensor([second_per_grid]),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=1,
                         pad_token_id=0)[0, ids.shape[1]:].tolist()
    return out[: out.index(1)] if 1 in out else out, n_vis


@pytest.mark.parametrize("sampling", [("--frames", 5), ("--fps", 5)])
def test_run_qwen2_5_vl_equals_transformers_generate(qwen_files, capsys, sampling):
    """`lvlm-fast run` on a Qwen2.5-VL checkpoint folder: frames resized as its processor
    does (transformers' smart_resize: multiples of 28 within the folder's min/max pixels),
    normalised with the family's (CLIP) mean/std, prompt = the folder's chat template split
    at the video (prefix ends with <|vision_start|>, question starts with <|vision_end|>),
    M-RoPE temporal step from the sampling rate; the answer equals transformers' generate
    on the processor's layout of the same frames, token for token. The frames are the ones
    transformers' Qwen2VLVideoProcessor.sample_frames picks (run from the installed source,
    see test_family_sampling.py) on the same metadata: --frames 5 is rounded to 4 frames
    (a multiple of temporal_patch_size), --fps 5 gives 6; the temporal step is
    temporal_patch_size / the processor's sampled_fps."""
    from test_family_sampling import QWEN2, processor_sampler, ref_fps

    from lvlm_fast.models.families.qwen2_5_vl import smart_resize

    ckpt, video = qwen_files / "ckpt", qwen_files / "v.mp4"
    flag, value = sampling
    code, out, err = _run(capsys, video, "--model", ckpt, "--question", "w5 w7 w9", flag, value,
                          "--max-new-tokens", 5, "--json", qwen_files / "q.json")
    assert code == 0, err
    r = json.loads((qwen_files / "q.json").read_text())
    # 72 x 100 within [56*56, 56*112] pixels, multiples of 28: transformers' rule
    hw = smart_resize(72, 100, 28, **QWEN_BOUNDS)
    assert tuple(r["frame_size"]) == hw == (56, 84)
    assert r["family"] == "qwen2_5_vl" and r["preprocess"] == "preprocessor_config.json"
    assert r["prompt_template"] == "chat template"
    # the reference: the processor's own sample_frames on (12 frames, 10 fps)
    idx = processor_sampler(QWEN2)(N_FRAMES, 10.0, **{flag[2:].replace("frames", "num_frames"):
                                                       value})
    assert idx == ([0, 3, 6, 9] if flag == "--frames" else [0, 2, 4, 6, 8, 10])
    sample_fps = ref_fps(idx, N_FRAMES, 10.0)
    assert r["frames_read"] == len(idx)
    # the same frames, preprocessed the documented way (bicubic to 56 x 84, CLIP mean/std)
    px = torch.empty(len(idx), 3, *hw)
    fam = LongVideoVLM.from_config("tiny-qwen2.5-vl").family
    cmd.preprocess(read_frames(str(video), idx), hw, fam.preprocessing(str(ckpt)), px)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    pre, post = fam.split_prompt(tok, "w5 w7 w9")
    assert pre[-1] == 252 and post[0] == 253 and post[1:4] == [5, 7, 9]
    ids, n_vis = _transformers_answer(ckpt, px, pre, post, 2 / sample_fps, 5)
    assert r["visual_tokens"] == n_vis == -(-len(idx) // 2) * 2 * 3
    assert r["llm_tokens"] == len(pre) + n_vis + len(post)
    assert r["answer_ids"] == ids and len(ids) > 0
    assert out.partition("\n--\n")[0].strip() == tok.decode(ids, skip_special_tokens=True)


def test_run_qwen2_5_vl_samples_by_its_processor_rule_before_loading(qwen_files, capsys):
    """The pre-load check samples by the checkpoint's family: --frames 13 on a 12-frame
    video is 12 frames for Qwen2.5-VL's processor (round(13 / 2) * 2; the package's rule
    would refuse 13 > 12); --frames 1 rounds to 0 frames: exit 2 naming frames=1."""
    ckpt, video = qwen_files / "ckpt", qwen_files / "v.mp4"
    code, out, err = _run(capsys, video, "--model", ckpt, "--question", "w5", "--frames", 13,
                          "--max-new-tokens", 1)
    assert code == 0, err
    assert f"frames read      {N_FRAMES} of {N_FRAMES}" in out
    code, out, err = _run(capsys, video, "--model", ckpt, "--question", "w5", "--frames", 1,
                          "--max-new-tokens", 1)
    assert code == 2 and out == "" and "frames=1" in err


def test_run_refuses_an_unsupported_model_class(tmp_path, capsys):
    """A checkpoint of a class no family supports: exit 2, TypeError text listing the
    supported classes (before any weights load)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 vocab_size=64)).save_pretrained(ckpt)
    _save_tokenizer(ckpt)
    rng = np.random.default_rng(0)
    write_video(str(tmp_path / "v.mp4"), rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    code, out, err = _run(capsys, tmp_path / "v.mp4", "--model", ckpt, "--question", "w3",
                          "--max-new-tokens", 1)
    assert code == 2 and out == ""
    assert err.startswith("lvlm-fast run: error: ")
    from lvlm_fast.models.families import supported_class_names

    assert "llama" in err and "supported: " + ", ".join(supported_class_names()) in err
    assert {"LlavaOnevisionForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration"} <= set(supported_class_names())
