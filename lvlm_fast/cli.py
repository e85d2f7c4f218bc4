"""``lvlm-fast`` command line.

    lvlm-fast profile [--model M] [--frames N,...] [--budget GIB] [--json OUT]   memory vs frames
    lvlm-fast run VIDEO --model PATH --question "..." [--strategy NAME] [--frames N|--fps F]
    lvlm-fast batch MANIFEST.jsonl --model PATH --out DIR [--strategy NAME] ...  many videos
    lvlm-fast bench [--quick] [--op NAME ...] [--json OUT] [--csv OUT]   microbenchmarks
    lvlm-fast info                                                       kernel status

``lvlm-fast <command> --help`` lists every option of a command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _repo_root() -> str | None:
    """The checkout holding ``benchmarks/`` (benchmarks are repo code, not installed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.getcwd(), os.path.dirname(here)):
        if os.path.isfile(os.path.join(cand, "benchmarks", "run.py")):
            return cand
    return None


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    root = _repo_root()
    if root is None:
        print("lvlm-fast bench: benchmarks/run.py not found; run it from a clone of the "
              "lvlm-fast repository (benchmarks are not part of the installed package).",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.join(root, "benchmarks", "run.py")]
    if args.help:  # the harness's own help lists every option (they all pass through)
        print("lvlm-fast bench: runs benchmarks/run.py of this checkout; its options:\n",
              flush=True)
        return subprocess.call([*cmd, "--help"], cwd=root)
    cmd += ["--device", args.device]
    if args.quick:
        cmd.append("--quick")
    return subprocess.call(cmd + rest, cwd=root)


def _info(_args: argparse.Namespace, _rest: list[str]) -> int:
    import torch

    import lvlm_fast
    from lvlm_fast import _extension

    status = _extension.cpu_kernel_status()
    print(f"lvlm_fast {lvlm_fast.__version__}  torch {torch.__version__}")
    print(f"C++ CPU kernels: {status['loaded']}")
    for name in lvlm_fast.ops.__all__:
        qual = f"lvlm_fast::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"):
            print(f"  {name}: registered")
    for err in status["errors"]:
        print(f"  build error: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lvlm-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    bench = sub.add_parser("bench", help="run the microbenchmark harness (benchmarks/run.py); "
                           "extra flags such as --op/--json/--csv/--repeats pass through",
                           add_help=False)
    bench.add_argument("-h", "--help", action="store_true",
                       help="show benchmarks/run.py's options (all accepted here)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="show which kernels are loaded")
    info.set_defaults(func=_info)
    from lvlm_fast.models import command as _run_cmd

    _run_cmd.add_parser(sub)
    from lvlm_fast import batch as _batch_cmd

    _batch_cmd.add_parser(sub)
    from lvlm_fast.profile import command as _profile_cmd

    profile = sub.add_parser("profile", help="peak memory vs frame count per strategy "
                             "(simulated 7B by default): table, CSV, PNG, --json, --budget",
                             description=_profile_cmd.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _profile_cmd.add_arguments(profile)
    profile.set_defaults(func=lambda a, _rest: _profile_cmd.main(
        a, sys.argv[2:] if argv is None else argv[1:]))
    args, rest = parser.parse_known_args(argv)
    if args.cmd != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
