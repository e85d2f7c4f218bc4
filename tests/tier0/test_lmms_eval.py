"""The lmms-eval model `lvlm_fast`: registration through lmms-eval's entry-point group,
model_args, generate_until / loglikelihood on every family, the continuation score against
a plain transformers forward on the same input embeddings, and lmms-eval's own CLI run in
one process and under `accelerate launch --num_processes 2` (gloo) on a local task (YAML +
JSON of generated videos) giving the same samples."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")
pytest.importorskip("accelerate")
pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance
from tiny_assets import accelerate_cmd, save_checkpoint, subprocess_env, write_videos

from lvlm_fast.integrations.lmms_eval import LvlmFast
from lvlm_fast.models.pipeline import VideoQA, score_continuation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tier0/conftest.py

TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
'''

QA_YAML = """task: tiny_video_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  until: ["w200"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """task: tiny_video_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmms")
    save_checkpoint(d / "ckpt", "llava")
    videos = write_videos(d, 2)
    docs = [{"video": videos[i % 2], "question": f"w{5 + i} w7",
             "choices": ["w3", "w9 w4", "w11"], "label": i % 3, "answer": "w3"}
            for i in range(4)]
    task = d / "task"
    task.mkdir()
    (task / "data.json").write_text(json.dumps(docs))
    (task / "utils.py").write_text(TASK_UTILS)
    (task / "tiny_video_qa.yaml").write_text(QA_YAML.format(data=task / "data.json"))
    (task / "tiny_video_mc.yaml").write_text(MC_YAML.format(data=task / "data.json"))
    return d


# ------------------------------------------------------------------ registration, args
def test_registered_through_entry_point_group():
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert eps["lvlm_fast"].value == "lvlm_fast.integrations:lmms_eval_manifest"
    from lmms_eval.models import get_model

    assert get_model("lvlm_fast") is LvlmFast  # resolved by lmms-eval's own registry


@pytest.mark.parametrize("args, exc, match", [
    ("strategy=videoxl,nope=1", TypeError, "nope"),
    ("strategy=nope", ValueError, "unknown strategy 'nope'"),
    ("frames=4,fps=2", ValueError, "frames and fps are exclusive"),
    ("frames=0", ValueError, "frames must be an int >= 1"),
    ("device_map=auto", ValueError, "device_map='auto' is not supported"),
    ("max_new_tokens=0", ValueError, "max_new_tokens"),
    ("batch_size=2", ValueError, "batch_size must be 1"),
])
def test_bad_model_args(assets, args, exc, match):
    with pytest.raises(exc, match=match):
        LvlmFast.create_from_arg_string(f"pretrained={assets / 'ckpt'},{args}")


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LvlmFast.create_from_arg_string("pretrained=/nowhere/ckpt")


# ------------------------------------------------------------------ requests, every family
def _requests(lm, video, kind):
    doc = {"video": video, "choices": ["w3", "w9 w4"]}
    lm.task_dict = {"t": {"test": {0: doc}}}
    vis = lambda d: [d["video"]]
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    if kind == "generate_until":
        return [Instance("generate_until", ("w5 w7", {"max_new_tokens": 3, "until": []}, vis,
                                            0, "t", "test"), idx=0, metadata=meta)]
    return [Instance("loglikelihood", ("w5 w7", f" {c}", vis, 0, "t", "test"), idx=i,
                     metadata=meta) for i, c in enumerate(doc["choices"])]


@pytest.mark.parametrize("family", ["llava", "qwen", "qwen3", "qwen3.5"])
def test_requests_on_every_family(tmp_path, family):
    ckpt = save_checkpoint(tmp_path / "ckpt", family)
    (video,) = write_videos(tmp_path, 1)
    lm = LvlmFast.create_from_arg_string(
        f"pretrained={ckpt},strategy=uniform,num_frames=2,frames=4,max_new_tokens=5")
    (gen,) = lm.generate_until(_requests(lm, video, "generate_until"))
    qa = lm.qa
    frames = qa.read(video, frames=4)
    ref = qa.answer(frames, "w5 w7", max_new_tokens=3)  # the task's max_new_tokens wins
    assert gen.text == ref["answer"]
    st = gen.token_counts.to_dict()
    assert st["input_tokens"] == ref["llm_tokens"] and st["output_tokens"] <= 3
    info = st["lvlm_fast"]
    assert info["frames_read"] == 4 and info["frames_encoded"] == 2  # uniform: 2 of 4
    assert info["peak_bytes"] > 0 and info["seconds"]["prefill"] > 0
    assert info["video_reused"] is False and info["process"] == 0
    lls = lm.loglikelihood(_requests(lm, video, "loglikelihood"))
    for res, cont in zip(lls, ["w3", "w9 w4"], strict=True):
        logp, greedy = res.text
        ref = qa.score(frames, "w5 w7", f" {cont}")
        assert logp == pytest.approx(ref["logprob"], abs=1e-5) and greedy == ref["is_greedy"]
        n = len(qa.tokenizer(f" {cont}", add_special_tokens=False)["input_ids"])
        assert logp < 0 and res.token_counts.output_tokens == n
    assert lls[1].token_counts.lvlm_fast["video_reused"] is True  # decoded once per video
    assert lls[1].token_counts.lvlm_fast["seconds"]["decode video"] == 0.0


# ------------------------------------------------------------------ scoring vs transformers
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_score_continuation_equals_plain_forward(tmp_path, family):
    """log p(continuation) from the wrapper's chunked prefill + cache equals one plain
    transformers decoder forward over the same full input embeddings."""
    ckpt = save_checkpoint(tmp_path / "ckpt", family)
    (video,) = write_videos(tmp_path, 1)
    qa = VideoQA.load(ckpt, "full", prefill_chunk_tokens=7)  # chunks cut inside segments
    vlm = qa.vlm
    frames = qa.read(video, frames=4)
    prompt = qa.prompt(frames, "w5 w7")
    cont = torch.tensor([[9, 4, 11, 30]])
    logp, greedy = score_continuation(vlm, prompt, cont)
    res = vlm.last_prefill
    fam = vlm.family
    with torch.no_grad():
        feats = fam.pool(fam.encode(frames.pixels))
        visual = torch.cat([feats.reshape(-1, feats.shape[-1]), fam.end_tokens()])
        assert visual.shape[0] == res.visual_tokens
        embeds = torch.cat([vlm.embed_tokens(prompt.prefix_ids), visual[None],
                            vlm.embed_tokens(prompt.question_ids),
                            vlm.embed_tokens(cont[:, :-1])], dim=1)
        total = res.llm_tokens
        kw = {}
        if res.positions is not None:  # M-RoPE: the ids of the prompt, then of the answer
            kw["position_ids"] = torch.cat(
                [res.positions.chunk(0, total)]
                + [res.positions.decode(t) for t in range(cont.shape[1] - 1)], dim=-1)
        h = vlm.language_model(inputs_embeds=embeds, **kw).last_hidden_state
        logits = vlm.model.lm_head(h[0, total - 1:]).float()
    ref = logits.log_softmax(-1).gather(1, cont[0, :, None])[:, 0]
    torch.testing.assert_close(logp, ref, atol=2e-5, rtol=1e-5)
    assert greedy is False or bool((logits.argmax(-1) == cont[0]).all())
    # the greedy continuation is greedy
    best = logits.argmax(-1)[:1].view(1, 1)
    assert score_continuation(vlm, prompt, best)[1] is True


# ------------------------------------------------------------------ lmms-eval CLI, 1 vs 2
def _samples(out_dir: Path, task: str) -> list[dict]:
    (f,) = glob.glob(str(out_dir / "*" / f"*_samples_{task}.jsonl"))
    return sorted((json.loads(x) for x in Path(f).read_text().splitlines() if x.strip()),
                  key=lambda s: s["doc_id"])


def test_lmms_eval_cli_one_process_equals_two_processes(assets):
    base = ["-m", "lmms_eval", "--model", "lvlm_fast", "--model_args",
            f"pretrained={assets / 'ckpt'},strategy=full,frames=4",
            "--tasks", "tiny_video_qa,tiny_video_mc", "--include_path", str(assets / "task"),
            "--log_samples", "--output_path"]
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1"}
    one = subprocess.run([sys.executable, *base, str(assets / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = subprocess.run([*accelerate_cmd(2), *base, str(assets / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    for task, n_req in (("tiny_video_qa", 1), ("tiny_video_mc", 3)):
        a, b = _samples(assets / "one", task), _samples(assets / "two", task)
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] == [0, 1, 2, 3]
        for sa, sb in zip(a, b, strict=True):
            assert sa["filtered_resps"] == sb["filtered_resps"]  # sample for sample
            assert len(sa["token_counts"]) == n_req
            for tc in sa["token_counts"] + sb["token_counts"]:
                st = tc["lvlm_fast"]
                assert st["frames_read"] == 4 and st["peak_bytes"] > 0
                assert {"vision", "prefill"} <= set(st["seconds"])
            ia = [tc["input_tokens"] for tc in sa["token_counts"]]
            assert ia == [tc["input_tokens"] for tc in sb["token_counts"]]
        # both processes answered requests in the 2-process run
        assert {tc["lvlm_fast"]["process"] for s in b for tc in s["token_counts"]} == {0, 1}
        assert {tc["lvlm_fast"]["process"] for s in a for tc in s["token_counts"]} == {0}
    res = [json.loads(Path(f).read_text()) for f in
           sorted(glob.glob(str(assets / "one" / "*" / "*_results.json")))
           + sorted(glob.glob(str(assets / "two" / "*" / "*_results.json")))]
    r1, r2 = res[0]["results"], res[1]["results"]
    assert r1["tiny_video_mc"]["acc,none"] == r2["tiny_video_mc"]["acc,none"]
    assert r1["tiny_video_qa"]["exact_match,none"] == r2["tiny_video_qa"]["exact_match,none"]
    assert os.path.isdir(assets / "two")
