"""Tier 3: the frame buffer of ``lvlm-fast run`` is page-locked exactly (cudaHostRegister),
not rounded up to a power of two by the pinned caching allocator (issue 9.15), uploads from
it are asynchronous and correct, and the run report states the pinned bytes. Skips cleanly
without a GPU."""

from __future__ import annotations

import pytest
import torch

from lvlm_fast import video

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_registered_buffer_is_pinned_exactly_and_uploads():
    shape = (300, 3, 384, 384)  # 265 MB in bf16: the caching allocator would lock 512 MiB
    with video.HostFrameBuffer(shape, torch.bfloat16, pin=True) as buf:
        assert buf.pin_method == "cudaHostRegister", buf.pin_method
        assert buf.tensor.is_pinned()
        nbytes = buf.nbytes
        assert nbytes <= buf.pinned_bytes < nbytes + 2 * video.page_size()
        assert video.caching_allocator_pinned_bytes(nbytes) == 2**29
        buf.tensor.copy_(torch.randn(shape).to(torch.bfloat16))
        dev = buf.tensor[100:164].to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), buf.tensor[100:164])
    assert not buf.tensor.is_pinned()  # unregistered on exit


def test_run_report_states_pinned_bytes(tmp_path, capsys):
    pytest.importorskip("av")
    import json

    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

    from lvlm_fast.cli import main
    from lvlm_fast.models import get_config

    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision")).save_pretrained(
        tmp_path / "ckpt")
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 254)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    video.write_video(str(tmp_path / "v.mp4"),
                      rng.integers(0, 255, (12, 64, 80, 3), dtype=np.uint8))
    code = main(["run", str(tmp_path / "v.mp4"), "--model", str(tmp_path / "ckpt"),
                 "--question", "w3", "--frames", 8, "--max-new-tokens", 2, "--device", "cuda",
                 "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["frames_pin_method"] == "cudaHostRegister"
    assert r["frames_host_bytes"] <= r["frames_pinned_bytes"] \
        < r["frames_host_bytes"] + 2 * video.page_size()
    assert "pinned" in out and "(cudaHostRegister)" in out
    assert r["sync_timings"] is False
