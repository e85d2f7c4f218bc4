"""Fixtures shared by every test tier. Keep this small: tier-specific setup lives in
``tests/tier<N>/conftest.py``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator: each test draws the same inputs on every run."""
    return torch.Generator().manual_seed(0)
