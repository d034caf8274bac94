"""picogpt's weights in float16, bfloat16 and int8 against float32, side by side in one run.

    python benchmarks/bench_dtypes.py [--size 124M 1558M] [--threads N] [--rounds R] [--dir DIR]
    python benchmarks/bench_dtypes.py --accuracy TEXT [--dir DIR]

For each size (GPT-2's shapes with random weights: OpenAI's cannot be fetched where this was
written), a float32 folder in OpenAI's layout (a TensorFlow checkpoint) and its exports in
HuggingFace's layout as float16 and bfloat16 safetensors (`picogpt export --dtype`), written once to
DIR. Each dtype then runs in a fresh process of its own, at --threads, the dtypes in turn for
--rounds rounds (each figure is a dtype's best round, so that a slow phase of a shared host does not
fall on one dtype alone): float32 from the float32 folder, float16 and bfloat16 from their folders
as they are (mapped, never widened whole), int8 quantized at load from the float32 folder. Each
measures the load time, greedy decode tokens/s after a 16-token prompt (the best of 3 rounds), a
512-token prefill's tokens/s (124M only: at 1558M a prefill takes minutes on 2 cores) and the peak
RSS of all that. The accuracy of each dtype is tests/test_compact.py's (the bundled model's
perplexity and predictions on held-out text), and --accuracy's: a small GPT trained here on GPT-2's
tokens of TEXT (Tiny Shakespeare; `picogpt train --tokenizer gpt2`, 4 layers, 128 wide, written once
to DIR), each dtype's perplexity on the text's last 10% (never trained on) as a ratio to float32's,
and how often its next-token argmax is float32's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_generate import PREFILL, PROMPT, make_model  # noqa: E402
from machine import describe, peak_rss_mb  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16", "int8")


def folders(root, size):
    """{dtype: the folder it loads from}, written once."""
    from picogpt.hub.export import export

    base = root / size
    make_model(base, size, with_hf=False)
    out = {"float32": base, "int8": base}
    for dtype in ("float16", "bfloat16"):
        out[dtype] = root / f"{size}-{dtype}"
        if not (out[dtype] / "config.json").exists():
            export(base, out[dtype], dtype=dtype)
    return out


def child(folder, dtype, size):
    import picogpt

    t = time.perf_counter()
    m = picogpt.load(folder, dtype=dtype)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 50257, PROMPT).tolist()

    def generate(ids, n):
        m.reset()
        t = time.perf_counter()
        m.generate_tokens(ids, n, temperature=0, stop_at_eos=False)
        return time.perf_counter() - t

    generate(prompt, 2)  # warm-up
    new = 16 if size == "124M" else 4
    decode = max(new / (generate(prompt, new + 1) - generate(prompt, 1))
                 for _ in range(3))  # the best round: less of a shared host's noise  # fmt: skip
    result = {"load_s": load_s, "decode_tps": decode, "dtype": m.gpt.dtype}
    if size == "124M":
        long_prompt = rng.integers(0, 50257, PREFILL).tolist()
        generate(long_prompt, 1)
        result["prefill_tps"] = PREFILL / statistics.median(
            generate(long_prompt, 1) for _ in range(3))  # fmt: skip
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def best(results):
    """A dtype's best figures over its rounds' results: the shortest load, the fastest decode and
    prefill, the largest peak RSS (the most it may need)."""
    merged = dict(results[0], load_s=min(r["load_s"] for r in results),
                  decode_tps=max(r["decode_tps"] for r in results),
                  peak_rss_mb=max(r["peak_rss_mb"] for r in results))  # fmt: skip
    if "prefill_tps" in merged:
        merged["prefill_tps"] = max(r["prefill_tps"] for r in results)
    return merged


def run_child(folder, dtype, size, threads):
    env = dict(os.environ, **({"PICOGPT_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, __file__, "--child", dtype, "--size", size, "--dir", str(folder)]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{dtype} at {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ACCURACY_RUN = ["--tokenizer", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
                "--block-size", "128", "--batch-size", "12", "--max-iters", "600",
                "--eval-interval", "600", "--lr", "1e-3"]  # fmt: skip


def accuracy(text, root):
    """Each dtype's perplexity ratio to float32 and argmax agreement with it (see the docstring)."""
    import picogpt

    folder = root / "bpe-small"
    if not (folder / "checkpoint").exists():
        subprocess.run([sys.executable, "-m", "picogpt", "train", str(text), "--out", str(folder),
                        *ACCURACY_RUN], check=True)  # fmt: skip
    ref = picogpt.load(folder, dtype="float32")
    words = Path(text).read_text(encoding="utf-8")
    ids = np.array(ref.encode(words[int(0.9 * len(words)) :]))  # the validation split's text
    n_ctx = ref.hparams["n_ctx"]
    windows = ids[: len(ids) // n_ctx * n_ctx].reshape(-1, n_ctx)
    print(f"\na small GPT on GPT-2's tokens ({folder}): {windows.size:,} held-out tokens in "
          f"windows of {n_ctx}\n\n| dtype | perplexity | ratio to float32's | argmax as "
          "float32's |\n|---|---|---|---|")  # fmt: skip
    results = {}
    for dtype in DTYPES:
        model = picogpt.load(folder, dtype=dtype)
        nll, argmax = [], []
        for window in windows:  # one window's logits at a time: [n_ctx, 50257] is 26 MB
            logits = model.logits(window.tolist())[:-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll.append(-logp[np.arange(len(logp)), window[1:]])
            argmax.append(logits.argmax(axis=-1))
        results[dtype] = (float(np.exp(np.concatenate(nll).mean())), np.concatenate(argmax))
        ppl, picks = results[dtype]
        base_ppl, base_picks = results["float32"]
        same = (picks == base_picks).mean()
        print(f"| {dtype} | {ppl:.3f} | {ppl / base_ppl:.5f} | {same:.2%} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", default=["124M"], choices=["124M", "355M", "774M",
                        "1558M"])  # fmt: skip
    parser.add_argument("--threads", type=int, help="threads (default: every usable core)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one process per dtype, "
                        "in turn; each figure is a dtype's best round (default 2)")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "picogpt-dtypes",
                        help="where the random models are written (kept for later runs)")
    parser.add_argument("--accuracy", type=Path, metavar="TEXT", help="the accuracy of each dtype "
                        "on a small GPT trained on GPT-2's tokens of TEXT, instead")  # fmt: skip
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accuracy:
        print(describe())
        accuracy(args.accuracy, args.dir)
        return
    if args.child:
        print(json.dumps(child(args.dir, args.child, args.size[0])))
        return
    from picogpt.gpt2 import parallel

    threads = args.threads or parallel.threads()
    print(f"{describe()}\n{threads} threads; GPT-2's shapes with random weights; each dtype in "
          f"a fresh process, the best of {args.rounds} rounds", flush=True)  # fmt: skip
    for size in args.size:
        paths = folders(args.dir, size)
        rounds = [{dtype: run_child(paths[dtype], dtype, size, args.threads) for dtype in DTYPES}
                  for _ in range(args.rounds)]  # dtypes in turn: each sees the host's phases
        results = {dtype: best([r[dtype] for r in rounds]) for dtype in DTYPES}
        base = results["float32"]
        print(f"\n{size}\n\n| dtype | load s | decode tokens/s | prefill 512 tokens/s | peak RSS "
              "MB | decode / float32's |\n|---|---|---|---|---|---|")  # fmt: skip
        for dtype, r in results.items():
            prefill = f"{r['prefill_tps']:,.0f}" if "prefill_tps" in r else "-"
            print(f"| {dtype} | {r['load_s']:.2f} | {r['decode_tps']:.1f} | {prefill} | "
                  f"{r['peak_rss_mb']:,.0f} | {r['decode_tps'] / base['decode_tps']:.2f}x |")


if __name__ == "__main__":
    main()
