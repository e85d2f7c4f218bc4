"""Tier 0: ``lvlm-fast profile`` end to end on the tiny config (in-process, one thread)."""

from __future__ import annotations

import csv
import json
import os
import re

import pytest

from lvlm_fast import cli
from lvlm_fast.models.strategies import STRATEGIES
from lvlm_fast.profile.command import registered_strategies

TINY = "tiny-llava-onevision"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


def test_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as ex:
        cli.main(["profile", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--strategies", "--frames", "--dtype", "--measure", "--device",
                "--budget", "--json", "--out-dir", "--csv", "--png", "--no-plot",
                "--stop-above", "--breakdown", "--frames-on-device", "--memory-budget",
                "--vision-chunk-frames", "--prefill-chunk-tokens", "--set", "--model-set"):
        assert opt in out, opt
    assert "llava-onevision-qwen2-7b" in out and "24 GiB and 80 GiB" in out
    assert "qwen2.5-vl-7b" in out and "448 x 448" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "profile" in capsys.readouterr().out


def test_default_arguments_are_the_documented_run() -> None:
    import argparse

    from lvlm_fast.profile import command

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    a = p.parse_args([])
    assert (a.model, a.dtype, a.measure, a.strategies) == ("llava-onevision-qwen2-7b", "bf16",
                                                           False, None)
    assert a.frames == [128, 256, 512, 1024, 2048, 4096, 8192, 10240]
    assert command.DEFAULT_STRATEGY_OVERRIDES["videoxl"] == {"ratio": 16}
    assert set(registered_strategies()) == set(STRATEGIES)
    assert registered_strategies()[:2] == ["full", "uniform"]


def test_measure_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    rc = cli.main(["profile", "--model", TINY, "--measure", "--frames", "4,8", "--json",
                   str(out), "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    # video-llama-seed is the released Video-LLaMA pipeline: noted, not run, on LLaVA
    assert list(data["metadata"]["unsupported"]) == ["video-llama-seed"]
    assert "note: video-llama-seed: not supported on tiny-llava-onevision" in printed
    names = [s for s in registered_strategies() if s != "video-llama-seed"]
    assert sorted((r["strategy"], r["frames"]) for r in rows) == \
        sorted((s, n) for s in names for n in (4, 8))
    for r in rows:
        assert r["simulated"] is False and r["peak_bytes"] > r["weight_bytes"] > 0
        assert isinstance(r["llm_tokens"], int) and r["llm_tokens"] > 0
    assert data["metadata"]["model"] == TINY and data["metadata"]["simulated"] is False
    with open(tmp_path / f"profile_{TINY}.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {int(r["peak_bytes"]) for r in csv_rows} == {r["peak_bytes"] for r in rows}
    with open(tmp_path / f"profile_{TINY}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The table has a line per frame count with one number per strategy; budget lines.
    line8 = next(ln for ln in printed.splitlines() if ln.strip().startswith("8 "))
    assert len(line8.split()) == 1 + len(names)


def test_budget_search_and_crossings_simulated(tmp_path, capsys) -> None:
    from lvlm_fast.profile.memory import Profiler

    prof = Profiler(TINY, dtype="bf16", simulate=True)
    budget = (prof.run("full", 6)["peak_bytes"] + 1) / 2**30
    rc = cli.main(["profile", "--model", TINY, "--strategies", "full,uniform", "--frames",
                   "2,12", "--budget", repr(budget), "--crossings", repr(budget),
                   "--out-dir", str(tmp_path), "--no-plot"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "largest frame count within --budget" in printed
    assert re.search(r"uniform: (>= )?\d+ frames", printed)
    fit = int(printed.split("full: ")[-1].split()[0])
    assert f"full: passes {budget:g} GiB at {fit + 1} frames" in printed
    assert prof.run("full", fit)["peak_bytes"] <= budget * 2**30 < \
        prof.run("full", fit + 1)["peak_bytes"]
    assert not os.path.exists(tmp_path / f"profile_{TINY}.png")


def test_qwen2_5_vl_simulated_every_output(tmp_path, capsys) -> None:
    """--model of the second family: every strategy simulated, the 448 x 448 frame size
    stated, table + CSV + PNG + JSON + --budget + --breakdown as for LLaVA-OneVision."""
    model = "tiny-qwen2.5-vl"
    out = tmp_path / "q.json"
    rc = cli.main(["profile", "--model", model, "--frames", "2,5", "--json", str(out),
                   "--out-dir", str(tmp_path), "--budget", "1", "--breakdown", "2",
                   "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith(f"lvlm-fast profile: {model}, bf16, simulated")
    assert "frames 448x448 (a 448x448 video resized by the qwen2_5_vl family's" in printed
    data = json.loads(out.read_text())
    # strategies without a rule for M-RoPE refuse it (NotImplementedError): noted, no rows
    unsupported = data["metadata"]["unsupported"]
    assert all(why.startswith("NotImplementedError") for why in unsupported.values())
    for s in unsupported:
        assert f"note: {s}: not supported on {model} (NotImplementedError" in printed
    names = [s for s in registered_strategies() if s not in unsupported]
    assert {"full", "uniform", "vilamp", "slowfast", "llamavid", "videoxl",
            "vilamp-seed"} <= set(names)
    assert sorted((r["strategy"], r["frames"]) for r in data["rows"]) == \
        sorted((s, n) for s in names for n in (2, 5))
    assert data["metadata"]["frame_size"] == [448, 448]
    assert data["metadata"]["family"] == "qwen2_5_vl"
    full5 = next(r for r in data["rows"] if (r["strategy"], r["frames"]) == ("full", 5))
    assert full5["visual_tokens"] == 3 * 16 * 16  # 3 temporal patches of 16 x 16 tokens
    with open(tmp_path / f"profile_{model}.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["frame_size"] for r in csv_rows} == {"448x448"}
    assert len(csv_rows) == len(data["rows"])
    with open(tmp_path / f"profile_{model}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "largest frame count within --budget 1 GiB" in printed
    assert printed.count("largest tensors alive at the pass peak") == len(names)
    line5 = next(ln for ln in printed.splitlines() if ln.strip().startswith("5 "))
    assert len(line5.split()) == 1 + len(names)


def test_unsupported_strategy_is_noted_not_fatal(tmp_path, capsys, monkeypatch) -> None:
    """A strategy that raises NotImplementedError on this family (no rule for its
    positions, say) is left out of the table/CSV/plot with a note; the others run."""
    from lvlm_fast.profile.memory import Profiler

    real_run = Profiler.run

    def run(self, strategy, frames, **kw):
        if strategy == "llamavid":
            raise NotImplementedError("llamavid: no rule for this family (test)")
        return real_run(self, strategy, frames, **kw)

    monkeypatch.setattr(Profiler, "run", run)
    out = tmp_path / "u.json"
    rc = cli.main(["profile", "--model", TINY, "--strategies", "full,llamavid", "--frames",
                   "2,3", "--json", str(out), "--out-dir", str(tmp_path), "--no-plot",
                   "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "note: llamavid: not supported on tiny-llava-onevision (NotImplementedError: " \
           "llamavid: no rule for this family (test))" in printed
    header = next(ln for ln in printed.splitlines() if ln.strip().startswith("peak"))
    assert header.split()[2:] == ["full"]
    data = json.loads(out.read_text())
    assert {r["strategy"] for r in data["rows"]} == {"full"}
    assert list(data["metadata"]["unsupported"]) == ["llamavid"]
    # nothing runs at all: a clear error
    rc = cli.main(["profile", "--model", TINY, "--strategies", "llamavid", "--frames", "2",
                   "--out-dir", str(tmp_path), "--no-plot", "--quiet"])
    assert rc == 2
    assert "no selected strategy runs on tiny-llava-onevision" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--strategies", "full,nope"], r"unknown strategy 'nope'; available: full, uniform"),
    (["--model", "llava-13b"], r"unknown model config 'llava-13b'; shipped configs: "),
    (["--budget", "0.0001"], r"--budget 0.0001 GiB is too small for strategy 'full': one "
                             r"frame .* already needs \d+\.\d+ GiB"),
    (["--set", "full.x"], r"--set expects STRATEGY.KNOB=VALUE"),
    (["--set", "nope.ratio=3"], r"--set names unknown strategy 'nope'"),
    (["--model-set", "position"], r"--model-set expects KEY=VALUE"),
    (["--model-set", "nope=1"], r"model config has no 'nope'"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, match) -> None:
    base = ["profile", "--model", TINY, "--strategies", "full", "--frames", "2",
            "--out-dir", str(tmp_path), "--no-plot", "--quiet"]
    rc = cli.main(base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lvlm-fast profile: error: ")
    assert re.search(match, err), err


def test_video_llama_profile(tmp_path, capsys) -> None:
    """Video-LLaMA: released-style (video-llama-seed) vs fused stream (uniform over every
    frame) past the 32-row frame table, with the profile's position="interpolate" default
    stated; --model-set overrides it (position="error" fails like the released model)."""
    from lvlm_fast.profile import command

    assert command.FAMILY_PROFILE_DEFAULTS["video_llama"]["frames"][::7] == (8, 10240)
    model = "tiny-video-llama"
    out = tmp_path / "v.json"
    rc = cli.main(["profile", "--model", model, "--frames", "8,40", "--json", str(out),
                   "--out-dir", str(tmp_path), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "model config: video_qformer.position=interpolate (the video_llama profile's " \
           "default; --model-set video_qformer.position=... to change)" in printed
    assert "strategy knobs: uniform: num_frames=40" in printed
    header = next(ln for ln in printed.splitlines() if ln.strip().startswith("peak"))
    assert header.split()[2:] == ["full", "uniform", "video-llama-seed"]
    assert "not supported" not in printed  # only the family's strategies by default
    data = json.loads(out.read_text())
    assert data["metadata"]["model_overrides"] == {"video_qformer.position": "interpolate"}
    assert data["metadata"]["stop_above_gib"] is None
    rows = {(r["strategy"], r["frames"]): r for r in data["rows"]}
    assert set(rows) == {(s, n) for s in ("full", "uniform", "video-llama-seed") for n in (8, 40)}
    assert rows[("full", 40)]["frames_encoded"] == 8  # the released 8 frames
    assert rows[("uniform", 40)]["frames_encoded"] == rows[("video-llama-seed", 40)][
        "frames_encoded"] == 40
    with open(tmp_path / f"profile_{model}.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    with open(tmp_path / f"profile_{model}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the position rule from the CLI: "error" is the released behaviour past 32 frames
    rc = cli.main(["profile", "--model", model, "--frames", "40", "--strategies",
                   "video-llama-seed", "--model-set", "video_qformer.position=error",
                   "--out-dir", str(tmp_path), "--no-plot", "--quiet"])
    assert rc == 2
    assert "40 frames exceed the 32-row frame-position table" in capsys.readouterr().err
    rc = cli.main(["profile", "--model", model, "--frames", "40", "--strategies", "uniform",
                   "--model-set", "video_qformer.position=clamp", "--out-dir", str(tmp_path),
                   "--no-plot", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "model config: video_qformer.position=clamp\n" in printed


def test_measure_refuses_a_model_that_cannot_fit(capsys) -> None:
    rc = cli.main(["profile", "--measure", "--strategies", "full", "--frames", "2"])
    assert rc == 2
    assert "drop --measure to simulate" in capsys.readouterr().err


def test_bad_frames_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as ex:
        cli.main(["profile", "--frames", "4,-1"])
    assert ex.value.code == 2
    assert "frame counts must be positive" in capsys.readouterr().err
