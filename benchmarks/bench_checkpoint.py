"""How fast picogpt opens and verifies a checkpoint of GPT-2 124M's real shapes.

    python benchmarks/bench_checkpoint.py [--size 124M|355M] [--repeat 5]

Writes random float32 weights with the real shapes (497,759,232 bytes of data for 124M) to a
temporary folder, then reports the time `checkpoint.read` takes to open it (memory-mapped: no
bytes of weights are read) and the CRC32C throughput of `checkpoint.verify` over all of it.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from picogpt.formats import tf_checkpoint as checkpoint  # noqa: E402

SHAPES = {"124M": (768, 12, 12), "355M": (1024, 16, 24)}


def gpt2_shapes(n_embd, n_head, n_layer, n_vocab=50257, n_ctx=1024):
    d = n_embd
    shapes = {"model/wte": (n_vocab, d), "model/wpe": (n_ctx, d)}
    for i in range(n_layer):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": (d,), p + "ln_1/b": (d,), p + "ln_2/g": (d,), p + "ln_2/b": (d,),
            p + "attn/c_attn/w": (1, d, 3 * d), p + "attn/c_attn/b": (3 * d,),
            p + "attn/c_proj/w": (1, d, d), p + "attn/c_proj/b": (d,),
            p + "mlp/c_fc/w": (1, d, 4 * d), p + "mlp/c_fc/b": (4 * d,),
            p + "mlp/c_proj/w": (1, 4 * d, d), p + "mlp/c_proj/b": (d,),
        })  # fmt: skip
    shapes["model/ln_f/g"] = shapes["model/ln_f/b"] = (d,)
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="124M",
                        help="GPT-2 size whose shapes the checkpoint has (random values)")
    parser.add_argument("--repeat", type=int, default=5, help="timed reads; the best counts")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shapes = gpt2_shapes(*SHAPES[args.size])
    tensors = {name: rng.standard_normal(s, dtype=np.float32) for name, s in shapes.items()}
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        checkpoint.write(Path(folder) / "model.ckpt", tensors)
        write_s = time.perf_counter() - t0
        del tensors
        data_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.data-*"))
        open_s, verify_s = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            params = checkpoint.read(folder)
            open_s.append(time.perf_counter() - t0)
            assert len(params) == len(shapes)
            t0 = time.perf_counter()
            checkpoint.verify(folder)
            verify_s.append(time.perf_counter() - t0)
    mb = data_bytes / 1e6
    print(f"GPT-2 {args.size} shapes: {len(shapes)} tensors, {data_bytes:,} bytes of data")
    print(f"write:  {write_s:.2f} s ({mb / write_s:.0f} MB/s, CRC32C included)")
    print(f"read:   median {statistics.median(open_s) * 1e3:.1f} ms to open (memory-mapped)")
    v = statistics.median(verify_s)
    print(f"verify: median {v:.2f} s, {mb / v:.0f} MB/s CRC32C over every tensor")


if __name__ == "__main__":
    main()
