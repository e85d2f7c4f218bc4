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
