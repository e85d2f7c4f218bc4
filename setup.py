"""Build: the Python package plus the C++ CPU kernels as ``lvlm_fast._C``.

The extension is built only when torch is importable in the build environment, i.e. with
``pip install --no-build-isolation``. Otherwise (isolated build, no torch) the package
installs without it and ``lvlm_fast._extension`` JIT-compiles the same sources on first use.
Set ``LVLM_FAST_SKIP_EXT=1`` to skip the build explicitly (development: JIT per file).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# `kernels/` is installed as `lvlm_fast.kernels` (a top-level `kernels` is taken on PyPI);
# `csrc/` ships as package data so the JIT fallback can compile it after install.
PACKAGE_DIR = {"lvlm_fast": "lvlm_fast", "lvlm_fast.kernels": "kernels", "lvlm_fast.csrc": "csrc"}
PACKAGES = [
    "lvlm_fast",
    "lvlm_fast.kernels",
    "lvlm_fast.csrc",
    "lvlm_fast.ops",
    "lvlm_fast.reference",
    "lvlm_fast.nn",
    "lvlm_fast.models",
    "lvlm_fast.models.strategies",
    "lvlm_fast.models.families",
    "lvlm_fast.profile",
    "lvlm_fast.integrations",
]


def _extensions():
    if os.environ.get("LVLM_FAST_SKIP_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lvlm-fast: torch not importable at build time; C++ kernels will be JIT-built "
              "on first import (use `pip install --no-build-isolation` to build them now).")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # Portable baseline flags for a wheel: -O3 for the compiler's default target ISA
    # (x86-64 baseline SSE2 / aarch64 baseline; no -march=native), OpenMP threads, C++17.
    # No runtime ISA dispatch (no target_clones / function multiversioning) is compiled in:
    # wider SIMD (AVX2/AVX-512) is not used; that is the separate speed issue's subject.
    ext = CppExtension(
        "lvlm_fast._C",
        sources,
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _package_path(package: str) -> str:
    return PACKAGE_DIR.get(package, package.replace(".", "/"))


ext_modules, cmdclass = _extensions()
setup(
    packages=[p for p in PACKAGES if os.path.isdir(os.path.join(ROOT, _package_path(p)))],
    package_dir=PACKAGE_DIR,
    package_data={"lvlm_fast.csrc": ["*.cpp", "*.h"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
