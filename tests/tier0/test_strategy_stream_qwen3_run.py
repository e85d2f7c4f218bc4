"""``lvlm-fast run --strategy stream`` (and ``--set kv_budget=`` on a reduction) on a tiny
random Qwen3.5 checkpoint folder (the hybrid decoder, the processor's timestamps tokenized
with the folder's tokenizer): the CLI's answer equals the shared pipeline's with the same
knobs, and the budget compacted the cache (issue 12 on the Qwen3 families, end to end)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")
from test_family_qwen3_5_run import files  # noqa: F401  (the checkpoint fixture)

from lvlm_fast.cli import main
from lvlm_fast.models.pipeline import VideoQA

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py


@pytest.mark.parametrize("strategy,knobs", [
    ("stream", dict(kv_budget=60, window_frames=1, recent_frames=1)),
    ("llamavid", dict(kv_budget=38))])  # the chat template's prefix is 33 tokens
def test_lvlm_fast_run_stream_end_to_end(files, capsys, strategy, knobs):  # noqa: F811
    out = files / f"s_{strategy}.json"
    sets = [a for k, v in knobs.items() for a in ("--set", f"{k}={v}")]
    code = main(["run", str(files / "v.mp4"), "--model", str(files / "ck"), "--question",
                 "w5 w7", "--strategy", strategy, *sets, "--frames", "5",
                 "--max-new-tokens", "3", "--prefill-chunk", "6", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["family"] == "qwen3_5"
    qa = VideoQA.load(files / "ck", strategy, dict(knobs), prefill_chunk_tokens=6)
    rep = qa.answer(qa.read(files / "v.mp4", frames=5), "w5 w7", max_new_tokens=3)
    assert r["answer_ids"] == rep["answer_ids"] and r["llm_tokens"] == rep["llm_tokens"]
    cache = qa.vlm.last_prefill.cache
    assert cache.compactions >= 1
    assert cache.capacity < r["llm_tokens"]  # the cache holds fewer rows than the prompt
