"""`lvlm-fast batch` on tiny random checkpoints and generated videos: one process vs two
under `accelerate launch` (gloo), corrupt/missing videos recorded, resume after a kill,
merge order and summary, device_map refused, bad input; the shared pipeline against
`lvlm-fast run` and on the Qwen2.5-VL family."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("accelerate")

from tiny_assets import (  # tests/tier0 is on sys.path (rootdir-relative conftest)
    N_FRAMES,
    accelerate_cmd,
    save_checkpoint,
    subprocess_env,
    write_videos,
)

from lvlm_fast.cli import main
from lvlm_fast.models.pipeline import VideoQA

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py
ARGS = ["--frames", "4", "--max-new-tokens", "3", "--quiet"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    save_checkpoint(d / "ckpt", "llava")
    write_videos(d, 3)
    (d / "corrupt.mp4").write_bytes(os.urandom(700))
    lines = [{"video": "v0.mp4", "questions": ["w5 w7", "w3"]},
             {"video": "corrupt.mp4", "question": "w4"},
             {"id": "third", "video": str(d / "v1.mp4"), "question": "w9 w2"},
             {"video": "missing.mp4", "question": "w4"},
             {"video": "v2.mp4", "questions": ["w6"]}]
    (d / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def _batch(capsys, *argv) -> tuple[int, str, str]:
    code = main(["batch", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _stable(path) -> list[dict]:
    """results.jsonl without what legitimately differs between runs (times, rank)."""
    out = []
    for r in _jsonl(path):
        r.pop("seconds", None)
        r.pop("rank", None)
        for a in r.get("answers", []):
            a.pop("seconds", None)
        out.append(r)
    return out


def test_one_process_vs_two_processes_gloo(assets, capsys):
    out1 = assets / "out1"
    code, out, err = _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt",
                            "--out", out1, *ARGS)
    assert code == 0, err
    assert "3 of 5 lines answered, 2 failed" in out
    res1 = _stable(out1 / "results.jsonl")
    assert [r["index"] for r in res1] == [0, 1, 2, 3, 4]  # manifest order
    assert [r["id"] for r in res1] == ["0", "1", "third", "3", "4"]
    assert [r["status"] for r in res1] == ["ok", "error", "ok", "error", "ok"]
    assert res1[1]["error_type"] == "VideoReadError" and "corrupt.mp4" in res1[1]["error"]
    assert "video file not found" in res1[3]["error"] and "missing.mp4" in res1[3]["error"]
    assert "corrupt.mp4" in err  # reported as it happens
    ok = res1[0]
    assert ok["frames_read"] == 4 and ok["video_frames"] == N_FRAMES
    assert [a["question"] for a in ok["answers"]] == ["w5 w7", "w3"]
    for a in ok["answers"]:
        assert a["answer_tokens"] == len(a["answer_ids"]) <= 3 and a["peak_bytes"] > 0
        assert a["visual_tokens"] == 4 * 4 + 1  # 4 frames x 2x2 pooled + newline
    s = json.loads((out1 / "summary.json").read_text())
    assert s["lines"] == 5 and s["answered"] == 3 and s["failures"] == 2
    assert [f["id"] for f in s["failed"]] == ["1", "3"]
    assert s["videos_per_hour"] > 0 and s["processes"] == 1 and s["missing"] == []
    assert s["peak_bytes"]["p50"] <= s["peak_bytes"]["p90"] <= s["peak_bytes"]["max"]
    assert s["peak_bytes"]["max"] == max(r["peak_bytes"] for r in res1 if r["status"] == "ok")

    out2 = assets / "out2"
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(
        [*accelerate_cmd(2), "-m", "lvlm_fast.cli", "batch", str(assets / "m.jsonl"),
         "--model", str(assets / "ckpt"), "--out", str(out2), *ARGS],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(os.listdir(out2 / "parts"))
    assert parts == ["rank-0.jsonl", "rank-1.jsonl"]  # both processes did work
    ranks = {r["rank"] for p in parts for r in _jsonl(out2 / "parts" / p)}
    assert ranks == {0, 1}
    assert _stable(out2 / "results.jsonl") == res1  # sample for sample
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["processes"] == 2 and s2["answered"] == 3 and s2["failures"] == 2


def test_batch_answers_equal_lvlm_fast_run(assets, capsys):
    """batch and `lvlm-fast run` give the same answer (the pipelines agree)."""
    out = assets / "out1"
    if not (out / "results.jsonl").exists():
        assert _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt", "--out", out,
                      *ARGS)[0] == 0
    rec = _stable(out / "results.jsonl")[2]
    code = main(["run", str(assets / "v1.mp4"), "--model", str(assets / "ckpt"),
                 "--question", "w9 w2", "--frames", "4", "--max-new-tokens", "3",
                 "--json", str(assets / "run.json")])
    assert code == 0
    capsys.readouterr()
    r = json.loads((assets / "run.json").read_text())
    a = rec["answers"][0]
    assert a["answer"] == r["answer"] and a["answer_ids"] == r["answer_ids"]
    assert a["llm_tokens"] == r["llm_tokens"] and rec["frames_read"] == r["frames_read"]


def test_resume_skips_done_lines_and_redoes_cut_or_failed(assets, capsys):
    out = assets / "resume"
    assert _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt", "--out", out,
                  *ARGS)[0] == 0
    part = out / "parts" / "rank-0.jsonl"
    lines = part.read_text().splitlines()
    assert len(lines) == 5
    # a crash cut the last record mid-write: it is ignored and its line redone
    part.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    code, _, _ = _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt",
                        "--out", out, *ARGS)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["lines_this_run"] == 1 and s["answered_this_run"] == 1 and s["recorded"] == 5
    # nothing left: a rerun does nothing
    _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt", "--out", out, *ARGS)
    assert json.loads((out / "summary.json").read_text())["lines_this_run"] == 0
    # --retry-errors redoes exactly the two failed lines
    _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt", "--out", out, *ARGS,
           "--retry-errors")
    s = json.loads((out / "summary.json").read_text())
    assert s["lines_this_run"] == 2 and s["failures"] == 2 and s["answered_this_run"] == 0


def test_rerun_with_another_configuration_is_refused(assets, capsys, tmp_path):
    out = tmp_path / "o"
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"video": str(assets / "v0.mp4"), "question": "w3"}) + "\n")
    assert _batch(capsys, man, "--model", assets / "ckpt", "--out", out, *ARGS)[0] == 0
    assert json.loads((out / "run_config.json").read_text())["frames"] == 4
    code, out_text, err = _batch(capsys, man, "--model", assets / "ckpt", "--out", out,
                                 "--frames", "2", "--max-new-tokens", "3", "--quiet")
    assert code == 2 and out_text == ""
    assert "holds results of another configuration (frames: 4 there, 2 now)" in err
    # the same options resume (nothing to do)
    assert _batch(capsys, man, "--model", assets / "ckpt", "--out", out, *ARGS)[0] == 0


def test_kill_midway_then_rerun_completes_without_redoing(assets, tmp_path):
    # 6 lines of 2 questions each: the first record lands well before the last
    lines = [{"id": f"L{i}", "video": str(assets / f"v{i % 3}.mp4"),
              "questions": ["w5 w7", "w3 w8"]} for i in range(6)]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lvlm_fast.cli", "batch", str(man), "--model",
           str(assets / "ckpt"), "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = out / "parts" / "rank-0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [json.loads(x)["id"] for x in part.read_text().splitlines()
             if x.strip().endswith("}")]
    assert 1 <= len(first) < 6, first
    assert not (out / "results.jsonl").exists()  # killed before the merge
    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [json.loads(x)["id"] for x in part.read_text().splitlines() if x.strip()]
    assert sorted(ids) == sorted(f"L{i}" for i in range(6))  # each line exactly once
    assert ids[: len(first)] == first
    s = json.loads((out / "summary.json").read_text())
    assert s["lines_this_run"] == 6 - len(first) and s["answered"] == 6
    assert [r["id"] for r in _jsonl(out / "results.jsonl")] == [f"L{i}" for i in range(6)]


def test_device_map_refused(assets, capsys):
    code, out, err = _batch(capsys, assets / "m.jsonl", "--model", assets / "ckpt",
                            "--out", assets / "dm", "--device-map", "auto", *ARGS)
    assert code == 2 and out == ""
    assert err.startswith("lvlm-fast batch: error: --device-map auto: sharding one model")
    assert "accelerate launch" in err
    with pytest.raises(ValueError, match="device_map='auto' is not supported"):
        VideoQA.load(assets / "ckpt", device_map="auto")


@pytest.mark.parametrize("case", ["no_manifest", "dup_id", "bad_knob", "bad_strategy",
                                  "no_model", "bad_frames"])
def test_usage_errors(assets, capsys, tmp_path, case):
    man, extra, expect = assets / "m.jsonl", [], ""
    model = assets / "ckpt"
    if case == "no_manifest":
        man, expect = tmp_path / "nope.jsonl", "manifest not found: .*nope.jsonl"
    elif case == "dup_id":
        man = tmp_path / "d.jsonl"
        man.write_text('{"id": "a", "video": "x.mp4", "question": "w3"}\n' * 2)
        expect = "id 'a' appears more than once"
    elif case == "bad_knob":
        extra, expect = ["--strategy", "videoxl", "--set", "nope=1"], "nope"
    elif case == "bad_strategy":
        extra, expect = ["--strategy", "nope"], "unknown strategy 'nope'"
    elif case == "no_model":
        model, expect = tmp_path / "nowhere", "nowhere"
    elif case == "bad_frames":
        extra, expect = ["--frames", "0"], "frames must be an int >= 1"
    code, out, err = _batch(capsys, man, "--model", model, "--out", tmp_path / "o",
                            "--max-new-tokens", "1", "--quiet", *extra)
    import re

    assert code == 2 and out == "" and err.startswith("lvlm-fast batch: error: ")
    assert re.search(expect, err), err


def test_bad_manifest_line_recorded_not_fatal(assets, capsys, tmp_path):
    man = tmp_path / "m.jsonl"
    man.write_text('{"video": "%s", "question": "w3"}\nnot json\n{"video": "x.mp4"}\n\n'
                   % (assets / "v0.mp4"))
    code, _, _ = _batch(capsys, man, "--model", assets / "ckpt", "--out", tmp_path / "o",
                        *ARGS)
    assert code == 0
    res = _jsonl(tmp_path / "o" / "results.jsonl")
    assert [r["status"] for r in res] == ["ok", "error", "error"]
    assert res[1]["error"].startswith("manifest line 2:")
    assert "needs \"questions\"" in res[2]["error"]


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["batch", "--help"])
    assert ex.value.code == 0
    text = capsys.readouterr().out
    for flag in ("MANIFEST.jsonl", "--model", "--out", "--strategy", "--set", "--frames",
                 "--fps", "--max-new-tokens", "--budget", "--device-map", "--retry-errors",
                 "accelerate launch", "Resume"):
        assert flag in text, flag


def test_pipeline_on_qwen2_5_vl(tmp_path):
    """The shared pipeline on the second family: its frame size (smart resize within the
    checkpoint's pixel bounds), chat-template split and M-RoPE prefill; the answer equals
    the wrapper's generate on the same frames and prompt."""
    ckpt = save_checkpoint(tmp_path / "qwen", "qwen")
    (video,) = write_videos(tmp_path, 1)
    qa = VideoQA.load(ckpt, "full")
    assert qa.family.name.startswith("qwen")
    frames = qa.read(video, frames=4)
    assert tuple(frames.pixels.shape) == (4, 3, 56, 84)
    rep = qa.answer(frames, "w5 w7", max_new_tokens=3)
    assert rep["frames_encoded"] == 4 and rep["visual_tokens"] == 2 * 2 * 3  # 2 units, 2x3
    pre, post = qa.family.split_prompt(qa.tokenizer, "w5 w7")
    from lvlm_fast.models.strategies.base import VideoPrompt

    ids = qa.vlm.generate(VideoPrompt(frames.pixels, torch.tensor([pre]), torch.tensor([post]),
                                      fps=frames.sample_fps), 3, eos_token_id=1)[0].tolist()
    if 1 in ids:
        ids = ids[: ids.index(1)]
    assert rep["answer_ids"] == ids
    assert rep["llm_tokens"] == len(pre) + 12 + len(post)


def test_lvlm_fast_run_shares_the_pipeline_on_qwen2_5_vl(tmp_path, capsys):
    """`lvlm-fast run` goes through the same VideoQA pipeline: on a Qwen2.5-VL checkpoint
    it reads frames at the family's size and gives the batch runner's answer."""
    ckpt = save_checkpoint(tmp_path / "qwen", "qwen")
    (video,) = write_videos(tmp_path, 1)
    code = main(["run", video, "--model", ckpt, "--question", "w5 w7", "--frames", "4",
                 "--max-new-tokens", "3", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["family"] == "qwen2_5_vl" and r["frame_size"] == [56, 84]
    assert r["preprocess"] == "preprocessor_config.json" and r["visual_tokens"] == 12
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": video, "question": "w5 w7"}) + "\n")
    assert _batch(capsys, tmp_path / "m.jsonl", "--model", ckpt, "--out", tmp_path / "o",
                  *ARGS)[0] == 0
    (rec,) = _jsonl(tmp_path / "o" / "results.jsonl")
    assert rec["answers"][0]["answer_ids"] == r["answer_ids"]
    assert rec["answers"][0]["llm_tokens"] == r["llm_tokens"]
