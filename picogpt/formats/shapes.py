"""What both weight formats' readers check about a tensor's shape before NumPy sees it.

NumPy describes an array only when its item size times the product of its non-zero dimensions
fits a signed 64-bit byte count, and it applies that limit also when a zero dimension leaves the
array empty: shape [0, 2**63 - 1, 2**63 - 1] holds no bytes, matches a size of 0 and still makes
NumPy raise ValueError ("array is too big"). A file that names such a shape is malformed.
"""

import numpy as np

from picogpt.errors import CheckpointError

MOST_BYTES = int(np.iinfo(np.intp).max)


def check_shape(shape, itemsize, where):
    """Raise CheckpointError naming `where` unless itemsize * prod(d for d in shape if d) is at
    most MOST_BYTES (Python's integers: the product itself cannot overflow)."""
    counted = itemsize
    for d in shape:
        if d:
            counted *= d
    if counted > MOST_BYTES:
        raise CheckpointError(
            f"{where}: shape {list(shape)} of {itemsize}-byte items cannot exist: its non-zero "
            f"dimensions alone come to {counted:,} bytes, more than the {MOST_BYTES:,} NumPy "
            "can describe (even with a zero dimension, which leaves it empty)")
