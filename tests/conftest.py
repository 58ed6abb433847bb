"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread_and_seed():
    """Tiny models run faster and steadier on one thread on a busy 2-core machine; a fixed seed
    makes every test independent of the ones before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
