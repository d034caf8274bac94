"""Load time of a GPT-2 124M-shaped model: picogpt from safetensors (float32 and float16) and
from OpenAI's TF checkpoint, against transformers' GPT2LMHeadModel.from_pretrained, same
weights (random, GPT-2 124M's shapes), same machine, one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_load.py --runs 3

The model is written once (TF checkpoint with picogpt's writer, then `export` to float32 and
float16 safetensors). Each measurement is a fresh Python process that imports its library first
(not timed), then times the load, then one token through the model ("load + 1 token": a lazy
loader pays its reads there). The files were just written, so they are in the page cache: these
are warm-cache figures, as a second run of a command sees them. Engines alternate, run by run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe, peak_rss_mb  # noqa: E402

HPARAMS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}

# (label, worker, folder) for every measured load.
CASES = [
    ("picogpt, OpenAI layout (TF checkpoint, float32)", "picogpt", "openai"),
    ("picogpt, safetensors float32", "picogpt", "hf32"),
    ("picogpt, safetensors float16 (widened to float32)", "picogpt", "hf16"),
    ("transformers from_pretrained, safetensors float32", "hf", "hf32"),
    ("transformers from_pretrained, safetensors float16 as float32", "hf", "hf16"),
]


def make_models(root):
    """The random 124M-shaped model in the three folders, once."""
    from picogpt.formats import tf_checkpoint as checkpoint
    from picogpt.gpt2.params import param_shapes
    from picogpt.hub.export import export

    openai = root / "openai"
    if not (openai / "hparams.json").exists():
        from picogpt.tokenizers import GPT2_VOCABULARY  # picogpt.load reads the tokenizer too

        data = Path(GPT2_VOCABULARY)
        openai.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        params = {name: (rng.standard_normal(shape, np.float32) * 0.02)
                  for name, shape in param_shapes(HPARAMS).items()}  # fmt: skip
        checkpoint.write(openai / "model.ckpt", params)
        for name in ("encoder.json", "vocab.bpe"):
            (openai / name).write_bytes((data / name).read_bytes())
        (openai / "hparams.json").write_text(json.dumps(HPARAMS))
    for name, dtype in (("hf32", "float32"), ("hf16", "float16")):
        if not (root / name).exists():
            export(openai, root / name, dtype=dtype)


def worker_picogpt(folder):
    import picogpt
    from picogpt.formats import hf, openai

    t0 = time.perf_counter()
    model = picogpt.load(folder)
    load_s = time.perf_counter() - t0
    model.logits([464])
    first_s = time.perf_counter() - t0
    t = time.perf_counter()  # the tokenizer alone, again: its share of the load
    (hf.read_tokenizer if hf.is_hf_folder(folder) else openai.read_tokenizer)(folder)
    return {"load_s": load_s, "first_s": first_s, "tokenizer_s": time.perf_counter() - t,
            "peak_rss_mb": peak_rss_mb()}


def worker_hf(folder):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        model(torch.tensor([[464]]))
    first_s = time.perf_counter() - t0
    return {"load_s": load_s, "first_s": first_s, "tokenizer_s": 0.0,
            "peak_rss_mb": peak_rss_mb()}


def readers(root, repeat=5):
    """Seconds to open the weights file alone, best of `repeat`: picogpt's two readers (memory
    maps, nothing copied) and the safetensors package's NumPy loader (which copies)."""
    from picogpt.formats import safetensors
    from picogpt.formats import tf_checkpoint as checkpoint

    cases = [("picogpt checkpoint.read (TF, mapped)", lambda: checkpoint.read(root / "openai")),
             ("picogpt safetensors.read (mapped)",
              lambda: safetensors.read(root / "hf32" / "model.safetensors"))]
    try:
        from safetensors.numpy import load_file

        cases.append(("safetensors.numpy.load_file (copied)",
                      lambda: load_file(root / "hf32" / "model.safetensors")))
    except ImportError:
        pass
    times = {}
    for label, read in cases:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t)
        times[label] = best
    return times


def run_worker(engine, folder):
    out = subprocess.run([sys.executable, __file__, "--worker", engine, "--dir", str(folder)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode:
        raise SystemExit(f"{engine} worker failed on {folder}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each case")
    parser.add_argument("--dir", type=Path, help="where the random model lives (kept); "
                        "default: a temporary folder")  # fmt: skip
    parser.add_argument("--worker", choices=["picogpt", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = worker_picogpt if args.worker == "picogpt" else worker_hf
        print(json.dumps(worker(args.dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        t = time.perf_counter()
        make_models(root)
        print(f"random GPT-2 124M-shaped model ready in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        results = {label: [] for label, _, _ in CASES}
        for run in range(args.runs):
            for label, engine, folder in CASES:
                results[label].append(run_worker(engine, root / folder))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        opened = readers(root)
    print(f"GPT-2 124M's shapes, random weights; warm page cache; median of {args.runs} fresh "
          f"processes each (min in brackets); {describe()}\n")
    print("| load | load s | load + 1 token s | of which tokenizer s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        def cell(key, runs=runs):
            values = [r[key] for r in runs]
            return f"{statistics.median(values):.2f} ({min(values):.2f})"
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        tok = cell("tokenizer_s") if runs[0]["tokenizer_s"] else "not loaded"
        print(f"| {label} | {cell('load_s')} | {cell('first_s')} | {tok} | {rss:.0f} |")
    print("\n| open the weights file (124M, float32), best of 5 | ms |\n|---|---|")
    for label, seconds in opened.items():
        print(f"| {label} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
