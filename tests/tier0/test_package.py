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


def _run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "tests",
                                                                          "run_all.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_run_all_counts_real_pytest_junit(tmp_path):
    """junit_counts reads what pytest actually writes: pass, fail, error, skip, xfail."""
    ra = _run_all()
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert False\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError\n"
        "def test_d(broken): pass\n"
        "@pytest.mark.skip\n"
        "def test_e(): pass\n"
        "@pytest.mark.xfail\n"
        "def test_f(): assert False\n")
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={xml}", str(tmp_path / "test_x.py")], capture_output=True,
                   cwd=tmp_path)
    # errors (fixture crash) count as failed, xfail as skipped (pytest's own junit mapping)
    assert ra.junit_counts(str(xml)) == ra.Counts(passed=2, failed=2, skipped=2)


def test_run_all_ends_with_one_total_line():
    ra = _run_all()
    counts = {"tier0": ra.Counts(10, 0, 1), "tier1": ra.Counts(5, 1, 0),
              "tier3": ra.Counts(0, 0, 60), "compat": ra.Counts(7, 0, 2)}
    lines = ra.summary_lines({"ruff": True, "tier0": True, "tier1": False, "tier3": True,
                              "compat": True}, counts)
    assert lines[-1] == "total: 22 passed, 1 failed, 63 skipped"
    assert re.fullmatch(r"(\w+: )?\d+ passed, \d+ failed, \d+ skipped", lines[-1])
    # no earlier closing line may look like a pytest result line
    assert not any(re.search(r"\d+ passed", ln) for ln in lines[:-1])


def test_run_all_missing_report_is_a_failure(tmp_path):
    """A pytest stage that dies before writing its report is counted, never dropped."""
    ra = _run_all()
    counts = {}
    ok = ra._pytest("boom", sys.executable, ["-c", "raise SystemExit(3)"], str(tmp_path),
                    counts)
    assert not ok and counts["boom"] == ra.Counts(failed=1)


def test_run_all_model_tests_cover_transformers_users():
    ra = _run_all()
    files = ra.model_test_files()
    for name in ("test_models_wrapper.py", "test_summary_cache.py", "test_compat.py",
                 "test_strategy_videoxl.py", "test_profile_memory.py", "test_cli_run.py"):
        assert f"tests/tier0/{name}" in files, name
    assert "tests/tier0/test_diff_weighted_pool.py" not in files
    # every tier-0 file that names transformers is in the list
    d = os.path.join(ROOT, "tests", "tier0")
    for name in os.listdir(d):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(d, name)) as f:
                if "transformers" in f.read():
                    assert f"tests/tier0/{name}" in files, name


def test_transformers_range_is_declared_once_and_tested_at_both_ends():
    """pyproject declares `transformers>=LOW,<5.40` (models and test extras alike); the
    Makefile's compat venv is built at exactly LOW; `make test` upgrades to the newest
    release in the range; .ci/run hands the compat venv to the test run before `make test`."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        specs = set(re.findall(r'"(transformers[^"]*)"', f.read()))
    assert len(specs) == 1, specs
    spec = specs.pop()
    m = re.fullmatch(r"transformers>=(\d+\.\d+\.\d+),<5\.40", spec)
    assert m, spec
    low = m.group(1)
    r = subprocess.run(["make", "-s", "-n", "compat-venv"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f'"transformers=={low}"' in r.stdout and f"venv-tf-{low}/bin/python" in r.stdout
    r = subprocess.run(["make", "-n", "install-test"], capture_output=True, text=True, cwd=ROOT)
    assert f'pip install -q -U "{spec}"' in r.stdout, r.stdout
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    venv = [i for i, ln in enumerate(ci) if "make -s compat-venv" in ln and
            "LVLM_FAST_COMPAT_PYTHON" in ln]
    assert venv and "export LVLM_FAST_COMPAT_PYTHON" in ci and venv[0] < ci.index("make test")
