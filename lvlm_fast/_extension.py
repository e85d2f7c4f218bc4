"""Locate and load the C++ CPU kernels.

Order: the prebuilt ``lvlm_fast._C`` (from ``pip install --no-build-isolation``), else a
JIT build of ``csrc/*.cpp`` with ninja (one module per source file, so one broken kernel
does not take the others down), else nothing. Ops whose CPU kernel is missing fall back to
their plain-PyTorch reference; :func:`register_cpu_fallbacks` says so in ONE warning.
``LVLM_FAST_JIT=1`` forces the JIT path (development); ``LVLM_FAST_NO_EXT=1`` skips C++.

The prebuilt extension holds the hot kernels compiled once per ISA (x86-64: ``baseline``
SSE2, ``avx2`` AVX2+FMA, ``avx512``; aarch64: ``neon``) and runs the widest one this CPU
supports (csrc/isa.h). ``LVLM_FAST_CPU_ISA=baseline|avx2|avx512|auto`` forces one at load
time: an unknown name is a ``ValueError``; a variant this build or CPU lacks falls back to
``auto`` with a ``RuntimeWarning``. :func:`set_cpu_isa` switches in-process (tests);
:func:`cpu_kernel_status` reports the variant in use. The JIT build compiles each file once
with ``-march=native`` and reports ``native``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

_STATE: dict[str, object] = {"loaded": None, "errors": [], "library": None, "isa_forced": None}
ISA_ENV = "LVLM_FAST_CPU_ISA"
ISA_NAMES = ("auto", "baseline", "avx2", "avx512", "neon", "native")


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
    _STATE["library"] = spec.origin
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
    if how != "none":
        _apply_isa_env()
    return how


def _has_isa_namespace() -> bool:
    try:
        torch.ops.lvlm_fast_isa.cpu_isa  # noqa: B018  (attribute lookup resolves the op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _apply_isa_env() -> None:
    """Honour LVLM_FAST_CPU_ISA once, right after the kernels load."""
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want:
        return
    if want not in ISA_NAMES:
        raise ValueError(f"{ISA_ENV}={want!r}: expected one of {', '.join(ISA_NAMES)}")
    _STATE["isa_forced"] = want
    if not _has_isa_namespace():
        return
    usable = set(torch.ops.lvlm_fast_isa.cpu_isa_supported())
    if want != "auto" and want not in usable and not (want == "baseline" and usable):
        built = list(torch.ops.lvlm_fast_isa.cpu_isa_built())
        warnings.warn(
            f"lvlm_fast: {ISA_ENV}={want} is not usable here (built: {', '.join(built)}; "
            f"this CPU runs: {', '.join(sorted(usable))}); using the best supported variant "
            f"({torch.ops.lvlm_fast_isa.cpu_isa()}) instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    torch.ops.lvlm_fast_isa.set_cpu_isa(want)


def set_cpu_isa(isa: str) -> str:
    """Run the hot CPU kernels' ``isa`` variant from now on (``auto``: the best this CPU
    supports); returns the previous one. Raises ``ValueError`` for a variant this build or
    CPU cannot run. For tests and benchmarks; users set ``LVLM_FAST_CPU_ISA``."""
    load_cpu_kernels()
    if not _has_isa_namespace():
        raise RuntimeError("lvlm_fast: the C++ CPU kernels are not loaded")
    built = list(torch.ops.lvlm_fast_isa.cpu_isa_built())
    if isa in ISA_NAMES and isa not in ("auto", "baseline") and isa not in built:
        raise ValueError(f"lvlm_fast: CPU ISA {isa!r} is not compiled into this build; "
                         f"built: {', '.join(built)}")
    try:
        return str(torch.ops.lvlm_fast_isa.set_cpu_isa(isa))
    except RuntimeError as exc:  # TORCH_CHECK_VALUE surfaces as ValueError; older: Runtime
        raise ValueError(str(exc).splitlines()[0]) from exc


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
    """How the C++ kernels were loaded and which ISA variant of the hot kernels runs:
    ``loaded`` ('prebuilt', 'jit', 'none'), ``errors``, ``library`` (the .so), ``isa`` (in
    use), ``isa_built`` (compiled in), ``isa_supported`` (of those, what this CPU runs),
    ``isa_forced`` (the LVLM_FAST_CPU_ISA value applied at load, or None)."""
    status: dict[str, object] = {
        "loaded": _STATE["loaded"],
        "errors": list(_STATE["errors"]),  # type: ignore[arg-type]
        "library": _STATE["library"],
        "isa": None,
        "isa_built": [],
        "isa_supported": [],
        "isa_forced": _STATE["isa_forced"],
    }
    if _STATE["loaded"] not in (None, "none") and _has_isa_namespace():
        status["isa"] = str(torch.ops.lvlm_fast_isa.cpu_isa())
        status["isa_built"] = list(torch.ops.lvlm_fast_isa.cpu_isa_built())
        status["isa_supported"] = list(torch.ops.lvlm_fast_isa.cpu_isa_supported())
    return status
