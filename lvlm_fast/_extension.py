"""Locate and load the C++ CPU kernels.

Order: the prebuilt ``lvlm_fast._C`` (from ``pip install --no-build-isolation``), else a
JIT build of ``csrc/*.cpp`` with ninja (one module per source file, so one broken kernel
does not take the others down), else nothing. Ops whose CPU kernel is missing fall back to
their plain-PyTorch reference; :func:`register_cpu_fallbacks` says so in ONE warning.
``LVLM_FAST_JIT=1`` forces the JIT path (development); ``LVLM_FAST_NO_EXT=1`` skips C++.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

_STATE: dict[str, object] = {"loaded": None, "errors": []}


def _csrc_dir() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(cand, "*.cpp")):
            return cand
    return None


def _load_prebuilt() -> bool:
    spec = importlib.util.find_spec("lvlm_fast._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


def _load_jit() -> list[str]:
    from torch.utils import cpp_extension

    src = _csrc_dir()
    if src is None:
        raise RuntimeError("no C++ sources found (csrc/*.cpp)")
    loaded = []
    for path in sorted(glob.glob(os.path.join(src, "*.cpp"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            cpp_extension.load(
                name=f"lvlm_fast_{stem}",
                sources=[path],
                extra_include_paths=[src],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            loaded.append(stem)
        except Exception as exc:
            _STATE["errors"].append(f"{stem}: {str(exc).strip().splitlines()[-1]}")
    return loaded


def load_cpu_kernels() -> str:
    """Load the C++ kernels once; return how ('prebuilt', 'jit', or 'none')."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]  # type: ignore[return-value]
    how = "none"
    if os.environ.get("LVLM_FAST_NO_EXT") != "1":
        try:
            if os.environ.get("LVLM_FAST_JIT") != "1" and _load_prebuilt():
                how = "prebuilt"
            elif _load_jit():
                how = "jit"
        except Exception as exc:
            _STATE["errors"].append(str(exc).strip().splitlines()[-1] if str(exc) else repr(exc))
    _STATE["loaded"] = how
    return how


def has_cpu_kernel(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")


def register_cpu_fallbacks(fallbacks: dict[str, Callable]) -> list[str]:
    """Register the reference as the CPU kernel of every op the C++ build did not provide."""
    missing = [name for name in fallbacks if not has_cpu_kernel(f"lvlm_fast::{name}")]
    for name in missing:
        torch.library.impl(f"lvlm_fast::{name}", "CPU")(fallbacks[name])
    if missing:
        why = "; ".join(_STATE["errors"]) or "extension not built"
        warnings.warn(
            f"lvlm_fast: C++ CPU kernels unavailable for {', '.join(missing)} ({why}); "
            "using the plain-PyTorch reference instead (correct but slow). Reinstall with "
            "`pip install --no-build-isolation .` and a working C++ compiler to fix.",
            RuntimeWarning,
            stacklevel=2,
        )
    return missing


def cpu_kernel_status() -> dict[str, object]:
    return {"loaded": _STATE["loaded"], "errors": list(_STATE["errors"])}  # type: ignore[arg-type]
