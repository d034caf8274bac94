"""picogpt against PyTorch at 1, 2, 4, ... threads, side by side in one run.

    python benchmarks/bench_scaling.py [--threads 1 2 4 8 16] [--quick] [--dir DIR]
    python benchmarks/bench_scaling.py --passes [--threads 1 2]

For each thread count n (by default the powers of two up to the cores this process may use, and
that count itself), each engine runs in a fresh subprocess pinned to the same first n cores:
picogpt with PICOGPT_THREADS=n, PyTorch with torch.set_num_threads(n). The two processes take
turns, never running at once: a round of a figure (a decoding round, a prefill, ten char steps,
a fine-tuning step) in one, then a round in the other. On a shared host the load that other
tenants put on the memory changes over tens of seconds; engines measured one after the other
could see different loads, and taking turns, both see the same. Each measures, on GPT-2 124M's
shapes with random weights (OpenAI's cannot be fetched where this was written):
- decode: greedy tokens/s after a 16-token prompt (picogpt's engine against transformers), the
  best of a few rounds;
- prefill: tokens/s of a 512-token prompt to its first new token (median after a warm-up);
- the char recipe: ms per training step of nanoGPT's CPU recipe (4 layers, 128 wide, batch 12 x
  64 characters) on random batches, against bench_train.py's nanoGPT-style torch.nn module;
- fine-tuning: ms per step of GPT-2 124M at batch 1 x 1024 (forward, backward, clipping, AdamW),
  against HuggingFace's GPT2LMHeadModel with torch.optim.AdamW.
picogpt's process also measures the memory bound on decoding: the bytes of weights a token
streams divided by the rate np.matmul(W, x) sustains over a float32 matrix larger than any cache
(twice the largest, at least 256 MB: machine.stream_bytes) while it streams as many bytes as a
round of decoding does, on the same n threads. Its rounds alternate with the decoding rounds, so
that both see the same load on a shared host, and each side is its best round: both are rates
held over the same bytes (about half a second on 2 cores). The table also gives the best single
product's rate, a peak of a few milliseconds, which a round cannot hold where other tenants
share the memory. The tables end with issue 21's targets. --quick runs 1 thread and the most,
with fewer repetitions, and the fine-tuning step at the most only (at 1 thread its two steps a
side take half of --quick's two minutes).

--passes profiles picogpt alone, in one process, at each thread count in turn: the time inside
each pass (cProfile's cumulative time of the function that splits it) of a 512-token prefill
and of a fine-tuning step at T=1024 and a char recipe step, and each pass's speed-up over the
first count: what each pass gains from more cores, and what is left on one.
"""

import argparse
import contextlib
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
from machine import describe, stream_bytes, stream_times  # noqa: E402

CHAR = {"n_vocab": 65, "n_ctx": 64, "n_embd": 128, "n_head": 4, "n_layer": 4}
CHAR_BATCH = 12
FINETUNE_T = 1024
CHAR_ROUND = 10  # char steps a turn (a fine-tuning step is a turn)
TURNS = []  # in a child of run_pair: the pipe ends its turns come in and go out by
QUIET = 0.05  # of a core: a process using less is idle


def wait_turn():
    """In a child of run_pair: wait until the cores are this process's (at once when alone)."""
    if TURNS and not os.read(TURNS[0], 1):
        sys.exit("the benchmark's parent process is gone")


def turn():
    """In a child of run_pair: hand the cores to the other engine's process and wait for them to
    come back. Each round of a figure runs between two calls, alone on the cores."""
    if TURNS:
        settle()
        os.write(TURNS[1], b"t")
        wait_turn()


def turn_before(i, per_turn):
    """Before step i of a figure (0 the warm-up, which runs in the turn before): a turn every
    per_turn steps."""
    if i and (i - 1) % per_turn == 0:
        turn()


def settle(limit_s=3.0):
    """Wait until this process's threads are idle, at most limit_s. BLAS's threads spin for a
    while after their last product before they sleep (OpenBLAS's about 0.15 s on the AMD EPYC
    this was written on, PyTorch's OpenMP's less), and would take cores from the other's turn."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        cpu = time.process_time()  # every thread's
        time.sleep(0.02)
        if time.process_time() - cpu < 0.02 * QUIET:
            return


def timed(f, *args):
    t = time.perf_counter()
    f(*args)
    return time.perf_counter() - t


def prefills(generate, prompt, n):
    """n prefills' seconds, each in a turn of its own."""
    times = []
    for _ in range(n):
        turn()
        times.append(timed(generate, prompt, 1))
    return times


def decode_rate(generate, prompt, new):
    """Tokens/s of `new` greedy tokens after `prompt`, its prefill (the first token) subtracted."""
    return new / (timed(generate, prompt, new + 1) - timed(generate, prompt, 1))


def child_picogpt(folder, reps):
    import picogpt
    from picogpt.gpt2 import parallel
    from picogpt.training.config import ARCHITECTURE, DEFAULTS
    from picogpt.training.loop import Trainer
    from picogpt.training.run_folder import RunFolder

    rng = np.random.default_rng(1)
    m = picogpt.load(folder)
    prompt, long_prompt = rng.integers(0, 50257, PROMPT).tolist(), rng.integers(0, 50257, PREFILL)

    def generate(ids, n):
        m.reset()
        m.generate_tokens(list(ids), n, temperature=0, stop_at_eos=False)

    weight_bytes = sum(a.nbytes for blk in m.gpt.blocks for name in ("c_attn", "c_proj", "c_fc",
                       "mlp_proj") for a in blk[name][:1]) + m.gpt.wte.nbytes  # fmt: skip
    generate(prompt, 8)  # warm-up: the first touch of the weights
    decodes, streams, peaks = [], [], []
    for _ in range(reps["rounds"]):  # alternating: the same load on a shared host
        turn()
        decodes.append(decode_rate(generate, prompt, reps["decode"]))
        times, size = stream_times(reps["decode"] * weight_bytes)  # the bytes the round streamed
        streams.append(size * len(times) / sum(times))
        peaks.append(size / min(times))
    decode, rate = max(decodes), max(streams)
    turn()
    generate(long_prompt, 1)  # warm-up: the first prefill's temporaries are new memory
    prefill = PREFILL / statistics.median(prefills(generate, long_prompt, reps["prefill"]))

    def steps(hparams, B, T, n, per_turn):
        config = {**DEFAULTS, **{k: hparams[k] for k in ARCHITECTURE}, "block_size": T,
                  "batch_size": B}  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            turn()
            trainer = Trainer(config, hparams, None, RunFolder(out, []), {})
            trainer.initialize()
            times = []
            for i in range(n + 1):  # the first is a warm-up
                turn_before(i, per_turn)
                ids = rng.integers(0, hparams["n_vocab"], (B, T + 1))
                times.append(timed(trainer.step, ids[:, :-1], ids[:, 1:], 1e-4, rng) * 1e3)
        return statistics.median(times[1:])

    gpt2 = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    return {"decode_tps": decode, "prefill_tps": prefill, "bound_tps": rate / weight_bytes,
            "stream_gbs": rate / 1e9, "peak_gbs": max(peaks) / 1e9, "threads": parallel.threads(),
            "chars_ms": steps(CHAR, CHAR_BATCH, CHAR["n_ctx"], reps["chars"], CHAR_ROUND),
            "finetune_ms": (steps(gpt2, 1, FINETUNE_T, reps["finetune"], 1) if reps["finetune"]
                            else None)}  # fmt: skip


def child_torch(folder, reps, n_threads):
    import torch
    import transformers
    from bench_train import RECIPE, step_torch, torch_char_model

    torch.set_num_threads(n_threads)
    rng = np.random.default_rng(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder / "hf").eval()
    prompt = torch.tensor([rng.integers(0, 50257, PROMPT).tolist()])
    long_prompt = torch.tensor([rng.integers(0, 50257, PREFILL).tolist()])

    def generate(ids, n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                           do_sample=False)  # fmt: skip

    generate(prompt, 8)
    decodes = []
    for _ in range(reps["rounds"]):
        turn()
        decodes.append(decode_rate(generate, prompt, reps["decode"]))
    turn()
    generate(long_prompt, 1)
    prefill = PREFILL / statistics.median(prefills(generate, long_prompt, reps["prefill"]))
    turn()
    config = {**RECIPE, **{k: CHAR[k] for k in ("n_layer", "n_head", "n_embd")},
              "block_size": CHAR["n_ctx"], "batch_size": CHAR_BATCH}  # fmt: skip
    char_model, optimizer = torch_char_model(config, CHAR["n_vocab"])
    times = []
    for i in range(reps["chars"] + 1):
        turn_before(i, CHAR_ROUND)
        ids = torch.from_numpy(rng.integers(0, CHAR["n_vocab"], (CHAR_BATCH, 65)))
        t = time.perf_counter()
        loss = char_model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(char_model.parameters(), 1.0)
        optimizer.step()
        times.append((time.perf_counter() - t) * 1e3)
    finetune = None
    if reps["finetune"]:
        turn()
        finetune = statistics.median(step_torch(FINETUNE_T, reps["finetune"], between=turn)[0])
    return {"decode_tps": max(decodes), "prefill_tps": prefill, "threads": torch.get_num_threads(),
            "chars_ms": statistics.median(times[1:]), "finetune_ms": finetune,
            "torch": torch.__version__}  # fmt: skip


def run_pair(n, folder, quick, finetune=True):
    """Both engines' children at n threads, pinned to the same first n cores, taking turns until
    both are done (see turn()): {engine: its figures}, finetune_ms None without `finetune`."""
    cores = sorted(os.sched_getaffinity(0))[:n]
    env = dict(os.environ, PICOGPT_THREADS=str(n), OMP_NUM_THREADS=str(n))
    children = {}
    with contextlib.ExitStack() as stack:
        for impl in ("picogpt", "torch"):
            go_read, go_write = os.pipe()  # the parent hands a turn over
            done_read, done_write = os.pipe()  # the child hands it back
            out, err = (stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            command = [sys.executable, __file__, "--child", impl, "--dir", str(folder),
                       "--threads", str(n), "--turns", f"{go_read},{done_write}"]  # fmt: skip
            command += (["--quick"] if quick else []) + ([] if finetune else ["--no-finetune"])
            child = subprocess.Popen(command, env=env, stdout=out, stderr=err,
                                     pass_fds=(go_read, done_write),
                                     preexec_fn=lambda: os.sched_setaffinity(0, cores))  # fmt: skip
            os.close(go_read)
            os.close(done_write)
            children[impl] = child, go_write, done_read, out, err
        running = list(children)
        while running:
            for impl in list(running):
                _, go, done, _, _ = children[impl]
                os.write(go, b"g")
                if not os.read(done, 1):  # it has exited
                    running.remove(impl)
        results = {}
        for impl, (child, go, done, out, err) in children.items():
            child.wait()
            os.close(go)
            os.close(done)
            if child.returncode:
                err.seek(0)
                sys.exit(f"{impl} at {n} threads failed:\n{err.read()[-3000:]}")
            out.seek(0)
            results[impl] = json.loads(out.read().strip().splitlines()[-1])
    return results


def report(results, counts):
    def cell(x):
        return f"{x:,.1f}"

    heads = {"decode_tps": ("decode, tokens/s", True), "prefill_tps": ("prefill 512, tokens/s",
             True), "chars_ms": ("char recipe, ms/step", False),
             "finetune_ms": (f"fine-tuning 124M at T={FINETUNE_T}, ms/step", False)}  # fmt: skip
    failed = []
    for key, (title, higher) in heads.items():
        print(f"\n{title}\n\n| threads | picogpt | PyTorch | picogpt / PyTorch (speed) | "
              "picogpt's speed-up on the count before |\n|---|---|---|---|---|")
        before = None
        for n in counts:
            ours, theirs = results[n]["picogpt"][key], results[n]["torch"][key]
            if ours is None or theirs is None:
                print(f"| {n} | not run (--quick) | | | |")
                continue
            speed = ours / theirs if higher else theirs / ours
            own = ours if higher else 1 / ours
            step = "" if before is None else f"{own / before:.2f}x"
            print(f"| {n} | {cell(ours)} | {cell(theirs)} | {speed:.2f}x | {step} |")
            target = {"prefill_tps": 1.0, "chars_ms": 1.0, "finetune_ms": 1.0,
                      "decode_tps": 1.5 if n >= 8 else 1.2}[key]
            if speed < target:
                failed.append(f"{title} at {n} threads: {speed:.2f}x, target >= {target}x")
            if before is not None and own < 0.95 * before:
                failed.append(f"{title}: {n} threads at {own / before:.2f}x of the count before")
            before = own
    print("\ndecode against the memory bound (weight bytes per token / the rate np.matmul(W, x) "
          f"sustains over as many bytes, W {stream_bytes() >> 20} MiB, same threads)\n\n"
          "| threads | stream GB/s, sustained | "
          "bound, tokens/s | decode | of the bound | best single product, GB/s |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    for n in counts:
        r = results[n]["picogpt"]
        share = r["decode_tps"] / r["bound_tps"]
        print(f"| {n} | {r['stream_gbs']:.1f} | {r['bound_tps']:.1f} | {r['decode_tps']:.1f} | "
              f"{share:.0%} | {r['peak_gbs']:.1f} |")
    share = results[counts[-1]]["picogpt"]
    share = share["decode_tps"] / share["bound_tps"]
    if share < 0.85:
        failed.append(f"decode at {counts[-1]} threads: {share:.0%} of the memory bound, "
                      "target >= 85%")
    print("\nissue 21's targets: " + ("all met" if not failed else "not met:\n- "
                                      + "\n- ".join(failed)))  # fmt: skip


PASSES = {
    "prefill": ("kernels.py:layer_norm", "engine.py:linear", "engine.py:attend",
                "engine.py:project"),
    "step": ("layers.py:layer_norm_forward", "layers.py:layer_norm_backward",
             "layers.py:layer_norm_output", "layers.py:linear_forward",
             "layers.py:linear_backward", "layers.py:attention_forward",
             "layers.py:attention_backward", "layers.py:gelu_forward", "layers.py:gelu_backward",
             "layers.py:gelu_output", "layers.py:classifier_forward",
             "layers.py:embedding_backward", "loop.py:update", "loop.py:clip_grad_norm",
             "train.py:update", "train.py:clip_grad_norm", "optimizer.py:update",
             "optimizer.py:clip_grad_norm"),
}  # fmt: skip


def profile_passes(counts, reps):
    """The per-pass profile of --passes (see the module's docstring)."""
    import cProfile
    import pstats

    from picogpt.gpt2 import engine, parallel, params
    from picogpt.training.config import ARCHITECTURE, DEFAULTS
    from picogpt.training.loop import Trainer
    from picogpt.training.run_folder import RunFolder

    gpt2 = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
               for name, shape in params.param_shapes(gpt2).items()}  # fmt: skip
    gpt = engine.GPT(weights, gpt2)
    ids = rng.integers(0, 50257, (1, PREFILL))

    def trainer(hparams, B, T):
        config = {**DEFAULTS, **{k: hparams[k] for k in ARCHITECTURE}, "block_size": T,
                  "batch_size": B}  # fmt: skip
        t = Trainer(config, hparams, None, RunFolder(tempfile.mkdtemp(), []), {})
        t.initialize()
        batch = rng.integers(0, hparams["n_vocab"], (B, T + 1))
        return lambda: t.step(batch[:, :-1], batch[:, 1:], 1e-4, rng)

    cases = {"prefill 512 (124M)": (lambda: gpt.forward(ids, gpt.new_cache()), "prefill"),
             f"fine-tuning step T={FINETUNE_T} (124M)": (trainer(gpt2, 1, FINETUNE_T), "step"),
             "char recipe step": (trainer(CHAR, CHAR_BATCH, CHAR["n_ctx"]), "step")}  # fmt: skip
    for title, (run, kind) in cases.items():
        table, totals = {}, {}
        for n in counts:
            parallel.set_threads(n)
            run()  # warm-up at this count
            profile = cProfile.Profile()
            t = time.perf_counter()
            profile.enable()
            for _ in range(reps):
                run()
            profile.disable()
            totals[n] = (time.perf_counter() - t) / reps * 1e3
            stats = pstats.Stats(profile).stats
            for (path, _, func), (_, _, _, cumulative, _) in stats.items():
                name = f"{Path(path).name}:{func}"
                if name in PASSES[kind]:
                    table.setdefault(name, {})[n] = cumulative / reps * 1e3
        parallel.set_threads(None)
        first = counts[0]
        print(f"\n{title}: ms inside each pass (under cProfile), speed-up over {first} thread(s)"
              f"\n\n| pass | " + " | ".join(f"{n} threads" for n in counts) + " |\n"
              + "|---" * (len(counts) + 1) + "|")  # fmt: skip
        rows = sorted(table.items(), key=lambda item: -item[1].get(first, 0))
        for name, ms in rows + [("whole", totals)]:
            cells = [f"{ms[n]:,.1f}" + (f" ({ms[first] / ms[n]:.2f}x)" if n != first else "")
                     for n in counts if n in ms]  # fmt: skip
            print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1, 2, "
                        "4, ... up to the usable cores)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 thread and the most, fewer reps, "
                        "fine-tuning at the most only")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "picogpt-124M",
                        help="where the random 124M model is written (kept for later runs)")
    parser.add_argument("--text", type=Path, help="ignored: the char recipe runs on random "
                        "batches (accepted for the many-core kit's script)")  # fmt: skip
    parser.add_argument("--passes", action="store_true", help="picogpt's per-pass profile at "
                        "each thread count, instead of the sweep against PyTorch")  # fmt: skip
    parser.add_argument("--child", choices=["picogpt", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--turns", help=argparse.SUPPRESS)  # a child's pipe ends (run_pair)
    parser.add_argument("--no-finetune", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reps = ({"decode": 16, "rounds": 2, "prefill": 2, "chars": 20, "finetune": 1} if args.quick
            else {"decode": 32, "rounds": 3, "prefill": 3, "chars": 30, "finetune": 2})  # fmt: skip
    if args.no_finetune:
        reps["finetune"] = 0
    if args.child:
        if args.turns:
            TURNS[:] = map(int, args.turns.split(","))
            wait_turn()  # before anything, even the imports, runs
        n = args.threads[0]
        result = (child_picogpt(args.dir, reps) if args.child == "picogpt"
                  else child_torch(args.dir, reps, n))  # fmt: skip
        print(json.dumps(result))
        return
    usable = len(os.sched_getaffinity(0))
    counts = args.threads or sorted({1 << i for i in range(usable.bit_length())} | {usable})
    if args.passes:
        print(f"{describe()}\nGPT-2 124M's shapes with random weights; picogpt alone")
        profile_passes(counts, 2 if args.quick else 3)
        return
    if args.quick and not args.threads:
        counts = sorted({1, usable})
    print(f"{describe()}\nGPT-2 124M's shapes with random weights; each engine in its own "
          "process, pinned to the same first n cores, the two taking turns; threads "
          f"{', '.join(map(str, counts))}", flush=True)  # fmt: skip
    make_model(args.dir, "124M")
    results = {}
    started = time.perf_counter()
    for n in counts:
        results[n] = run_pair(n, args.dir, args.quick, finetune=not args.quick or n == counts[-1])
        print(f"  {n} threads: {json.dumps(results[n])}  ({time.perf_counter() - started:.0f} s)",
              flush=True)  # fmt: skip
    print(f"\nPyTorch {results[counts[0]]['torch']['torch']}")
    report(results, counts)


if __name__ == "__main__":
    main()
