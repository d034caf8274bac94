"""Fixtures more than one test file uses."""

import pytest

from picogpt.gpt2 import kernels, parallel


@pytest.fixture
def threads(monkeypatch):
    """Set the thread count for a test (any count runs on any number of cores); put back after.
    The tests' models are small: every pass splits as a large model's would, however little
    work it holds (kernels.SPLIT_MACS, SPLIT_ELEMENTS)."""
    monkeypatch.setattr(kernels, "SPLIT_MACS", 1)
    monkeypatch.setattr(kernels, "SPLIT_ELEMENTS", 1)
    before = parallel._threads
    yield parallel.set_threads
    parallel.set_threads(before)
