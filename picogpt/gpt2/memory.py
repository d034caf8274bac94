"""Memory the network asks of the machine: how much there is, keeping freed memory for reuse,
zeros committed only where written, and one buffer on huge pages for the weights."""

import contextlib
import ctypes
import math
import mmap
import os

import numpy as np

HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 (and arm64 with 4 KB pages)
ARENA_ALIGN = 64  # bytes: each array of an Arena starts on a cache line


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


def huge_page_buffer(n_bytes):
    """A zeroed, writable uint8 array of n_bytes that starts on a huge page boundary, from an
    anonymous map advised for the kernel's transparent huge pages: committed as written, 2 MB at a
    time where the kernel allows it, else 4 KB (the advice is ignored where there is none).

    Decoding streams every weight from memory for each token, and with 4 KB pages it walks a new
    page table entry every 64 cache lines; with 2 MB pages, every 32,768 (benchmarks/README.md
    has what that is worth)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        # Private: a shared anonymous map is shared memory, which the kernel seldom gives huge
        # pages.
        buffer = mmap.mmap(-1, n_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE here, or refused
            buffer.madvise(mmap.MADV_HUGEPAGE)
        raw = np.frombuffer(buffer, np.uint8)
    else:  # Windows: no private anonymous map, and no huge pages without privileges
        raw = np.zeros(n_bytes + HUGE_PAGE, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start : start + n_bytes]


class Arena:
    """Arrays carved in turn from one uint8 `buffer`, each on a cache line: the engine's weight
    matrices, from a huge_page_buffer that decoding streams through on huge pages. An array
    keeps the whole buffer alive."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.used = 0

    @staticmethod
    def bytes_for(sizes, dtype=np.float32):
        """The bytes an Arena needs for arrays of these element counts."""
        item = np.dtype(dtype).itemsize
        return sum(_aligned(n * item) for n in sizes)

    def empty(self, shape, dtype=np.float32):
        """The buffer's next free bytes as a C-ordered array of `shape`, like np.empty's: to be
        written (each byte is handed out once, so it holds zeros until then)."""
        n_bytes = math.prod(shape) * np.dtype(dtype).itemsize
        start = _aligned(self.used)
        if start + n_bytes > len(self.buffer):
            raise MemoryError(f"an Arena of {len(self.buffer)} bytes has no room for "
                              f"{n_bytes} more after {self.used}")  # fmt: skip
        self.used = start + n_bytes
        return self.buffer[start : start + n_bytes].view(dtype).reshape(shape)


def _aligned(n_bytes):
    """n_bytes rounded up to a whole number of ARENA_ALIGN."""
    return -(-n_bytes // ARENA_ALIGN) * ARENA_ALIGN
