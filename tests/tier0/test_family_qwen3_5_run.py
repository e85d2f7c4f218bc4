"""Qwen3.5 from a checkpoint folder through the shared video-QA pipeline
(:class:`lvlm_fast.models.pipeline.VideoQA`: the family's frame size within the folder's
pixel bounds, its chat template split, the processor's per-frame timestamp text tokenized
with the folder's tokenizer), on a tiny random checkpoint saved to a temp dir and a
generated video: the answer equals the wrapper's ``generate`` on the same frames and
prompt, and the prompt equals the processor's timestamped layout; ``lvlm-fast run`` on the
folder (``full`` and ``videoxl``) gives the pipeline's answer (issue 11 point 10)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
from transformers import Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from lvlm_fast.cli import main
from lvlm_fast.models import get_config
from lvlm_fast.models.pipeline import VideoQA
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.video import write_video

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py

N_FRAMES = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_5_run")
    torch.manual_seed(0)
    Qwen3_5ForConditionalGeneration(get_config("tiny-qwen3.5")).eval().save_pretrained(d / "ck")
    # transformers maps model_type qwen3_5 to Qwen3_5Tokenizer (byte-level BPE): one token
    # per printable byte, no merges, ids below the placeholder ids (250..253); EOS = 1
    chars = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # + byte-level " ", "\n"
    vocab = {"<|endoftext|>": 1, **{ch: 2 + i for i, ch in enumerate(chars)}}
    Qwen3_5Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>",
                     unk_token="<|endoftext|>", pad_token="<|endoftext|>"
                     ).save_pretrained(d / "ck")
    # pixel bounds so a 64 x 80 video resizes to 64 x 64 (2 x 2 merged tokens per unit)
    with open(os.path.join(d / "ck", "preprocessor_config.json"), "w") as fh:
        json.dump({"min_pixels": 64 * 64, "max_pixels": 64 * 64}, fh)
    rng = np.random.default_rng(0)
    write_video(str(d / "v.mp4"), rng.integers(0, 255, (N_FRAMES, 64, 80, 3), dtype=np.uint8))
    return d


def test_pipeline_answer_equals_generate(files):
    qa = VideoQA.load(files / "ck", "full", prefill_chunk_tokens=5)
    assert qa.family.name == "qwen3_5"
    frames = qa.read(files / "v.mp4", frames=5)
    assert tuple(frames.pixels.shape) == (5, 3, 64, 64)
    rep = qa.answer(frames, "w5 w7", max_new_tokens=3)
    assert rep["frames_encoded"] == 5 and rep["visual_tokens"] == 3 * 4  # 3 units, 2 x 2
    pre, post = qa.family.split_prompt(qa.tokenizer, "w5 w7")
    enc = lambda s: qa.tokenizer(s, add_special_tokens=False)["input_ids"]
    pr = VideoPrompt(frames.pixels, torch.tensor([pre]), torch.tensor([post]),
                     fps=frames.sample_fps, text_ids=enc)
    ids = qa.vlm.generate(pr, 3, eos_token_id=1)[0].tolist()
    if 1 in ids:
        ids = ids[: ids.index(1)]
    assert rep["answer_ids"] == ids
    # the processor's layout: "<t seconds>" + <vs> + 4 pads + <ve> per unit, its timestamps
    ts = Qwen3VLProcessor._calculate_timestamps(None, list(range(5)), frames.sample_fps, 2)
    stamps = sum(len(enc(f"<{t:.1f} seconds>")) + 2 for t in ts)
    assert rep["llm_tokens"] == len(pre) + 12 + stamps + len(post)


@pytest.mark.parametrize("strategy,knobs", [("full", []), ("videoxl", ["--set", "ratio=4",
                                                                     "--set", "window=16"])])
def test_lvlm_fast_run_end_to_end(files, capsys, strategy, knobs):
    """`lvlm-fast run VIDEO --model CKPT` on the Qwen3.5 checkpoint folder: the family's
    frame size, template and timestamps, the hybrid cache; the answer is the pipeline's."""
    out = files / f"r_{strategy}.json"
    code = main(["run", str(files / "v.mp4"), "--model", str(files / "ck"), "--question",
                 "w5 w7", "--strategy", strategy, *knobs, "--frames", "5",
                 "--max-new-tokens", "3", "--prefill-chunk", "6", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["family"] == "qwen3_5" and list(r["frame_size"]) == [64, 64]
    qa = VideoQA.load(files / "ck", strategy, dict(ratio=4, window=16) if knobs else None,
                      prefill_chunk_tokens=6)
    rep = qa.answer(qa.read(files / "v.mp4", frames=5), "w5 w7", max_new_tokens=3)
    assert r["answer_ids"] == rep["answer_ids"] and r["llm_tokens"] == rep["llm_tokens"]
