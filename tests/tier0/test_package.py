"""Package-level contract: import is light and never crashes, the C++ fallback warns once,
the README's test command is what CI runs, the CLI answers --help."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd="/")


def test_import_is_light():
    r = _py("import sys, lvlm_fast; bad = [m for m in ('triton', 'transformers') "
            "if m in sys.modules]; print(bad)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, lvlm_fast\n"
        "msgs = [str(x.message) for x in w if 'C++ CPU kernels unavailable' in str(x.message)]\n"
        "print(len(msgs))\n"
        "x = torch.randn(3, 5, 4)\n"
        "print(lvlm_fast.ops.diff_weighted_pool(x, torch.randn(4)).shape)\n"
    )
    r = _py(code, LVLM_FAST_NO_EXT="1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "1"
    assert lines[1] == "torch.Size([3, 4])"


def test_cpu_kernels_are_native_not_fallback():
    r = _py("import warnings; warnings.simplefilter('error', RuntimeWarning); import lvlm_fast")
    assert r.returncode == 0, "C++ kernels failed to load:\n" + r.stderr[-2000:]


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    quick = re.search(r"## Quickstart.*?```(?:bash)?\n(.*?)```", readme, re.S)
    assert quick, "README needs a Quickstart code block"
    cmds = [ln.strip() for ln in quick.group(1).splitlines() if ln.strip() and
            not ln.strip().startswith("#")]
    assert len(cmds) == 2, cmds
    assert cmds[1] in ci.splitlines(), (cmds[1], ci)


def test_cli_help():
    for args in (["--help"], ["bench", "--help"], ["info", "--help"]):
        r = subprocess.run([sys.executable, "-m", "lvlm_fast.cli", *args], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout
        if args[0] == "bench":  # every option the harness accepts is listed
            for opt in ("--device", "--quick", "--op", "--json", "--csv", "--repeats",
                        "--threads", "--gpu-bw", "--cases-dir"):
                assert opt in r.stdout, opt
