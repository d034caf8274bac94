"""How fast compact weights are widened and multiplied by one row (decoding's product), on one
thread, on two threads of one process, and in two processes at once.

    python benchmarks/bench_widen.py [--rows 65536] [--reps 5]

For each dtype, a [rows, 768] matrix of random weights (GPT-2 124M's width; 65,536 rows are 50
million weights, more than the caches hold, so each product streams them from memory) times one
row, through `Compact.product` (float32: one BLAS product over the weights in the engine's
order, engine.streaming_copy), in billions of weights a second:

- one thread: the product over the whole matrix, OpenBLAS held to one thread;
- two threads: each thread the product over its half of the rows, at once, in one process: a
  pass of the engine's pool (`parallel.run`), as a decoding step's products are split;
- two processes: the one-thread figure of two processes started together, summed.

Two processes share nothing but the memory bus; two threads also share the GIL, which each NumPy
call takes back when it ends. Where the two-thread figure falls short of the two-process one, the
threads lose that much to each other, not to the hardware.

Last, what a pass of the pool costs by itself: the median time of a two-thread pass that does
nothing, run back to back and after the threads have idled 0.3 and 1 ms (a core left idle may
sleep, and waking it takes time). A decoding step with compact weights pays it once a product.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402

from picogpt.gpt2 import compact, engine, parallel  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "int8")
WIDTH = 768


def operands(dtype, rows):
    """The matrix [rows, WIDTH] in dtype (float32 laid out as the engine lays it out, compact
    types in their one layout), a row x and the output."""
    w = (np.random.default_rng(0).standard_normal((rows, WIDTH)) * 0.02).astype(np.float32)
    w = engine.streaming_copy(w) if dtype == "float32" else compact.compress(w, dtype)
    return w, np.ones((1, WIDTH), np.float32), np.empty((1, rows), np.float32)


def product(w, x, out):
    if isinstance(w, np.ndarray):
        return np.matmul(x, w.T, out=out)
    return w.product(x, out)


def best_rate(run, weights, reps):
    """Billions of weights a second: `weights` over the best of `reps` timed calls of run()."""
    run()  # buffers made, pages in
    best = min(timed(run) for _ in range(reps))
    return weights / best / 1e9


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def one_thread(dtype, rows, reps):
    w, x, out = operands(dtype, rows)
    with parallel.passes():  # OpenBLAS on one thread
        return best_rate(lambda: product(w, x, out), rows * WIDTH, reps)


def two_threads(dtype, rows, reps):
    """One pass of the engine's pool (parallel.run), each thread a half of the rows."""
    w, x, out = operands(dtype, rows)
    before = parallel.set_threads(2)
    try:
        with parallel.passes():
            return best_rate(lambda: parallel.run(
                lambda start, stop: product(w[start:stop], x, out[:, start:stop]), rows),
                rows * WIDTH, reps)  # fmt: skip
    finally:
        parallel.set_threads(before)


def two_processes(dtype, rows, reps):
    """The children make their matrices, say so, and start timing together when told."""
    command = [sys.executable, __file__, "--child", dtype, "--rows", str(rows),
               "--reps", str(reps)]  # fmt: skip
    children = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for _ in range(2)]  # fmt: skip
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    return sum(float(child.communicate()[0]) for child in children)


def child(dtype, rows, reps):
    w, x, out = operands(dtype, rows)
    print("ready", flush=True)
    sys.stdin.readline()
    with parallel.passes():
        print(best_rate(lambda: product(w, x, out), rows * WIDTH, reps))


def empty_pass_us(gaps=(0.0, 0.3e-3, 1e-3), passes=300):
    """{gap in seconds: median microseconds of a two-thread pass of the pool doing nothing, each
    run after the threads idled `gap`}."""
    before = parallel.set_threads(2)
    try:
        with parallel.passes():
            medians = {}
            for gap in gaps:
                times = []
                for _ in range(passes):
                    if gap:
                        time.sleep(gap)
                    times.append(timed(lambda: parallel.run(lambda start, stop: None, 2)))
                medians[gap] = statistics.median(times) * 1e6
            return medians
    finally:
        parallel.set_threads(before)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536, help="rows of 768 weights")
    parser.add_argument("--reps", type=int, default=5, help="timed products; the best counts")
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rows, args.reps)
    print(describe())
    print(f"[{args.rows}, {WIDTH}] random weights times one row, billions of weights a second, "
          f"the best of {args.reps}\n")  # fmt: skip
    print("| dtype | one thread | two threads, one process | two processes |")
    print("|---|---|---|---|")
    for dtype in DTYPES:
        one = one_thread(dtype, args.rows, args.reps)
        threads = two_threads(dtype, args.rows, args.reps)
        processes = two_processes(dtype, args.rows, args.reps)
        print(f"| {dtype} | {one:.2f} | {threads:.2f} ({threads / one:.2f}x) | "
              f"{processes:.2f} ({processes / one:.2f}x) |", flush=True)  # fmt: skip
    waits = ", ".join(f"{us:.0f} us after {gap * 1e3:g} ms" for gap, us in empty_pass_us().items())
    print(f"\na pass of the pool doing nothing on 2 threads, median of 300: {waits}")


if __name__ == "__main__":
    main()
