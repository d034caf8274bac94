"""picogpt's NumPy training against PyTorch on nanoGPT's CPU recipe for Tiny Shakespeare.

    python benchmarks/bench_train.py TEXT [--torch] [--max-iters 2000]

TEXT is Tiny Shakespeare (../shared/data/tinyshakespeare.txt in this workplace). The recipe is
nanoGPT's CPU one: n_layer 4, n_head 4, n_embd 128, block_size 64, batch_size 12, 2000 iters,
lr 1e-3 -> 1e-4 (warmup 100, cosine), dropout 0, AdamW (0.9, 0.99), weight decay 0.1, grad clip
1.0, evaluation every 250 iters over 20 batches. Prints the median ms per training step (the
evaluations excluded) and the validation loss at the last iteration.

With --torch the same recipe also runs in PyTorch, in the same process after picogpt, on the same
batches: a GPT-2 written with torch.nn the way nanoGPT writes it (scaled_dot_product_attention,
tied output projection, AdamW with decay on matrices only), so the two are timed on one machine
in one run. Run nothing else meanwhile: the machine has 2 cores and both use them.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

from picogpt import train as tr  # noqa: E402
from picogpt.chars import CharTokenizer  # noqa: E402

RECIPE = dict(tr.DEFAULTS)  # picogpt's defaults are nanoGPT's CPU recipe


def run_picogpt(data, tokenizer, config):
    step_ms = []
    with tempfile.TemporaryDirectory() as out:
        trainer = tr.Trainer(config, tokenizer, out)
        trainer.initialize()
        step = trainer.step

        def timed_step(*args):
            t0 = time.perf_counter()
            loss = step(*args)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            return loss

        trainer.step = timed_step
        tr.train(trainer, data, report=lambda line: print("  picogpt", line))
        last = (Path(out) / "train_log.jsonl").read_text().splitlines()[-1]
    return statistics.median(step_ms), json.loads(last)["val_loss"]


def run_torch(data, n_vocab, config):
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
    train_data, val_data = data

    def batch(split, rng):
        x, y = tr.get_batch(split, c["block_size"], c["batch_size"], rng)
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
        lr = tr.learning_rate(it, c["lr"], c["min_lr"], c["warmup_iters"], c["max_iters"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(step_ms), val, torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", type=Path, help="Tiny Shakespeare")
    parser.add_argument("--torch", action="store_true", help="also run the recipe in PyTorch")
    parser.add_argument("--max-iters", type=int, default=RECIPE["max_iters"])
    args = parser.parse_args()
    config = dict(RECIPE, max_iters=args.max_iters)
    text = args.text.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    data = tr.split_data(np.array(tokenizer.encode(text), np.uint16))
    print(f"{describe()}; Tiny Shakespeare, nanoGPT's CPU recipe, {args.max_iters} iters")

    rows = {"picogpt (NumPy)": run_picogpt(data, tokenizer, config)}
    if args.torch:
        ms, val, version = run_torch(data, tokenizer.n_vocab, config)
        rows[f"PyTorch {version}"] = (ms, val)
    print("\n| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    print("| median ms/iter | " + " | ".join(f"{ms:.1f}" for ms, _ in rows.values()) + " |")
    print(f"| val loss at iter {args.max_iters} | "
          + " | ".join(f"{val:.4f}" for _, val in rows.values()) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
