"""Every core on a training step: the batch in shards, one thread each, BLAS on one core each.

NumPy runs each elementwise pass (LayerNorm, GELU, the softmax) on one core, and OpenBLAS splits
each matrix product over all of them. A small model's products are small, and much of its step
is in those passes, on one core while the others wait. So the batch is split instead:
a thread per core runs the forward and backward of its shard of the sequences, its products on
its own core. NumPy lets go of the GIL inside its loops and BLAS calls, so every pass of the
step runs on every core at once (benchmarks/README.md has what it gained).

The products must then run single-threaded, or each shard's would ask for every core: OpenBLAS's
thread count is set to 1 while the shards run (it is process-wide) and put back after. That
takes finding NumPy's OpenBLAS among the process's mapped files (Linux's /proc); where it cannot
be found (another BLAS, another OS), or its thread count is 1 (OPENBLAS_NUM_THREADS=1), a batch
is one shard, as before.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()  # one sharded call at a time: each sets the process's BLAS threads
_finding = threading.Lock()  # one search for OpenBLAS
_blas = None  # (get_num_threads, set_num_threads) of NumPy's OpenBLAS, once looked for
_pool, _pool_size = None, 0  # the worker threads, made on first use
_limit = None  # set_workers's bound


def _openblas():
    """get_num_threads and set_num_threads of the OpenBLAS this process has loaded, or None.

    NumPy's wheels carry OpenBLAS under a prefixed name (scipy_openblas_..._64_), a system one
    has the plain names; dlopen of a library already loaded returns the loaded one."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {parts[5] for parts in (line.split(None, 5) for line in maps)
                     if len(parts) == 6 and "openblas" in os.path.basename(parts[5]).lower()}
    except OSError:
        return None
    for path in sorted(p.strip() for p in paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    return get, set_
    return None


def blas_threads():
    """How many threads OpenBLAS runs a product on now, or None where it cannot be found."""
    global _blas
    with _finding:
        if _blas is None:
            _blas = _openblas() or False
    return _blas[0]() if _blas else None


def workers():
    """How many shards a batch is split into at most: BLAS's threads (one per core unless
    OPENBLAS_NUM_THREADS says fewer) within set_workers's bound, or 1 where BLAS's threads
    cannot be set."""
    threads = blas_threads()
    if threads is None:
        return 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(threads, usable, _limit or usable))


def set_workers(n):
    """Split batches into at most n shards from now on (None: no bound but the cores'); the
    bound before. 1 runs each step as one shard, on BLAS's own threads."""
    global _limit
    if n is not None and n < 1:
        raise ValueError(f"set_workers: at least 1 shard, got {n}")
    before, _limit = _limit, n
    return before


def split(n):
    """[(start, stop)] of n sequences' shards: at most workers() of them, sizes within 1."""
    k = min(n, workers())
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run(fn, n):
    """[fn(0), ..., fn(n - 1)], at once on n threads with BLAS single-threaded meanwhile (one
    after the other in this thread where workers() is 1). An exception in any call is raised
    here, after every call has ended: none is left writing into its buffers."""
    global _pool, _pool_size
    if n == 1 or workers() == 1:
        return [fn(i) for i in range(n)]
    with _lock:
        if _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="picogpt-shard"), n
        get, set_ = _blas
        threads = get()
        set_(1)
        try:
            futures = [_pool.submit(fn, i) for i in range(n)]
            for future in futures:
                future.exception()  # waits, also when the next line would raise first
            return [future.result() for future in futures]
        finally:
            set_(threads)
