"""Tier 1: the Triton kernels run in triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before triton (or any kernel module) is imported, so the
runner sets it for this pytest process (tests/run_all.py); we refuse to run otherwise."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1", (
    "tests/tier1 must run with TRITON_INTERPRET=1 set before import, in its own process: "
    "TRITON_INTERPRET=1 python -m pytest tests/tier1"
)

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402


def assert_interpreted(fn: object) -> None:
    """The kernel object is triton's interpreter wrapper, not a compiled JITFunction."""
    assert isinstance(fn, InterpretedFunction), f"{fn!r} is not interpreted (got {type(fn)})"


@pytest.fixture
def launched(monkeypatch) -> list[InterpretedFunction]:
    """Records every kernel launched through the interpreter during a test."""
    calls: list[InterpretedFunction] = []
    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        calls.append(self)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return calls
