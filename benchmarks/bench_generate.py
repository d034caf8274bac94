"""picogpt's engine against HuggingFace transformers + PyTorch, same weights, same machine.

    python benchmarks/bench_generate.py [--size 124M|355M|774M|1558M] [--runs 3] [--dir DIR]
    python benchmarks/bench_generate.py --size 1558M --only picogpt --runs 1

Speed does not depend on the weights' values, so this writes a checkpoint with the real shapes
and random weights (and GPT-2's real vocabulary, the one picogpt ships) to DIR, exports
the same weights for transformers, then measures each engine in fresh subprocesses, alternating:
load time, greedy decode tokens/s after a 16-token prompt, a 512-token prefill (time to the first
new token: the median of PREFILL_RUNS, after one untimed), 4 samples batched against 1, and peak
RSS. Batch 1, greedy, float32. Each run ends by
measuring how fast a matrix-vector product streams memory: on a shared host that moves, and
decoding speed moves with it; and the bound it puts on decoding: a step of only the products, as
bench_matvec.py times them ("1 row, the engine"), over the size's shapes. The table ends with the
targets of issue 13 (prefill >= 1.0x HF, decode >= 1.25x HF and >= 90% of that bound).

    python benchmarks/bench_generate.py --count-subnormals [--before REV]

counts the subnormal floats that come out of the engine's hot functions (attention weights,
GELU, LayerNorm, every product, the logits), sampling's probabilities and training's layers, over
a 512-token prefill and a training step whose weights make attention scores span hundreds (as
GPT-2's real ones do); --before also counts with the engine and layers of a git revision. On AMD
subnormals cost little, so a count of 0 is what shows the paths are fast on Intel too.
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
from bench_matvec import engine as matvec_step  # noqa: E402
from machine import describe, peak_rss_mb, stream_rate  # noqa: E402

SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36),
         "1558M": (1600, 25, 48)}  # fmt: skip
NEW_TOKENS = 64
PROMPT = 16
PREFILL = 512
PREFILL_RUNS = 3  # timed prefills per run, after one warm-up: one alone is noisy


def make_model(folder, size, with_hf=True):
    """A GPT-2 folder with `size`'s shapes and random weights, once; and the same for HF."""
    import shutil

    from picogpt.formats import tf_checkpoint as checkpoint
    from picogpt.tokenizers import GPT2_VOCABULARY

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
    vocab = Path(GPT2_VOCABULARY)
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

    from picogpt.formats import hf

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
    timed(long_prompt, 1, temperature=0)  # warm-up: the first prefill's temporaries are new memory
    prefill = statistics.median(timed(long_prompt, 1, temperature=0) for _ in range(PREFILL_RUNS))
    one = timed(prompt, NEW_TOKENS, seed=0)
    four = timed(prompt, NEW_TOKENS, seed=0, samples=4)
    result = {
        "load_s": load_s,
        "decode_tps": NEW_TOKENS / (total - first),
        "prefill_tps": PREFILL / prefill,
        "batch4_cost": four / one,
        "peak_rss_mb": peak_rss_mb(),
        "stream_gbs": stream_rate(),
    }
    result["decode_tps_alternating"], result["bound_tps"] = decode_against_bound(m, prompt)
    return result


def decode_against_bound(m, prompt, rounds=4, n=16):
    """Decoding tokens/s, and the bound on it: a step of only its products over the model's own
    weights (as bench_matvec.py's "1 row, the engine" times them: every weight streamed once from
    memory, nothing else). Rounds of n tokens alternate with rounds of n products-only steps, so
    that both see the same load on a shared host."""
    *blocks, wte = [w for blk in m.gpt.blocks for w in
                    (blk["c_attn"][0], blk["c_proj"][0], blk["c_fc"][0], blk["mlp_proj"][0])] + [
                    m.gpt.wte]  # fmt: skip
    x = np.random.default_rng(2).standard_normal((1, 4 * m.gpt.hparams["n_embd"]), np.float32)
    decode = products = 0.0
    for _ in range(rounds):
        m.reset()
        m.generate_tokens(prompt, 1, temperature=0)  # the prompt, outside the clock
        t = time.perf_counter()
        m.generate_tokens(prompt, n, temperature=0, stop_at_eos=False)  # n one-position steps
        decode += time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            matvec_step(x, [*blocks, wte])
        products += time.perf_counter() - t
    return rounds * n / decode, rounds * n / products


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
    timed(long_prompt, 1, do_sample=False)  # warm-up, as for picogpt
    prefill = statistics.median(timed(long_prompt, 1, do_sample=False) for _ in range(PREFILL_RUNS))
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="124M",
                        help="GPT-2 size whose shapes the random model has")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each engine")
    parser.add_argument("--dir", type=Path, help="where the random model lives (kept); "
                        "default: a temporary folder")  # fmt: skip
    parser.add_argument("--only", choices=["picogpt", "hf"], help="run one engine alone")
    parser.add_argument("--worker", choices=["picogpt", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--count-subnormals", action="store_true",
                        help="count subnormal floats on the hot paths instead of timing")
    parser.add_argument("--before", metavar="REV",
                        help="with --count-subnormals: also count with this git revision's code")
    args = parser.parse_args()
    if args.count_subnormals:
        count_subnormals(args.before)
        return
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
    for runs in results.values():
        for r in runs:
            if "bound_tps" in r:
                r["decode_of_bound"] = r["decode_tps_alternating"] / r["bound_tps"]
    rows = [("load time (s)", "load_s", "{:.2f}"), ("decode, 16-token prompt (tok/s)",
            "decode_tps", "{:.1f}"), ("prefill, 512 tokens (tok/s)", "prefill_tps", "{:.0f}"),
            ("4 samples batched / 1 sample (time)", "batch4_cost", "{:.2f}x"),
            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
            ("memory stream rate after the run (GB/s)", "stream_gbs", "{:.0f}"),
            ("decode, alternating with products-only steps (tok/s)", "decode_tps_alternating",
             "{:.1f}"), ("bound: products-only steps (tok/s)", "bound_tps", "{:.1f}"),
            ("decode / that bound", "decode_of_bound", "{:.0%}")]  # fmt: skip
    engines = list(results)
    print(f"\nGPT-2 {size}, random weights; {describe()}; median (min-max) of "
          f"{len(results[engines[0]])} runs")  # fmt: skip
    print("| | " + " | ".join(engines) + (" | picogpt / hf |" if len(engines) == 2 else " |"))
    print("|---" * (len(engines) + 1 + (len(engines) == 2)) + "|")
    median = {e: {key: statistics.median(r[key] for r in results[e]) for _, key, _ in rows
                  if key in results[e][0]} for e in engines}  # fmt: skip
    for label, key, fmt in rows:
        cells = []
        for e in engines:
            if key not in median[e]:
                cells.append("-")
                continue
            values = [r[key] for r in results[e]]
            cells.append(f"{fmt.format(median[e][key])} "
                         f"({fmt.format(min(values))}-{fmt.format(max(values))})")  # fmt: skip
        line = f"| {label} | " + " | ".join(cells)
        if len(engines) == 2:
            both = all(key in median[e] for e in engines)
            line += f" | {median['picogpt'][key] / median['hf'][key]:.2f}x" if both else " | -"
        print(line + " |")
    if "picogpt" not in median:
        return
    p = median["picogpt"]
    targets = [("decode >= 90% of the products-only bound", p["decode_of_bound"], 0.9, "{:.0%}")]
    if "hf" in median:
        h = median["hf"]
        targets = [("prefill >= 1.0x HF", p["prefill_tps"] / h["prefill_tps"], 1.0, "{:.2f}x"),
                   ("decode >= 1.25x HF", p["decode_tps"] / h["decode_tps"], 1.25, "{:.2f}x"),
                   *targets]  # fmt: skip
    print("\nIssue 13's targets (medians; on a shared host, only figures of one run compare):")
    for label, value, goal, fmt in targets:
        print(f"- {label}: {fmt.format(value)} " + ("(met)" if value >= goal else "(NOT met)"))


# --- counting subnormals -----------------------------------------------------------------------

TINY32 = np.finfo(np.float32).tiny


def subnormals(x):
    """How many entries of x are subnormal (nonzero, below its dtype's smallest normal)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        return 0
    return int(np.count_nonzero((x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny)))


def counting(module, names, counts, kind):
    """Wrap module.<name> for each name so that the subnormals in what it returns (arrays, or the
    arrays of a returned tuple) add up in counts["kind.name"] = [subnormal, total]; returns an
    undo."""
    saved = {}
    for name in names:
        if not hasattr(module, name):
            continue
        saved[name] = real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            parts = out if isinstance(out, tuple) else (out,)
            for part in parts:
                for array in part if isinstance(part, tuple) else (part,):
                    if isinstance(array, np.ndarray):
                        tally = counts.setdefault(f"{kind}.{_name}", [0, 0])
                        tally[0] += subnormals(array)
                        tally[1] += array.size
            return out

        setattr(module, name, wrapper)
    return lambda: [setattr(module, name, real) for name, real in saved.items()]


ENGINE_FUNCTIONS = ("shifted_exp_", "softmax_", "attention", "gelu_", "layer_norm", "linear",
                    "project")  # fmt: skip
LAYER_FUNCTIONS = ("layer_norm_forward", "layer_norm_backward", "attention_forward",
                   "attention_backward", "softmax_backward", "gelu_forward", "gelu_backward",
                   "linear_forward", "linear_backward", "cross_entropy_forward",
                   "cross_entropy_backward", "classifier_forward")  # fmt: skip


def wide_params(hparams, rng, widen):
    """Random weights of hparams' shapes, the queries' and keys' `widen` times wider than GPT-2's
    init: the attention scores then span hundreds, like GPT-2's trained ones (a few keys take
    almost all the weight, and the rest's exp underflows)."""
    from picogpt.gpt2.params import param_shapes

    d = hparams["n_embd"]
    params = {}
    for name, shape in param_shapes(hparams).items():
        params[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith("/g"):
            params[name][:] = 1.0
        if name.endswith("c_attn/w"):
            params[name][..., : 2 * d] *= widen
    return params


def count_engine(model_module, sampling_module, counts):
    """A 512-token prefill of GPT-2 124M's shapes and a sample from its last logits."""
    hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    rng = np.random.default_rng(0)
    undo = counting(model_module, ENGINE_FUNCTIONS, counts, "model")
    # The exp the engine calls through its kernels module (gpt2/kernels.py), where it has one.
    kernels = getattr(model_module, "kernels", None)
    undo_kernels = counting(kernels, ("shifted_exp_",), counts, "model") if kernels else list
    undo_sampling = counting(sampling_module, ("candidates",), counts, "sampling")
    try:
        gpt = model_module.GPT(wide_params(hparams, rng, 10), hparams)
        logits = gpt.forward(rng.integers(0, 50257, (1, PREFILL)), gpt.new_cache())
        sampling_module.candidates(logits[0] * 100, temperature=0.1)  # a range past float64's exp
    finally:
        undo()
        undo_kernels()
        undo_sampling()


def count_training(train, layers_module, counts):
    """A forward and backward pass of training (the module `train`, gpt2/network.py or the older
    train.py, over `layers_module`) at nanoGPT's char-recipe shapes."""
    import inspect

    hparams = {"n_vocab": 65, "n_ctx": 64, "n_embd": 128, "n_head": 4, "n_layer": 4}
    rng = np.random.default_rng(1)
    params = wide_params(hparams, rng, 40)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    idx, targets = rng.integers(0, 65, (2, 12, 64))
    saved_layers = train.layers
    train.layers = layers_module
    undo = counting(layers_module, LAYER_FUNCTIONS, counts, "layers")
    try:
        if "grads" in inspect.signature(train.gpt_forward).parameters:
            _, cache = train.gpt_forward(params, hparams, idx, targets, grads=grads)
        else:  # before the output layer's backward moved into the forward
            _, cache = train.gpt_forward(params, hparams, idx, targets)
        train.gpt_backward(cache, params, hparams, grads)
        if hasattr(layers_module, "classifier_forward"):  # the loss over GPT-2's vocabulary
            h = rng.standard_normal((64, 768), dtype=np.float32) * np.float32(50)
            wte = rng.standard_normal((50257, 768), dtype=np.float32) * np.float32(0.02)
            layers_module.classifier_forward(h, wte, rng.integers(0, 50257, 64), np.empty_like(wte))
    finally:
        undo()
        train.layers = saved_layers


def count_subnormals(before):
    from picogpt.generation import sampling
    from picogpt.gpt2 import engine, layers, network

    columns = {"now": (engine, sampling, layers, network)}
    if before:
        from bench_passes import module_at

        old_model = module_at(before, "picogpt/gpt2/engine.py", "picogpt/model.py")
        old_sampling = module_at(before, "picogpt/generation/sampling.py", "picogpt/sampling.py")
        old_layers = module_at(before, "picogpt/gpt2/layers.py", "picogpt/layers.py")
        if old_layers is not None:  # its references to the engine go to the old engine too
            old_layers.model = old_layers.engine = old_model
            old_layers.causal_mask = old_model.causal_mask
            old_layers.softmax_forward = old_model.softmax_
        # The training network's composition: gpt2/network.py, or train.py before the move.
        old_train = module_at(before, "picogpt/gpt2/network.py", "picogpt/train.py")
        if old_train is not None:
            old_train.model = old_train.engine = old_model
        columns = {before: (old_model, old_sampling, old_layers, old_train), **columns}
    results = {}
    for label, (model_module, sampling_module, layers_module, train_module) in columns.items():
        counts = results[label] = {}
        count_engine(model_module, sampling_module, counts)
        if layers_module is not None:
            count_training(train_module, layers_module, counts)
    print(f"{describe()}\nSubnormal floats out of each function (subnormal / all values): a "
          f"512-token prefill of GPT-2 124M's shapes, a sample from its logits, one training step "
          f"of the char recipe and a loss over GPT-2's vocabulary; random weights with wide "
          f"attention scores and logits")  # fmt: skip
    names = sorted({name for counts in results.values() for name in counts})
    print("| function | " + " | ".join(results) + " |\n" + "|---" * (len(results) + 1) + "|")
    for name in names:
        cells = [f"{c[name][0]} / {c[name][1]}" if name in c else "-" for c in results.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    now = sum(c[0] for c in results["now"].values())
    print(f"\nnow: {now} subnormal values in all" + (" (none)" if now == 0 else ""))


if __name__ == "__main__":
    main()
