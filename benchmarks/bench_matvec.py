"""What one decoding step's products cost through NumPy's BLAS: 1 row against 4 rows.

    python benchmarks/bench_matvec.py [--size 124M|355M|774M|1558M] [--runs 15] [--pages]

A decoding step multiplies one row per sample by every weight matrix of GPT-2 (the blocks' four,
and wte for the logits). With random weights of a size's shapes this times, over all of them:
- 1 row with every matrix in [n_out, n_in] order (N dot products along rows of n_in), in OpenAI's
  [n_in, n_out] order (K column updates along rows of n_out), and as the engine lays them out
  (engine.streaming_copy): each in whichever order has the longer rows, the reason the engine
  copies the weights at load, all in one buffer on huge pages (memory.Arena); with --pages also
  that layout on 4 KB pages, what huge pages are worth;
- 4 rows as the engine runs them (one matrix-vector product per row: the first streams the
  weights from memory, the other three find them in cache) and as one matrix product, both ways;
- the rate of a matrix-vector product over one chunk of a matrix (kernels.matmul) already in
  cache.
If 4 rows must read each matrix once from memory and 3 more times from cache, they cost at least
1 + 3 x (memory rate / cache rate) times one row; gemm avoids the re-reads but repacks the weights.
"""

import argparse
import mmap
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

from picogpt.gpt2 import memory, parallel  # noqa: E402
from picogpt.gpt2.engine import project, streaming_copy  # noqa: E402
from picogpt.gpt2.kernels import MATVEC_CHUNK_BYTES, matmul  # noqa: E402

SIZES = {"124M": (768, 12), "355M": (1024, 24), "774M": (1280, 36), "1558M": (1600, 48)}
N_VOCAB = 50257


def weights(n_embd, n_layer, rng):
    """Every matrix a decoding step multiplies by, in [n_out, n_in] order; wte last."""
    d = n_embd
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * n_layer + [(N_VOCAB, d)]
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def engine_layout(wts, arena):
    """The matrices laid out as the engine lays them out (engine.streaming_copy), in `arena`."""
    return [streaming_copy(wt, arena.empty) for wt in wts]


def small_page_arena(n_bytes):
    """A memory.Arena of n_bytes whose buffer the kernel is asked to keep on 4 KB pages."""
    pages = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_NOHUGEPAGE)
    return memory.Arena(np.frombuffer(pages, np.uint8))


def engine(x, wts):
    """The products of a decoding step as the engine runs them (wte through its projection)."""
    *blocks, wte = wts
    return [matmul(x[:, : w.shape[1]], w) for w in blocks] + [project(x[:, : wte.shape[1]], wte)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="124M",
                        help="GPT-2 size whose shapes the matrices have")
    parser.add_argument("--runs", type=int, default=15, help="alternating runs of each variant")
    parser.add_argument("--pages", action="store_true",
                        help="also time the engine's layout on 4 KB pages (one more copy)")
    args = parser.parse_args()
    parallel.set_threads(None)  # OpenBLAS on PICOGPT_THREADS's count (else every core), as picogpt

    rng = np.random.default_rng(0)
    wts = weights(*SIZES[args.size], rng)
    ws = [np.ascontiguousarray(wt.T) for wt in wts]  # OpenAI's [n_in, n_out] order
    arena_bytes = memory.Arena.bytes_for(wt.size for wt in wts)
    streamed = engine_layout(wts, memory.Arena(memory.huge_page_buffer(arena_bytes)))
    n_bytes = sum(wt.nbytes for wt in wts)
    x1 = rng.standard_normal((1, 4 * SIZES[args.size][0]), dtype=np.float32)
    x4 = rng.standard_normal((4, x1.shape[1]), dtype=np.float32)

    small_pages = engine_layout(wts, small_page_arena(arena_bytes)) if args.pages else None
    variants = {
        "1 row, the longer rows (the engine)": lambda: engine(x1, streamed),
        **({"1 row, the longer rows, on 4 KB pages": lambda: engine(x1, small_pages)}
           if small_pages else {}),  # fmt: skip
        "1 row, all [n_out, n_in]": lambda: engine(x1, wts),
        "1 row, all [n_in, n_out] (OpenAI's order)": lambda: [x1[0, : w.shape[0]] @ w for w in ws],
        "4 rows, a product per row (the engine)": lambda: engine(x4, streamed),
        "4 rows, one gemm wt @ X.T": lambda: [w @ x4[:, : w.shape[1]].T for w in wts],
        "4 rows, one gemm X @ wt.T": lambda: [x4[:, : w.shape[1]] @ w.T for w in wts],
    }  # fmt: skip
    times = {name: [] for name in variants}
    for run in range(args.runs + 1):
        for name, f in variants.items():
            t = time.perf_counter()
            f()
            if run:  # the first run only warms up
                times[name].append(time.perf_counter() - t)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    # One chunk of the first block's c_fc, as the engine's rows re-read it: back to back, so that
    # all but the first product find it in cache.
    cached = wts[2][: MATVEC_CHUNK_BYTES // (wts[2].shape[1] * 4)]
    cached @ x1[0, : cached.shape[1]]
    t = time.perf_counter()
    for _ in range(100):
        cached @ x1[0, : cached.shape[1]]
    median["1 row, one chunk already in cache"] = (time.perf_counter() - t) / 100

    one = median["1 row, the longer rows (the engine)"]
    print(f"GPT-2 {args.size} shapes, {n_bytes / 1e6:.0f} MB of weights; {describe()}; "
          f"median of {args.runs} runs")  # fmt: skip
    print("| | time | weights streamed | / 1 row |\n|---|---|---|---|")
    for name, t in median.items():
        size = cached.nbytes if "cache" in name else n_bytes
        print(f"| {name} | {t * 1e3:.2f} ms | {size / t / 1e9:.0f} GB/s | "
              + ("" if "cache" in name else f"{t / one:.2f}x") + " |")  # fmt: skip
    memory_rate = n_bytes / one
    cache_rate = cached.nbytes / median["1 row, one chunk already in cache"]
    bound = 1 + 3 * memory_rate / cache_rate
    print(f"\n4 rows reading each matrix once from memory and 3 times from cache: >= {bound:.2f}x")


if __name__ == "__main__":
    main()
