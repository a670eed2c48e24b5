"""Shared test configuration."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite on one intra-op thread.

    The tensors in the tests are small; on a shared or oversubscribed 2-core machine torch's
    intra-op threads spin against each other and make small matmuls 10-300x slower. Tests
    that need threads (benchmarks never run here) set them themselves.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
