"""What a benchmark ran on: cores, NumPy, and which kernels its BLAS chose.

OpenBLAS picks its kernels for the CPU when NumPy is imported, unless OPENBLAS_CORETYPE names
them; on a CPU with AVX-512 its AVX-512 kernels ("SkylakeX") multiply matrices about twice as
fast as its AVX2 ones ("Haswell"). Some machines set OPENBLAS_CORETYPE=Haswell for the sake of
old OpenBLAS builds; the figures in the README were taken without it (unset for the benchmark's
command alone), as a laptop user would run, and every benchmark prints which kernels it had.
"""

import math
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

STREAM_MIN_BYTES = 256 << 20  # the reference matrix's bytes at least (stream_bytes)


def stream_rate():
    """GB/s a matrix-vector product streams a matrix larger than the caches at, now (the best of
    5 products): the bound on decoding speed. It moves with the other tenants of a shared host
    (benchmarks/README.md has the ranges seen)."""
    times, size = stream_times(0)
    return size / min(times) / 1e9


def stream_times(n_bytes):
    """The seconds each product np.matmul(W, x) took over a float32 matrix W larger than any cache
    (stream_bytes()), after one to warm up, for as many products as stream n_bytes (at least 5);
    and W's bytes."""
    w = np.ones((stream_bytes() // 4096, 1024), np.float32)
    x = np.ones(1024, np.float32)
    w @ x
    times = []
    for _ in range(max(5, math.ceil(n_bytes / w.nbytes))):
        t = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - t)
    return times, w.nbytes


def stream_bytes():
    """The reference matrix's bytes: twice the largest cache Linux reports (a server's L3 may
    hold hundreds of MB), at least STREAM_MIN_BYTES."""
    largest = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):  # "48K", "2048K"
        try:
            text = size.read_text().strip()
            shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
            largest = max(largest, int(text.rstrip("KMG")) << shift)
        except (OSError, ValueError):
            continue
    return max(STREAM_MIN_BYTES, 2 * largest)


def cpu_model():
    """The CPU's name and x86 family/model ("AMD EPYC (family 25, model 17)": a virtual machine
    may hide all but the brand): whether subnormal floats are slow depends on it (Intel cores take
    dozens of times longer over them, AMD's barely slow down)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "CPU unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe():
    blas = "BLAS unknown (pip install threadpoolctl to see it)"
    try:
        import threadpoolctl

        for lib in threadpoolctl.threadpool_info():
            if lib.get("user_api") == "blas":
                blas = (f"{lib.get('internal_api')} {lib.get('version')} "
                        f"({lib.get('architecture')} kernels, {lib.get('num_threads')} threads)")
                break
    except ImportError:
        pass
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f"{cpu_model()}, {os.cpu_count()} cores, NumPy {np.__version__}, {blas}"
            + (f", OPENBLAS_CORETYPE={forced}" if forced else ""))  # fmt: skip


def peak_rss_mb():
    """This process's peak resident set, in MB. VmHWM, not ru_maxrss: on Linux the latter carries
    the parent's peak across fork+exec, so a worker process would report its parent's (the
    benchmark that made 2 GB of random weights, say) when that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
