"""Tier-2 compile check: every Triton kernel, compiled ahead of time for real GPUs.

Discovers every module in ``kernels/`` (imported as ``lvlm_fast.kernels.<stem>``), reads its
``COMPILE_SPECS`` (one dict per kernel x representative config the launcher picks)::

    {"name": str, "fn": <triton.jit fn>, "signature": {arg: "*fp32" | "i32" | "constexpr" ...},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int,
     "divisible_by_16": [arg, ...]   # optional: args the JIT would mark 16-divisible}

compiles each with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
cc 80 (A100) and 90 (H100) — no GPU needed — and runs ``ptxas -v`` on the emitted PTX to read
registers, spill stores/loads and stack frame. ptxas is the one triton itself would use for
that arch (``triton.backends.nvidia.compiler.get_ptxas``: the bundled ``bin/ptxas`` for
sm_80, the bundled newer ``bin/ptxas-blackwell`` for sm_90a, whose PTX ISA version the older
one rejects), with triton's own flags. The system ``/usr/local/bin/ptxas`` is too old.

Run as a script for the table: ``python tests/tier2/compile_check.py [name-substring ...]``.
Must not run with ``TRITON_INTERPRET=1`` (jit functions are then interpreter objects).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton's warning

ARCHS = (80, 90)
REPO = Path(__file__).resolve().parents[2]


def kernel_stems() -> list[str]:
    """Module stems of every kernel file in ``kernels/`` (the source dir of lvlm_fast.kernels)."""
    import lvlm_fast.kernels as pkg

    dirs = [Path(p) for p in pkg.__path__]
    stems = sorted({f.stem for d in dirs for f in d.glob("*.py") if f.stem != "__init__"})
    return stems


def load_specs(stem: str) -> list[dict]:
    """``COMPILE_SPECS`` of ``lvlm_fast.kernels.<stem>``; raises if missing or empty."""
    mod = importlib.import_module(f"lvlm_fast.kernels.{stem}")
    specs = getattr(mod, "COMPILE_SPECS", None)
    if not specs:
        raise AssertionError(f"kernels/{stem}.py has no (or an empty) COMPILE_SPECS list")
    for s in specs:
        missing = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} - set(s)
        if missing:
            raise AssertionError(f"kernels/{stem}.py spec {s.get('name')!r} lacks {missing}")
    return list(specs)


def all_specs() -> list[tuple[str, dict]]:
    return [(stem, s) for stem in kernel_stems() for s in load_specs(stem)]


@dataclasses.dataclass
class Result:
    module: str
    name: str
    arch: str
    num_warps: int
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0 and self.spill_loads == 0


_PROPS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas(cc: int) -> tuple[str, str]:
    """(ptxas path, --gpu-name) exactly as triton's NVIDIA backend picks them."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        return get_ptxas(cc).path, sm_arch_from_capability(cc)
    except ImportError:  # older triton layouts: the bundled binary
        path = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        return path, f"sm_{cc}"


def parse_ptxas(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack bytes) of the single entry."""
    props = _PROPS.search(log)
    regs = _REGS.search(log)
    if not props or not regs:
        raise ValueError(f"unexpected ptxas -v output:\n{log}")
    stack, st, ld = (int(v) for v in props.groups())
    return int(regs.group(1)), st, ld, stack


def compile_spec(module: str, spec: dict, cc: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(module, spec["name"], f"sm_{cc}", spec["num_warps"])
    try:
        sig = dict(spec["signature"])
        fn = spec["fn"]
        attrs = {}
        for arg in spec.get("divisible_by_16", ()):
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"],
                                        attrs=attrs)
        kern = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": spec["num_warps"],
                                       "num_stages": spec["num_stages"]})
        res.shared = int(kern.metadata.shared)
        ptxas, gpu = _ptxas(cc)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kern.asm["ptx"])
            proc = subprocess.run(
                [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx,
                 "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True, text=True,
            )
        if proc.returncode != 0:
            res.error = f"ptxas failed: {proc.stderr.strip()[:2000]}"
            return res
        res.regs, res.spill_stores, res.spill_loads, res.stack = parse_ptxas(proc.stderr)
    except Exception as e:  # reported as a failed row, the test re-raises the message
        res.error = f"{type(e).__name__}: {str(e)[:2000]}"
    return res


def format_table(rows: list[Result]) -> str:
    head = ("module", "kernel spec", "arch", "warps", "regs", "spill st/ld", "stack", "smem",
            "status")
    lines = [head]
    for r in rows:
        status = "ok" if r.ok else ("ERROR" if r.error else "SPILL")
        lines.append((r.module, r.name, r.arch, str(r.num_warps), str(r.regs),
                      f"{r.spill_stores}/{r.spill_loads}", str(r.stack), str(r.shared),
                      status))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    errors = [f"{r.module}:{r.name} {r.arch}: {r.error}" for r in rows if r.error]
    return "\n".join(out + errors)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the compile check needs real triton.jit functions")
        return 2
    sys.path.insert(0, str(REPO))
    rows = []
    for module, spec in all_specs():
        if argv and not any(a in f"{module}:{spec['name']}" for a in argv):
            continue
        for cc in ARCHS:
            rows.append(compile_spec(module, spec, cc))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True, file=sys.stderr)
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
