"""``lvlm-fast run`` on a tiny random Qwen3-VL checkpoint (tokenizer, preprocessing config)
and a generated video, end to end: the answer equals transformers'
``Qwen3VLForConditionalGeneration.generate`` on the prompt the Qwen3-VL processor writes for
the same sampled frames (its ``<t seconds>`` timestamps from the SOURCE frame indices and
fps, a non-uniform sampling stride included), and the frame timestamps API matches the
processor for any stride."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
from tiny_assets import save_checkpoint, write_videos
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from lvlm_fast.cli import main
from lvlm_fast.models import LongVideoVLM
from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.pipeline import VideoQA

VIDEO, START, END = 251, 252, 253


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3run")
    save_checkpoint(d / "ckpt", "qwen3")
    (video,) = write_videos(d, 1, seed=3)
    return d, video


@pytest.mark.parametrize("strategy,frames", [("full", 5), ("uniform", 8)])
def test_run_equals_transformers_generate(files, capsys, strategy, frames):
    d, video = files
    out_json = d / f"r_{strategy}.json"
    argv = ["run", video, "--model", str(d / "ckpt"), "--question", "w5 w7 w9",
            "--strategy", strategy, "--frames", str(frames), "--max-new-tokens", "4",
            "--prefill-chunk", "7", "--vision-chunk", "2", "--dtype", "float32",
            "--json", str(out_json)]
    if strategy == "uniform":
        argv += ["--set", "num_frames=5"]  # 8 read, 5 kept: a second, uneven sampling
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    rep = json.loads(out_json.read_text())
    # the reference: transformers on the processor's prompt for the frames the run kept
    qa = VideoQA.load(str(d / "ckpt"), "full", {}, dtype=torch.float32)
    fr = qa.read(video, frames=frames)
    idx = list(range(len(fr.indices)))
    if strategy == "uniform":
        idx = torch.linspace(0, len(idx) - 1, 5, dtype=torch.float64).round().long().tolist()
    indices = [fr.indices[i] for i in idx]
    pixels = fr.pixels[idx]
    fam = qa.vlm.family
    pre, post = fam.split_prompt(qa.tokenizer, "w5 w7 w9")
    flat, thw = fam.patchify(pixels)
    t, per = int(thw[0, 0]), int(thw[0, 1] * thw[0, 2]) // 4
    ts = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fr.source_fps, 2)
    ids = list(pre)
    for u in range(t):
        ids += qa.text_ids(f"<{ts[u]:.1f} seconds>") + [START] + [VIDEO] * per + [END]
    ids = torch.tensor([ids + list(post)])
    model = Qwen3VLForConditionalGeneration.from_pretrained(d / "ckpt",
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(input_ids=ids, pixel_values_videos=flat, video_grid_thw=thw,
                              mm_token_type_ids=(ids == VIDEO).int() * 2, max_new_tokens=4,
                              attention_mask=torch.ones_like(ids),  # id 0 is a real token
                              do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eos = qa.tokenizer.eos_token_id
    if eos in want:
        want = want[: want.index(eos)]
    assert rep["answer_ids"] == want
    assert rep["llm_tokens"] == ids.shape[1]
    assert rep["family"] == "qwen3_vl"


def test_frame_times_give_the_processor_timestamps():
    """Non-uniform source indices: TokenBlocks.times (VideoPrompt.frame_times) reproduce
    ``_calculate_timestamps(indices, video_fps)``, where ``i / fps`` would not."""
    vlm = LongVideoVLM.from_config("tiny-qwen3-vl")
    indices, src_fps = [0, 2, 5, 7, 9], 10.0
    ts = Qwen3VLProcessor._calculate_timestamps(None, list(indices), src_fps, 2)
    got = []
    blocks = TokenBlocks.grid(3, 1, 1, frame_hw=(64, 64), fps=5.0, num_frames=5,
                              times=[i / src_fps for i in indices])
    layout = vlm.family.visual_layout(blocks, 3, text_ids=lambda s: got.append(s) or [3])
    assert layout.length == 3 * (1 + 1 + 1 + 1)
    assert got == [f"<{x:.1f} seconds>" for x in ts]
    assert got[1] != "<0.5 seconds>"  # what frame i at i / fps (5 fps) would give: 0.5
