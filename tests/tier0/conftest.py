"""Shared tier-0 fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP barriers cost more than the math, so
    modules of tiny-model tests run single-threaded (``pytestmark = usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
