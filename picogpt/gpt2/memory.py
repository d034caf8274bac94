"""Memory the network asks of the machine: how much there is, keeping freed memory for reuse, and
zeros committed only where written."""

import ctypes
import math
import mmap
import os

import numpy as np


def physical_memory():
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel.
    Process-wide: the engine and training call it, as they start.

    A prefill or a training step allocates and frees the same few MB of activations each time.
    By default glibc returns large blocks to the kernel (munmap, heap trimming) and the next call
    faults them back in, zeroed, 4 KB at a time: thousands of page faults each (benchmarks/
    README.md has what that cost). The price is that the heap stays at its peak. Does nothing
    where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (the most) from the heap
    except (OSError, AttributeError):
        pass


def lazy_zeros(shape):
    """float32 zeros whose memory is committed only where written, a 4 KB page at a time.

    np.zeros would do for small arrays, but NumPy asks the kernel for 2 MB huge pages on large
    ones, so the first key written into each head's slab of a KV cache commits 2 MB: a batched
    cache commits hundreds of MB before it holds a token. An anonymous map has no such advice."""
    n_bytes = math.prod(shape) * 4
    if n_bytes == 0:
        return np.zeros(shape, np.float32)
    return np.frombuffer(mmap.mmap(-1, n_bytes), np.float32).reshape(shape)
