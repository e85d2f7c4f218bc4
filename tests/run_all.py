#!/usr/bin/env python3
"""Run every test tier, each in its own process (README's test command runs this).

tier 0  CPU: reference vs C++ kernels, opcheck, gradcheck, meta, torch.compile, bad input
tier 1  Triton kernels in the interpreter (TRITON_INTERPRET=1 must be set before import)
tier 2  Triton kernels compiled ahead of time for sm_80 and sm_90; spills fail
tier 3  CUDA numerics and speed (skip cleanly without a GPU)
compat  only when ``LVLM_FAST_COMPAT_PYTHON`` names another interpreter (``.ci/run`` sets it
        to a venv with the OLDEST supported transformers): the tier-0 model tests, run by
        that interpreter against this source tree.
Also: ruff. Exit code is non-zero if any stage fails.

Each pytest stage writes a JUnit XML report; the run ends with ONE line summing all of them,
``total: N passed, N failed, N skipped``, as the very last line printed, so a reader (or a
tool reading the last test line) sees what ran, not tier 3's all-skipped line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tier-0 file is a "model test" (run again against the oldest supported transformers) when
# it touches transformers directly or through the package modules that import it.
_MODEL_TEST_RE = re.compile(r"\btransformers\b|lvlm_fast\.(models|cache)\b|"
                            r"lvlm_fast\.profile\.(memory|command)\b|"
                            r"from lvlm_fast import [^\n]*\b(models|cache)\b")


@dataclass(frozen=True)
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.passed + other.passed, self.failed + other.failed,
                      self.skipped + other.skipped)

    def line(self, prefix: str = "total") -> str:
        return f"{prefix}: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def junit_counts(path: str) -> Counts:
    """Counts from a pytest ``--junitxml`` report (errors count as failures)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = Counts()
    for s in suites:
        tests, skipped = int(s.get("tests", 0)), int(s.get("skipped", 0))
        failed = int(s.get("failures", 0)) + int(s.get("errors", 0))
        total += Counts(tests - failed - skipped, failed, skipped)
    return total


def model_test_files(root: str = ROOT) -> list[str]:
    """tier-0 test files that exercise transformers (see ``_MODEL_TEST_RE``), sorted."""
    d = os.path.join(root, "tests", "tier0")
    out = []
    for name in sorted(os.listdir(d)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(d, name)) as f:
                if _MODEL_TEST_RE.search(f.read()):
                    out.append(f"tests/tier0/{name}")
    return out


def _run(name: str, cmd: list[str], env: dict[str, str] | None = None) -> bool:
    full_env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1", **(env or {})}
    if env is None or "TRITON_INTERPRET" not in env:
        full_env.pop("TRITON_INTERPRET", None)
    print(f"\n===== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    ok = subprocess.call(cmd, cwd=ROOT, env=full_env) == 0
    print(f"===== {name}: {'PASS' if ok else 'FAIL'} in {time.time() - t0:.0f}s", flush=True)
    return ok


def _pytest(name: str, py: str, args: list[str], report_dir: str, counts: dict[str, Counts],
            env: dict[str, str] | None = None) -> bool:
    xml = os.path.join(report_dir, f"{name}.xml")
    ok = _run(name, [py, "-m", "pytest", "-q", f"--junitxml={xml}", *args], env=env)
    try:
        counts[name] = junit_counts(xml)
    except (OSError, ET.ParseError):
        # pytest died before writing its report (collection crash, killed): the stage
        # counts as one failure, so the total can never read as all-green.
        counts[name] = Counts(failed=1)
        ok = False
    return ok


def main() -> int:
    py = sys.executable
    extra = sys.argv[1:]
    counts: dict[str, Counts] = {}
    with tempfile.TemporaryDirectory(prefix="lvlm-fast-junit-") as rep:
        results = {"ruff": _run("ruff", [py, "-m", "ruff", "check", "."])}
        results["tier0"] = _pytest("tier0", py, ["tests/tier0", *extra], rep, counts)
        results["tier1"] = _pytest("tier1", py, ["tests/tier1", *extra], rep, counts,
                                   env={"TRITON_INTERPRET": "1"})
        results["tier2"] = _pytest("tier2", py, ["tests/tier2", *extra], rep, counts)
        results["tier3"] = _pytest("tier3", py, ["tests/tier3", *extra], rep, counts)
        compat_py = os.environ.get("LVLM_FAST_COMPAT_PYTHON")
        if compat_py:
            # The other interpreter has no install of this package: it imports this tree
            # (and its prebuilt extension, built against the same pinned torch).
            pypath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
            results["compat"] = _pytest(
                "compat", compat_py, ["-p", "no:cacheprovider", *model_test_files(), *extra],
                rep, counts, env={"PYTHONPATH": pypath})
    print("\n" + "\n".join(summary_lines(results, counts)), flush=True)
    return 0 if all(results.values()) else 1


def summary_lines(results: dict[str, bool], counts: dict[str, Counts]) -> list[str]:
    """The closing lines; the LAST is the one total over every pytest stage."""
    return ["summary: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in results.items()),
            "per stage: " + "; ".join(f"{k} {c.passed}/{c.failed}/{c.skipped}"
                                      for k, c in counts.items()) + " (passed/failed/skipped)",
            sum(counts.values(), Counts()).line()]


if __name__ == "__main__":
    sys.exit(main())
