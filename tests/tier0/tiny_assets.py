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


FAMILY_CONFIGS = {"llava": "tiny-llava-onevision", "qwen": "tiny-qwen2.5-vl",
                  "qwen3": "tiny-qwen3-vl", "qwen3.5": "tiny-qwen3.5"}


def save_checkpoint(path, family: str = "llava") -> str:
    """A tiny random checkpoint folder of ``family`` (a key of FAMILY_CONFIGS or a shipped
    tiny config name) + tokenizer whose words avoid the multimodal placeholder ids."""
    from lvlm_fast.models import get_config
    from lvlm_fast.models.families import family_for_config

    config = get_config(FAMILY_CONFIGS.get(family, family))
    torch.manual_seed(0)
    model = family_for_config(config).build(config)
    special = [getattr(config, a, None) for a in ("video_token_id", "image_token_id",
                                                  "vision_start_token_id",
                                                  "vision_end_token_id")]
    vocab = min([v for v in special if isinstance(v, int)] + [config.text_config.vocab_size])
    model.eval().save_pretrained(path)
    save_tokenizer(path, vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok("w5", add_special_tokens=False)["input_ids"] != [5]:
        # the model type maps to its own tokenizer class (Qwen3.5: a byte-level BPE), which
        # ignores the word-level file: save that class with a byte alphabet instead
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        b2u = bytes_to_unicode()
        chars = [b2u[b] for b in [*range(32, 127), 10]]
        bpe = {"<|endoftext|>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
        type(tok)(vocab=bpe, merges=[], eos_token="<eos>", unk_token="<|endoftext|>",
                  pad_token="<|endoftext|>").save_pretrained(path)
    if config.model_type != "llava_onevision":  # pixel bounds: a 64x80 video stays ~60 px
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
