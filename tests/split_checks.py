"""Checks shared by the interpreter (tier 1) and GPU (tier 3) tests of kernels that split P
across programs at small N (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

NAMES = ("out", "lse", "grad_x", "grad_q", "grad_k")


def assert_split_matches_whole(kernels: ModuleType, monkeypatch, run: Callable[[], tuple],
                               n: int, p: int, tol: float) -> None:
    """``run()`` (forward + backward outputs) is bitwise repeatable on the split path and
    equals the unsplit path (``SPLIT_TARGET_PROGRAMS = 1``) within ``tol``."""
    split = run()
    assert all(torch.equal(a, b) for a, b in zip(split, run(), strict=True))
    monkeypatch.setattr(kernels, "SPLIT_TARGET_PROGRAMS", 1)
    assert kernels.p_splits(n, p)[0] == 1
    whole = run()
    for name, a, b in zip(NAMES, split, whole, strict=True):
        if b.numel():
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
