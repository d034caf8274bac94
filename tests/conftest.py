"""Fixtures more than one test file uses."""

import pytest

from picogpt.gpt2 import parallel


@pytest.fixture
def threads():
    """Set the thread count for a test (any count runs on any number of cores); put back after."""
    before = parallel._threads
    yield parallel.set_threads
    parallel.set_threads(before)
