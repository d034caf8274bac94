"""The elementwise hot paths, before and after a change, side by side in one run.

    python benchmarks/bench_passes.py [--before 7e8e3c1] [--runs 20]

Loads the engine (picogpt/gpt2/engine.py, picogpt/model.py before the move) and training's layers
(picogpt/gpt2/layers.py or picogpt/layers.py, where both revisions have them) as they were at
--before, from git, next to the working tree's, and times each hot function of both on the same
inputs at GPT-2 124M's shapes, alternating: the engine's attention (a 512-token prefill and one
decoding step after 512 tokens), GELU and LayerNorm over 512 positions, and the whole 512-token
prefill under cProfile (time inside each function); then training's layers at nanoGPT's
char-recipe shapes (batch 12 x 64 positions, 4 heads of 128 channels: what bench_train runs).
Random inputs: the time does not depend on the values, except through subnormals, which
bench_generate.py --count-subnormals counts.
"""

import argparse
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402

import picogpt  # noqa: E402, F401  (the package the old modules' relative imports resolve in)
from picogpt.gpt2 import engine as model  # noqa: E402

HPARAMS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
T = 512


def module_at(revision, path, *older_paths):
    """The module at `path` (or, where the revision has none, the first of `older_paths` it has)
    as it was at `revision`, imported as picogpt._<rev>_<name>; None if absent."""
    show = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if show.returncode:
        return module_at(revision, *older_paths) if older_paths else None
    name = f"picogpt._{revision.replace('~', '_').replace('^', '_')}_{Path(path).stem}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "picogpt"
    exec(compile(show.stdout, f"{revision}:{path}", "exec"), module.__dict__)
    sys.modules[name] = module
    return module


def side_by_side(cases, runs):
    """cases: (label, before_fn or None, after_fn, setup). Calls alternate between the two, setup
    outside the clock, so that a drift in the host's load hits both; prints medians."""
    print("| | before (ms) | after (ms) | after / before |\n|---|---|---|---|")
    for label, before, after, setup in cases:
        times = {"before": [], "after": []}
        pair = [("before", before), ("after", after)]
        for run in range(runs + 1):
            for key, f in pair if run % 2 else pair[::-1]:  # either may go first
                if f is None:
                    continue
                args = setup()
                t = time.perf_counter()
                f(*args)
                times[key].append(time.perf_counter() - t)
        a_ms = statistics.median(times["after"][1:]) * 1e3  # the first call only warms up
        if before is None:
            print(f"| {label} | - | {a_ms:.3f} | - |")
            continue
        b_ms = statistics.median(times["before"][1:]) * 1e3
        print(f"| {label} | {b_ms:.3f} | {a_ms:.3f} | {a_ms / b_ms:.2f}x |")


def random_params(rng):
    params = {}
    for name, shape in model.param_shapes(HPARAMS).items():
        params[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith("/g"):
            params[name][:] = 1.0
    return params


def engine_cases(old, rng):
    C, H = HPARAMS["n_embd"], HPARAMS["n_head"]
    hd = C // H
    q = rng.standard_normal((1, H, T, hd), dtype=np.float32)
    k = rng.standard_normal((1, H, T, hd), dtype=np.float32)
    v = rng.standard_normal((1, H, T, hd), dtype=np.float32)
    f = rng.standard_normal((T, 4 * C), dtype=np.float32)
    f_in = np.empty_like(f)  # gelu_ works in place: a fresh copy each call, in the same buffer
    x = rng.standard_normal((1, T, C), dtype=np.float32)
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    return [
        ("attention, 512-token prefill (12 heads)", lambda *a: old.attention(*a),
         lambda *a: model.attention(*a), lambda: (q, k, v, 0)),
        ("attention, 1 query after 511 keys", lambda *a: old.attention(*a),
         lambda *a: model.attention(*a), lambda: (q[:, :, -1:], k, v, T - 1)),
        ("gelu_ [512, 3072]", lambda a: old.gelu_(a), lambda a: model.gelu_(a),
         lambda: (np.copyto(f_in, f) or f_in,)),
        ("layer_norm [512, 768]", lambda *a: old.layer_norm(*a), lambda *a: model.layer_norm(*a),
         lambda: (x, g, b)),
    ]  # fmt: skip


def profile_prefill(old, rng, runs):
    """cProfile of a 512-token prefill with each revision's GPT: seconds inside each function."""
    params = random_params(rng)
    ids = rng.integers(0, HPARAMS["n_vocab"], (1, T))
    names = ("attention", "shifted_exp_", "softmax_", "gelu_", "layer_norm", "matmul", "forward")
    rows = {}
    engines = {"before": old.GPT(dict(params), HPARAMS), "after": model.GPT(params, HPARAMS)}
    profiles = {label: cProfile.Profile() for label in engines}
    walls = {label: [] for label in engines}
    for run in range(runs + 1):  # alternating; the first run of each only warms up
        for label, gpt in engines.items():
            cache = gpt.new_cache()
            t = time.perf_counter()
            if run:
                profiles[label].runcall(gpt.forward, ids, cache)
            else:
                gpt.forward(ids, cache)
            walls[label].append(time.perf_counter() - t)
    for label, profile in profiles.items():
        for (_, _, func), (_, _, tottime, cumtime, _) in pstats.Stats(profile).stats.items():
            if func in names:
                rows.setdefault(func, {})[label] = (tottime / runs, cumtime / runs)
        wall = statistics.median(walls[label][1:])
        rows.setdefault("whole prefill (wall, median)", {})[label] = (wall, wall)
    print(f"\ncProfile of a 512-token prefill, mean of {runs}: ms inside (and under) each function")
    print("| function | before | after |\n|---|---|---|")
    for func, cells in rows.items():
        out = [f"{cells[s][0] * 1e3:.1f} ({cells[s][1] * 1e3:.1f})" if s in cells else "-"
               for s in ("before", "after")]  # fmt: skip
        print(f"| {func} | {out[0]} | {out[1]} |")


def backward_with(f, cache):
    """f(dout, cache, *rest) with this forward's cache, whatever the setup passes in its place."""
    return lambda dout, _, *rest: f(dout, cache, *rest)


def training_cases(old, old_model, rng):
    """Training's layers at the char recipe's shapes; `old` is layers.py at --before (whose own
    references to the engine are pointed at the engine of --before too)."""
    from picogpt.gpt2 import layers

    old.model = old.engine = old_model
    old.causal_mask = old_model.causal_mask
    old.softmax_forward = old_model.softmax_
    B, Tt, C, H = 12, 64, 128, 4
    N = B * Tt
    qkv = rng.standard_normal((N, 3 * C), dtype=np.float32)
    x = rng.standard_normal((N, C), dtype=np.float32)
    f = rng.standard_normal((N, 4 * C), dtype=np.float32)
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    dy = rng.standard_normal((N, C), dtype=np.float32)
    df = rng.standard_normal((N, 4 * C), dtype=np.float32)
    dg, db = np.empty(C, np.float32), np.empty(C, np.float32)
    inputs = {"attention": (qkv, B, Tt, H), "gelu": (f,), "layer_norm": (x, g, b)}
    cases = []
    for name, args in inputs.items():
        fwd, bwd = name + "_forward", name + "_backward"
        cases.append((f"{fwd} [{N} rows]", getattr(old, fwd), getattr(layers, fwd),
                      lambda args=args: args))  # fmt: skip
        caches = {"old": getattr(old, fwd)(*args)[1], "new": getattr(layers, fwd)(*args)[1]}
        extra = {"attention": lambda c: (dy, c), "gelu": lambda c: (df, c),
                 "layer_norm": lambda c: (dy, c, g, dg, db)}[name]  # fmt: skip
        cases.append((f"{bwd} [{N} rows]", backward_with(getattr(old, bwd), caches["old"]),
                      backward_with(getattr(layers, bwd), caches["new"]),
                      lambda extra=extra: extra(None)))  # fmt: skip
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="7e8e3c1", help="git revision to compare against "
                        "(default: the last one before issue 13's changes)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=20, help="alternating runs of each pass")
    args = parser.parse_args()
    old = module_at(args.before, "picogpt/gpt2/engine.py", "picogpt/model.py")
    rng = np.random.default_rng(0)
    print(f"{describe()}; before = {args.before}, after = the working tree; median of "
          f"{args.runs} alternating calls")  # fmt: skip
    print("\nEngine, GPT-2 124M shapes")
    side_by_side(engine_cases(old, rng), args.runs)
    profile_prefill(old, rng, max(1, args.runs // 5))
    old_layers = module_at(args.before, "picogpt/gpt2/layers.py", "picogpt/layers.py")
    if old_layers is None:
        print(f"\n{args.before} has no picogpt/layers.py: no training comparison")
        return
    print("\nTraining's layers, nanoGPT's char recipe (12 x 64 positions, 4 heads, 128 channels)")
    side_by_side(training_cases(old_layers, old, rng), args.runs * 5)


if __name__ == "__main__":
    main()
