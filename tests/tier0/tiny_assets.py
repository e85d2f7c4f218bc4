"""Offline assets for the batch / lmms-eval tests: tiny random checkpoints of each family
with a word-level tokenizer, and short generated videos (no hub access)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_FRAMES = 8
FRAME_HW = (64, 80)


def save_tokenizer(path, vocab_size: int) -> None:
    """Word-level tokenizer: "w<i>" -> i for 2 <= i < vocab_size, <eos> = 1, [UNK] = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="<eos>").save_pretrained(path)


def save_checkpoint(path, family: str = "llava") -> str:
    """A tiny random checkpoint folder of ``family`` ('llava' or 'qwen') + tokenizer."""
    from lvlm_fast.models import get_config

    torch.manual_seed(0)
    if family == "llava":
        from transformers import LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision"))
        vocab = 250  # below the placeholder ids of the config
    elif family == "qwen":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(get_config("tiny-qwen2.5-vl"))
        vocab = 250  # 250..253 are the image/video/vision start/end ids
    else:
        raise ValueError(family)
    model.eval().save_pretrained(path)
    save_tokenizer(path, vocab)
    if family == "qwen":  # pixel bounds so a 64x80 video resizes to 56x84, not ~300 px
        with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
            json.dump({"min_pixels": 56 * 56, "max_pixels": 56 * 84}, fh)
    return str(path)


def write_videos(folder, n: int, seed: int = 0) -> list[str]:
    from lvlm_fast.video import write_video

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = os.path.join(folder, f"v{i}.mp4")
        write_video(p, rng.integers(0, 255, (N_FRAMES, *FRAME_HW, 3), dtype=np.uint8))
        out.append(p)
    return out


def subprocess_env() -> dict[str, str]:
    """One thread per process (2 shared cores), the source tree importable, offline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def accelerate_cmd(num_processes: int) -> list[str]:
    """``accelerate launch`` of ``num_processes`` CPU processes (torchrun underneath; with
    ACCELERATE_USE_CPU=1 in the env they form a gloo group)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port())]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
