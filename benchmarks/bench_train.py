"""picogpt's NumPy training against PyTorch (and nanoGPT), side by side in one run.

    python benchmarks/bench_train.py chars TEXT [--torch] [--max-iters 2000]
    python benchmarks/bench_train.py finetune [--block-size 512 1024] [--steps 5] [--no-torch]
    python benchmarks/bench_train.py bpe TEXT --nanogpt DIR [--max-iters 2000]

chars: nanoGPT's CPU recipe for Tiny Shakespeare, character-level (n_layer 4, n_head 4,
n_embd 128, block_size 64, batch_size 12, 2000 iters, lr 1e-3 -> 1e-4, warmup 100, cosine,
dropout 0, AdamW (0.9, 0.99), weight decay 0.1, grad clip 1.0, evaluation every 250 iters over
20 batches). Median ms per training step (evaluations excluded) and the validation loss at the
end; with --torch the same recipe in PyTorch, in the same process, on the same batches (a GPT-2
written with torch.nn the way nanoGPT writes it), the two alternating in rounds of ROUND steps.

finetune: one fine-tuning step of GPT-2 124M's shapes (random weights: OpenAI's weights cannot
be fetched on the machine this was written on), batch 1, at each --block-size: forward,
backward, gradient clipping and AdamW, as `picogpt train --init 124M` runs it, against
HuggingFace's GPT2LMHeadModel with torch.optim.AdamW. Each (implementation, block size) runs in
a fresh process of its own, alternating, so that each one's peak RSS is its own; the median
step time is over --steps steps after one warm-up step.

bpe: from scratch on GPT-2's tokens with nanoGPT's CPU sizes (4 layers, 4 heads, 128 wide,
block 64, batch 12) on TEXT (Tiny Shakespeare), against nanoGPT's own train.py in DIR (a clone
of karpathy/nanoGPT) on its data/shakespeare recipe, whose prepare.py tokenizes with tiktoken,
with GPT-2's biases and unpadded vocabulary (picogpt's model; nanoGPT's defaults drop the
biases and pad to 50,304 rows): ms/iter and the validation loss at the end, each from its own
log, both evaluating over --eval-iters batches.

How each figure moves with the thread count, against PyTorch at the same count: bench_scaling.py.

Run nothing else meanwhile: the machine's cores are shared by both sides.
"""

import argparse
import json
import math
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe, peak_rss_mb  # noqa: E402

from picogpt.gpt2.memory import keep_freed_memory  # noqa: E402
from picogpt.tokenizers.bpe import GPT2_PATTERN  # noqa: E402
from picogpt.tokenizers.chars import CharTokenizer  # noqa: E402
from picogpt.training.config import ARCHITECTURE, DEFAULTS, FINETUNE_DEFAULTS  # noqa: E402
from picogpt.training.data import get_batch, split_data, vocabulary_files  # noqa: E402
from picogpt.training.loop import Trainer, train  # noqa: E402
from picogpt.training.optimizer import learning_rate  # noqa: E402
from picogpt.training.run_folder import RunFolder  # noqa: E402

RECIPE = dict(DEFAULTS)  # picogpt's defaults are nanoGPT's CPU recipe
# chars --torch: steps each side runs before the other's turn. Rounds of seconds: each side's
# idle BLAS/OpenMP worker threads may spin for a while after its turn, slowing the other's first
# steps, and the median over a round of 50 leaves those out.
ROUND = 50


def run_picogpt(data, tokenizer, config, after_step=None):
    """picogpt's own training loop (train.train) on the recipe: the median ms per step and the
    final validation loss. after_step(iteration) is called after each step."""
    step_ms = []
    with tempfile.TemporaryDirectory() as out:
        hparams = {"n_vocab": tokenizer.n_vocab, "n_ctx": config["block_size"],
                   **{k: config[k] for k in ARCHITECTURE}}  # fmt: skip
        folder = RunFolder(out, [])
        trainer = Trainer(config, hparams, tokenizer, folder, vocabulary_files(tokenizer))
        trainer.initialize()
        step = trainer.step

        def timed_step(*args):
            t0 = time.perf_counter()
            loss = step(*args)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            return loss

        trainer.step = timed_step
        status = None if after_step is None else lambda it, *_: after_step(it)
        train(trainer, data, report=lambda line: print("  picogpt", line), status=status)
        last = (Path(out) / "train_log.jsonl").read_text().splitlines()[-1]
    return statistics.median(step_ms), json.loads(last)["val_loss"]


def torch_char_model(config, n_vocab):
    """nanoGPT's GPT-2 in torch.nn at the recipe's sizes, and its AdamW: (model, optimizer)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    c = config
    torch.manual_seed(c["seed"])

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d = c["n_embd"]
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, c["n_head"], -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            d = c["n_embd"]
            self.wte, self.wpe = nn.Embedding(n_vocab, d), nn.Embedding(c["block_size"], d)
            self.blocks = nn.ModuleList(Block() for _ in range(c["n_layer"]))
            self.ln_f = nn.LayerNorm(d)
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * c["n_layer"]) if "proj" in name else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif "ln" not in name:
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=c["lr"], betas=(c["beta1"], c["beta2"]))  # fmt: skip
    return model, optimizer


def torch_run(data, n_vocab, config):
    """The recipe in PyTorch, as a generator that yields after each step (so that its steps can
    alternate with picogpt's) and returns the median ms per step, the final validation loss and
    torch's version."""
    import torch

    c = config
    model, optimizer = torch_char_model(c, n_vocab)
    train_data, val_data = data

    def batch(split, rng):
        x, y = get_batch(split, c["block_size"], c["batch_size"], rng)
        return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    def estimate(split, rng):
        model.eval()
        with torch.no_grad():
            losses = [model(*batch(split, rng)).item() for _ in range(c["eval_iters"])]
        model.train()
        return float(np.mean(losses))

    step_ms, val = [], None
    for it in range(c["max_iters"] + 1):
        if it % c["eval_interval"] == 0 or it == c["max_iters"]:
            rng = np.random.default_rng([c["seed"], 1, it])
            train_loss, val = estimate(train_data, rng), estimate(val_data, rng)
            print(f"  torch   iter {it}: train loss {train_loss:.4f}, val loss {val:.4f}")
        if it == c["max_iters"]:
            break
        x, y = batch(train_data, np.random.default_rng([c["seed"], 0, it]))
        lr = learning_rate(it, c["lr"], c["min_lr"], c["warmup_iters"], c["max_iters"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        yield
    return statistics.median(step_ms), val, torch.__version__


# --- finetune: one step of GPT-2 124M, each in a fresh process ------------------------------------

GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def step_picogpt(block_size, steps):
    """ms of each step of `picogpt train --init 124M`'s loop body on random weights."""
    config = {**DEFAULTS, **FINETUNE_DEFAULTS, "block_size": block_size, "grad_accum": 1}
    config["min_lr"] = config["lr"]
    config.update({k: GPT2_124M[k] for k in ARCHITECTURE})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, GPT2_124M, None, RunFolder(out, []), {})
        trainer.initialize()
        keep_freed_memory()  # as train() does
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps + 1):
            ids = rng.integers(0, GPT2_124M["n_vocab"], (1, block_size + 1), dtype=np.int64)
            t0 = time.perf_counter()
            trainer.step(ids[:, :-1], ids[:, 1:], config["lr"], rng)
            times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]


def step_torch(block_size, steps, between=None):
    """ms of each step of HuggingFace's GPT2LMHeadModel + torch.optim.AdamW, the same step;
    between(), if given, is called before each step after the warm-up (bench_scaling's turns)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-5, betas=(0.9, 0.95))  # fmt: skip
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 1):
        if i and between is not None:
            between()
        ids = torch.from_numpy(rng.integers(0, 50257, (1, block_size + 1), dtype=np.int64))
        t0 = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 50257), ids[:, 1:].reshape(-1))
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0) * 1e3)
    label = f"PyTorch {torch.__version__}, transformers {transformers.__version__}"
    return times[1:], label


def one_step_process(args):
    """The child: one implementation at one block size; prints a JSON line."""
    if args.impl == "picogpt":
        times, label = step_picogpt(args.block_size, args.steps), "picogpt (NumPy)"
    else:
        times, label = step_torch(args.block_size, args.steps)
    print(json.dumps({"label": label, "ms": times, "peak_rss_mb": peak_rss_mb()}))


def finetune(args):
    print(f"{describe()}\nGPT-2 124M's shapes with random weights, batch 1: one step = forward, "
          "backward, clipping, AdamW\n")
    impls = ["picogpt"] + ([] if args.no_torch else ["torch"])
    results = {}
    for T in args.block_size:
        for impl in impls:
            command = [sys.executable, __file__, "_step", impl, str(T), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl} at T={T} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl, T] = r
            print(f"  {r['label']}, T={T}: steps {', '.join(f'{ms:.0f}' for ms in r['ms'])} ms; "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
    labels = [results[impl, args.block_size[0]]["label"] for impl in impls]
    print("\n| block size | " + " | ".join(f"{lab}: ms/step, peak RSS" for lab in labels)
          + (" | picogpt / PyTorch (time, memory) |" if len(impls) > 1 else " |"))
    print("|---" * (len(impls) + 1 + (len(impls) > 1)) + "|")
    for T in args.block_size:
        cells = [results[impl, T] for impl in impls]
        row = [f"{statistics.median(r['ms']):,.0f} ms, {r['peak_rss_mb']:,.0f} MB" for r in cells]
        if len(cells) > 1:
            a, b = cells
            row.append(f"{statistics.median(a['ms']) / statistics.median(b['ms']):.2f}x, "
                       f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
        print(f"| {T} | " + " | ".join(row) + " |")


# --- bpe: from scratch on GPT-2's tokens, against nanoGPT -----------------------------------------

# nanoGPT's CPU sizes, with GPT-2's own architecture (biases in the LayerNorms and linear layers,
# nanoGPT's default being none) and vocabulary (50,257 rows, from meta.pkl, not 50,304): the
# same model as picogpt's.
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
               "--dtype=float32", "--bias=True"]  # fmt: skip


def gpt2_vocabulary():
    """A folder holding GPT-2's encoder.json and vocab.bpe (the ones picogpt ships), and
    tiktoken's Encoding built from the same files."""
    import tiktoken.load

    from picogpt.tokenizers import GPT2_VOCABULARY

    data = Path(GPT2_VOCABULARY)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"),
                                                           str(data / "encoder.json"))
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    return data, enc


def nanogpt_prepare(text, nanogpt, enc):
    """What nanoGPT's data/shakespeare/prepare.py does (first 90% of the characters train, the
    rest validate; ids as uint16), with tiktoken's Encoding built offline; and a meta.pkl giving
    GPT-2's vocabulary size, which train.py reads instead of its padded default."""
    folder = nanogpt / "data" / "shakespeare"
    n = len(text)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array(enc.encode_ordinary(part), np.uint16).tofile(folder / f"{name}.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": enc.n_vocab}))


def bpe(args):
    text = args.text.read_text(encoding="utf-8")
    vocab, enc = gpt2_vocabulary()
    print(f"{describe()}\nfrom scratch on GPT-2's tokens, nanoGPT's CPU sizes, {args.max_iters} "
          "iters\n")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "picogpt"
        command = [sys.executable, "-m", "picogpt", "train", str(args.text), "--out", str(out),
                   "--tokenizer", str(vocab), "--weights-dir", tmp,
                   "--max-iters", str(args.max_iters), "--lr-decay-iters", str(args.max_iters),
                   "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
                   "--log-interval", "1000000"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        ms = [r["ms_per_iter"] for r in log if r["ms_per_iter"] is not None]
        rows["picogpt (NumPy)"] = (statistics.median(ms), log[-1]["val_loss"])
        print(f"  picogpt: {rows['picogpt (NumPy)'][0]:.1f} ms/iter, val loss "
              f"{log[-1]['val_loss']:.4f}", flush=True)
    if args.nanogpt:
        if args.max_iters <= RECIPE["warmup_iters"]:  # nanoGPT's schedule divides by their gap
            sys.exit(f"nanoGPT needs --max-iters above its warmup ({RECIPE['warmup_iters']})")
        nanogpt_prepare(text, args.nanogpt, enc)
        command = [sys.executable, "train.py", "config/train_shakespeare_char.py",
                   "--dataset=shakespeare", *NANOGPT_CPU, f"--max_iters={args.max_iters}",
                   f"--eval_interval={args.eval_interval}", f"--eval_iters={args.eval_iters}",
                   f"--lr_decay_iters={args.max_iters}", "--out_dir=/tmp/bench-nanogpt"]
        out = subprocess.run(command, cwd=args.nanogpt, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"nanoGPT failed:\n{out.stderr[-2000:]}")
        times = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms",
                                              out.stdout, re.M)][1:]
        vals = re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", out.stdout, re.M)
        rows["nanoGPT (PyTorch)"] = (statistics.median(times), float(vals[-1]))
    print("| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    print("| median ms/iter | " + " | ".join(f"{ms:.1f}" for ms, _ in rows.values()) + " |")
    print(f"| val loss at iter {args.max_iters} | "
          + " | ".join(f"{val:.4f}" for _, val in rows.values()) + " |")  # fmt: skip


# --- chars: the character-level recipe ------------------------------------------------------------


def chars(args):
    config = dict(RECIPE, max_iters=args.max_iters)
    text = args.text.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    data = split_data(np.array(tokenizer.encode(text), np.uint16))
    print(f"{describe()}; Tiny Shakespeare, nanoGPT's CPU recipe, {args.max_iters} iters")

    if not args.torch:
        rows = {"picogpt (NumPy)": run_picogpt(data, tokenizer, config)}
    else:
        # The two alternate, ROUND steps each: a host whose speed drifts over minutes (other
        # tenants) then slows both alike, where one run after the other would not.
        other = torch_run(data, tokenizer.n_vocab, config)

        def after_step(it):
            if it % ROUND == 0:
                for _ in range(ROUND):
                    next(other, None)

        rows = {"picogpt (NumPy)": run_picogpt(data, tokenizer, config, after_step)}
        while True:  # what is left of PyTorch's run, and its result
            try:
                next(other)
            except StopIteration as done:
                ms, val, version = done.value
                break
        rows[f"PyTorch {version}"] = (ms, val)
    print("\n| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    print("| median ms/iter | " + " | ".join(f"{ms:.1f}" for ms, _ in rows.values()) + " |")
    print(f"| val loss at iter {args.max_iters} | "
          + " | ".join(f"{val:.4f}" for _, val in rows.values()) + " |")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("chars", help="the character-level recipe, against PyTorch")
    c.add_argument("text", type=Path, help="Tiny Shakespeare")
    c.add_argument("--torch", action="store_true", help="also run the recipe in PyTorch")
    c.add_argument("--max-iters", type=int, default=RECIPE["max_iters"],
                   help="training steps (default the recipe's)")
    f = sub.add_parser("finetune", help="a GPT-2 124M step, against HuggingFace + PyTorch")
    f.add_argument("--block-size", type=int, nargs="+", default=[512, 1024],
                   help="sequence lengths T to time a step at")
    f.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    f.add_argument("--no-torch", action="store_true", help="picogpt alone")
    b = sub.add_parser("bpe", help="from scratch on GPT-2's tokens, against nanoGPT")
    b.add_argument("text", type=Path, help="Tiny Shakespeare")
    b.add_argument("--nanogpt", type=Path, help="a clone of karpathy/nanoGPT to run alongside")
    b.add_argument("--max-iters", type=int, default=RECIPE["max_iters"],
                   help="training steps (default the recipe's)")
    b.add_argument("--eval-interval", type=int, default=1000,
                   help="both evaluate every N iters (a multiple of it ends the run with one); "
                        "each is 2 x --eval-iters batches a side, outside the step times")
    b.add_argument("--eval-iters", type=int, default=200,
                   help="batches per evaluation, on both sides: the recipe's 20 leave each "
                        "validation loss a standard error about as large as the 0.05 the two "
                        "are compared within (benchmarks/README.md)")
    s = sub.add_parser("_step")  # the child process of finetune
    s.add_argument("impl", choices=["picogpt", "torch"])
    s.add_argument("block_size", type=int)
    s.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    modes = {"chars": chars, "finetune": finetune, "bpe": bpe, "_step": one_step_process}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
