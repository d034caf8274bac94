"""Every core on one pass: a pass over independent slices (rows, columns, heads, parameter
blocks) split over a persistent pool of threads, with BLAS single-threaded meanwhile.

NumPy runs each elementwise pass (LayerNorm, GELU, the softmax) on one core, and OpenBLAS splits
each matrix product over all of them. On a many-core CPU the passes then dominate: most cores
wait while one runs them. So a pass over slices that do not depend on each other runs here, a
contiguous range of slices per thread, the caller's thread taking the first range. NumPy lets go
of the GIL inside its loops and BLAS calls, so the ranges run at once. The math inside a range
reads as it would on one core; splitting is the one call around it:

    parallel.run(lambda start, stop: np.tanh(x[start:stop], out=x[start:stop]), len(x))

Products run inside such passes too (each thread a slice of the output's columns or rows), so
while `passes()` is in force OpenBLAS is held to one thread: the pool times BLAS's threads never
exceeds the cores, and OpenBLAS's own threads, which spin for a while after each product, never
compete with the pool's. Outside it (decoding one token: products of one row, passes too short to
split) OpenBLAS runs each product on `threads()` threads, as before, but never on more than the
cores this process may use.

Each range runs in a copy of the caller's context (contextvars), so what the caller set there holds
on every thread as it would on one core: NumPy's errstate, for one, is a context variable.

The thread count is a setting: `set_threads(n)`, else the environment's PICOGPT_THREADS, else the
cores this process may run on. Results depend on it only within float32 rounding (how a product
is split), and are the same from run to run at a fixed count. OpenBLAS is found among the
process's mapped files (Linux's /proc); where it is not (another BLAS, another OS), the pool still
splits the passes and BLAS is left as it is.
"""

import contextlib
import contextvars
import ctypes
import os
import threading

ENV = "PICOGPT_THREADS"

_finding = threading.Lock()  # one search for OpenBLAS
_blas = None  # (get_num_threads, set_num_threads) of NumPy's OpenBLAS, once looked for
_threads = None  # set_threads's count (None: the environment's, else the usable cores)
_pool = None  # the worker threads, made on first use
_busy = threading.Lock()  # one split pass at a time; a second caller meanwhile runs its own alone
_local = threading.local()  # .worker: this thread is one of the pool's (passes inside run alone)
_held = 0  # depth of passes(): while > 0, OpenBLAS runs single-threaded
_held_lock = threading.Lock()


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


def _find_blas():
    """OpenBLAS's (get, set) thread counts, or False; found once, and then set to threads()."""
    global _blas
    with _finding:
        if _blas is None:
            _blas = _openblas() or False
            if _blas and not _held:
                _blas[1](_blas_count())
    return _blas


def blas_threads():
    """How many threads OpenBLAS runs a product on now, or None where it cannot be found."""
    blas = _find_blas()
    return blas[0]() if blas else None


def usable_cores():
    """The cores this process may run on (its affinity), or the machine's where the OS does not
    say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _from_environment():
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected a whole number of threads") from None
    if n < 1:
        raise ValueError(f"{ENV}={value!r}: at least 1 thread")
    return n


def threads():
    """The threads a pass is split over: set_threads's count, else PICOGPT_THREADS, else the
    usable cores."""
    if _threads is not None:
        return _threads
    return _from_environment() or usable_cores()


def _blas_count():
    """OpenBLAS's threads outside passes(): threads(), but never more than the usable cores.
    Its workers spin while they wait for the next product; more of them than cores take turns
    on them, and every product waits for the last to be scheduled."""
    return min(threads(), usable_cores())


def set_threads(n):
    """Split passes over n threads from now on (None: back to the default), and run products
    outside the passes on n of OpenBLAS's threads (at most the usable cores); returns the
    setting before (None: the default)."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads: a whole number, at least 1, got {n!r}")
    before, _threads = _threads, n
    blas = _find_blas()
    if blas and not _held:
        blas[1](_blas_count())
    return before


def ranges(n, parts, grain=1):
    """[(start, stop)] splitting range(n) into at most `parts` contiguous ranges (fewer where a
    range would hold under `grain` items), their sizes within one `grain` of each other."""
    k = max(1, min(parts, n // max(1, grain)))
    bounds = [n * i // k for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@contextlib.contextmanager
def passes():
    """Hold OpenBLAS to one thread within: for a forward or a training step whose products run
    split over the pool (see the module's docstring). Nests; the count is put back at the end."""
    global _held
    blas = _find_blas()
    with _held_lock:
        _held += 1
        if blas and _held == 1:
            blas[1](1)
    try:
        yield
    finally:
        with _held_lock:
            _held -= 1
            if blas and _held == 0:
                blas[1](_blas_count())


def splitting():
    """Whether passes are split now: inside passes(), with more than one thread."""
    return _held > 0 and threads() > 1


def run(fn, n, grain=1):
    """fn(start, stop) over contiguous ranges covering range(n), one range per thread, all at
    once inside passes() (outside, or for a pass too short to give each thread `grain` items,
    fn(0, n) here); returns their results in order. An exception in any range is raised here,
    after every range has ended: none is left writing into its buffers."""
    if not _held or getattr(_local, "worker", False):
        return [fn(0, n)]  # outside passes(), or a pass inside a pass: whole, here
    parts = ranges(n, threads(), grain)
    if len(parts) == 1 or not _busy.acquire(blocking=False):
        return [fn(0, n)]  # too short to split, or another thread's pass holds the pool
    try:
        return _get_pool().run(fn, parts)
    finally:
        _busy.release()


def _get_pool():
    global _pool
    if _pool is None or _pool.size < threads() - 1:
        _pool = _Pool(threads() - 1)
    return _pool


class _Pool:
    """`size` worker threads that live as long as the process, each woken through its own lock:
    a few microseconds a pass, where concurrent.futures's queue costs tens."""

    def __init__(self, size):
        self.size = size
        self.task = None  # (fn, parts, a copy of the caller's context per helper) of the pass
        self.results = []
        self.go = [threading.Lock() for _ in range(size)]
        self.done = [threading.Lock() for _ in range(size)]
        for lock in self.go + self.done:
            lock.acquire()
        for i in range(size):
            threading.Thread(target=self._work, args=(i,), daemon=True,
                             name=f"picogpt-{i + 1}").start()  # fmt: skip

    def _work(self, i):
        _local.worker = True
        while True:
            self.go[i].acquire()
            fn, parts, contexts = self.task
            start, stop = parts[i + 1]
            try:
                self.results[i + 1] = (True, contexts[i].run(fn, start, stop))
            except BaseException as e:  # raised in the caller's thread
                self.results[i + 1] = (False, e)
            fn = parts = contexts = None  # held while this thread waits, they would keep arrays
            self.done[i].release()

    def run(self, fn, parts):
        helpers = len(parts) - 1
        # One copy each: a context runs on one thread at a time. Copies are cheap (immutable).
        contexts = [contextvars.copy_context() for _ in range(helpers)]
        self.task, self.results = (fn, parts, contexts), [None] * len(parts)
        for lock in self.go[:helpers]:
            lock.release()
        _local.worker = True  # the caller's own range runs as a worker's: passes inside it alone
        try:
            self.results[0] = (True, fn(*parts[0]))
        except BaseException as e:
            self.results[0] = (False, e)
        finally:
            _local.worker = False
            for lock in self.done[:helpers]:
                lock.acquire()
        # Neither the pass nor its results outlive it here: they may hold arrays of a mapped file.
        results, self.task, self.results = self.results, None, []
        for ok, value in results:
            if not ok:
                raise value
        return [value for _, value in results]
