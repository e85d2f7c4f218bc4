"""The profile PNG with the ``stream`` line beside the other strategies (issue 12).

Merges the committed default profile (``benchmarks/results/profile_llava-onevision-qwen2-7b.json``:
every other strategy, 128 ... 10,240 frames) with the committed ``stream`` profile
(``profile_stream_llava-onevision-qwen2-7b.json``: the same simulated LLaVA-OneVision-7B
bf16 pass, default knobs, 128 ... 100,000 frames, made by
``lvlm-fast profile --strategies stream --no-plot --frames
128,256,512,1000,1024,2048,4096,8192,10240,100000`` with ``--csv``/``--json`` to those paths)
and draws them with the profiler's own :func:`lvlm_fast.profile.command.write_plot`.
No number is computed here: every point is a row of those two runs.

Run: ``python -m benchmarks.stream_profile_plot`` ->
``benchmarks/results/profile_llava-onevision-qwen2-7b_stream.png``.
"""

from __future__ import annotations

import json
import os

from lvlm_fast.profile.command import registered_strategies, write_plot

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BASE = os.path.join(RESULTS, "profile_llava-onevision-qwen2-7b.json")
STREAM = os.path.join(RESULTS, "profile_stream_llava-onevision-qwen2-7b.json")
OUT = os.path.join(RESULTS, "profile_llava-onevision-qwen2-7b_stream.png")


def main() -> None:
    with open(BASE) as f:
        base = [r for r in json.load(f)["rows"] if r["strategy"] != "stream"]
    with open(STREAM) as f:
        stream = [r for r in json.load(f)["rows"] if r["strategy"] == "stream"]
    rows = base + stream
    names = [s for s in registered_strategies() if any(r["strategy"] == s for r in rows)]
    write_plot(OUT, rows, names,
               title="llava-onevision-qwen2-7b bf16, simulated peak, video in -> first token "
                     "(stream: kv_budget 6144)")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
