"""Train a GPT-2 in NumPy: the parameters and AdamW, the data, the training loop and the model
folder it saves to. The layers, each forward beside its backward, are in picogpt/layers.py; the
command (`picogpt train`, its options and messages) is in picogpt/cli.py.

The model is GPT-2 exactly (token and position embeddings, pre-LayerNorm blocks, causal
attention, tanh-GELU MLP, final LayerNorm, output projection tied to the token embedding), so
what this trains runs unchanged in picogpt's engine. All parameters live in one flat float32
buffer (and their gradients in another), so AdamW and gradient clipping are a few whole-buffer
operations, and the engine's names and shapes are views of it.

    picogpt train input.txt --out weights/my-model          # see `picogpt train --help`
"""

import ctypes
import json
import math
import shlex
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from picogpt import checkpoint, files, layers, model
from picogpt.chars import CharTokenizer
from picogpt.errors import TrainingError

# nanoGPT's CPU recipe for Tiny Shakespeare: trains in about a minute here.
DEFAULTS = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
    "max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
    "lr_decay_iters": None,  # None: max_iters
    "dropout": 0.0, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "eval_interval": 250, "eval_iters": 20, "log_interval": 10, "seed": 1337,
}  # fmt: skip
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


# --- the model over the layers: a transformer block ----------------------------------------


def block_params(params, i):
    """Block i's parameters by short name, weights as [nx, nf] views of the [1, nx, nf] arrays."""
    p = f"model/h{i}/"
    return {
        "ln_1": (params[p + "ln_1/g"], params[p + "ln_1/b"]),
        "c_attn": (params[p + "attn/c_attn/w"][0], params[p + "attn/c_attn/b"]),
        "c_proj": (params[p + "attn/c_proj/w"][0], params[p + "attn/c_proj/b"]),
        "ln_2": (params[p + "ln_2/g"], params[p + "ln_2/b"]),
        "c_fc": (params[p + "mlp/c_fc/w"][0], params[p + "mlp/c_fc/b"]),
        "mlp_proj": (params[p + "mlp/c_proj/w"][0], params[p + "mlp/c_proj/b"]),
    }


class BlockCache(NamedTuple):
    h1: np.ndarray  # ln_1(x), the attention's input [N, C]
    ln_1: layers.LayerNormCache
    a: np.ndarray  # the attention's output, c_proj's input [N, C]
    attn: layers.AttentionCache
    drop_1: Optional[np.ndarray]  # dropout mask of the attention branch
    h2: np.ndarray  # ln_2(x2), c_fc's input [N, C]
    ln_2: layers.LayerNormCache
    gelu: layers.GeluCache  # c_fc's output [N, 4C] and its GELU gate
    g: np.ndarray  # gelu's output, the MLP's c_proj's input [N, 4C]
    drop_2: Optional[np.ndarray]  # dropout mask of the MLP branch


def block_forward(x, p, B, T, n_head, dropout=0.0, rng=None):
    """One transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)). x [B*T, C]."""
    h1, ln_1 = layers.layer_norm_forward(x, *p["ln_1"])
    qkv = layers.linear_forward(h1, *p["c_attn"])  # [N, C] -> [N, 3C]
    a, attn = layers.attention_forward(qkv, B, T, n_head, dropout, rng)  # [N, 3C] -> [N, C]
    a_out, drop_1 = layers.dropout_forward(layers.linear_forward(a, *p["c_proj"]), dropout, rng)
    x2 = x + a_out  # residual
    h2, ln_2 = layers.layer_norm_forward(x2, *p["ln_2"])
    f = layers.linear_forward(h2, *p["c_fc"])  # [N, C] -> [N, 4C]
    g, gelu = layers.gelu_forward(f)
    m = layers.linear_forward(g, *p["mlp_proj"])  # [N, 4C] -> [N, C]
    m_out, drop_2 = layers.dropout_forward(m, dropout, rng)
    out = x2 + m_out  # residual
    return out, BlockCache(h1, ln_1, a, attn, drop_1, h2, ln_2, gelu, g, drop_2)


def block_backward(dout, cache, p, grads):
    """A residual's backward hands its output gradient to both of its branches unchanged."""
    c = cache
    dm = layers.dropout_backward(dout, c.drop_2)
    dg = layers.linear_backward(dm, c.g, p["mlp_proj"][0], *grads["mlp_proj"])
    df = layers.gelu_backward(dg, c.gelu)
    dh2 = layers.linear_backward(df, c.h2, p["c_fc"][0], *grads["c_fc"])
    dx2 = dout + layers.layer_norm_backward(dh2, c.ln_2, p["ln_2"][0], *grads["ln_2"])
    da_out = layers.dropout_backward(dx2, c.drop_1)
    da = layers.linear_backward(da_out, c.a, p["c_proj"][0], *grads["c_proj"])
    dqkv = layers.attention_backward(da, c.attn)
    dh1 = layers.linear_backward(dqkv, c.h1, p["c_attn"][0], *grads["c_attn"])
    return dx2 + layers.layer_norm_backward(dh1, c.ln_1, p["ln_1"][0], *grads["ln_1"])


# --- the whole network -------------------------------------------------------------------------


class GPTCache(NamedTuple):
    idx: np.ndarray  # [B, T] input ids
    targets: np.ndarray  # [B, T] target ids
    drop: Optional[np.ndarray]  # dropout mask of the embedding
    blocks: list  # a BlockCache per block
    h: np.ndarray  # ln_f's output [N, C]
    ln_f: layers.LayerNormCache
    probs: np.ndarray  # [N, V] softmax of the logits


def gpt_forward(params, hparams, idx, targets, dropout=0.0, rng=None):
    """Mean cross-entropy of predicting targets [B, T] from idx [B, T]; and what backward needs."""
    B, T = idx.shape
    wte = params["model/wte"]
    x = layers.embedding_forward(wte, params["model/wpe"], idx)  # [B, T] -> [N, C]
    x, drop = layers.dropout_forward(x, dropout, rng)
    blocks = []
    for i in range(hparams["n_layer"]):
        x, cache = block_forward(x, block_params(params, i), B, T, hparams["n_head"], dropout, rng)
        blocks.append(cache)
    h, ln_f = layers.layer_norm_forward(x, params["model/ln_f/g"], params["model/ln_f/b"])
    logits = h @ wte.T  # [N, C] -> [N, V]: the output projection is the token embedding
    loss, probs = layers.cross_entropy_forward(logits, targets.reshape(-1))
    return loss, GPTCache(idx, targets, drop, blocks, h, ln_f, probs)


def gpt_backward(cache, params, hparams, grads):
    """Fill `grads` (arrays shaped like params) with d loss / d params."""
    c = cache
    wte = params["model/wte"]
    dlogits = layers.cross_entropy_backward(c.probs, c.targets.reshape(-1))
    np.matmul(dlogits.T, c.h, out=grads["model/wte"])  # the output projection's part of dwte
    dh = dlogits @ wte
    dx = layers.layer_norm_backward(dh, c.ln_f, params["model/ln_f/g"], grads["model/ln_f/g"],
                                    grads["model/ln_f/b"])  # fmt: skip
    for i in reversed(range(hparams["n_layer"])):
        dx = block_backward(dx, c.blocks[i], block_params(params, i), block_params(grads, i))
    dx = layers.dropout_backward(dx, c.drop)
    layers.embedding_backward(dx, c.idx, grads["model/wte"], grads["model/wpe"])


# --- parameters and the optimizer ---------------------------------------------------------------


def param_shapes(hparams):
    """Every parameter's name and shape, as the engine reads them (model.param_shapes), with the
    matrices, which weight decay applies to, first."""
    shapes = model.param_shapes(hparams)
    matrices = {name: shape for name, shape in shapes.items() if len(shape) >= 2}
    return {**matrices, **{name: shape for name, shape in shapes.items() if len(shape) < 2}}


def flat_views(shapes, dtype=np.float32):
    """One zeroed buffer holding every array, and each array as a view into it."""
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype)
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return flat, views


def n_decayed(shapes):
    """How many leading elements of the flat buffer are matrices (weight-decayed)."""
    return sum(math.prod(s) for s in shapes.values() if len(s) >= 2)


def init_params(params, hparams, rng):
    """GPT-2's initialisation: N(0, 0.02) weights, the residual projections scaled down by
    sqrt(2 n_layer) so the residual stream's variance does not grow with depth; zero biases,
    unit LayerNorm gains."""
    proj_std = 0.02 / math.sqrt(2 * hparams["n_layer"])
    for name, array in params.items():
        if name.endswith("/g"):
            array[...] = 1.0
        elif array.ndim >= 2:
            std = proj_std if name.endswith("c_proj/w") else 0.02
            array[...] = rng.normal(0.0, std, array.shape)
        else:
            array[...] = 0.0


class AdamW:
    """Adam with decoupled weight decay over one flat parameter buffer (as torch.optim.AdamW)."""

    def __init__(self, flat_params, n_decay, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8):
        self.params, self.n_decay = flat_params, n_decay
        self.beta1, self.beta2, self.weight_decay, self.eps = beta1, beta2, weight_decay, eps
        self.m = np.zeros_like(flat_params)
        self.v = np.zeros_like(flat_params)
        self.step = 0

    def update(self, grad, lr):
        self.step += 1
        b1, b2 = self.beta1, self.beta2
        if self.weight_decay:
            self.params[: self.n_decay] *= 1.0 - lr * self.weight_decay
        self.m *= b1
        self.m += (1.0 - b1) * grad
        self.v *= b2
        self.v += (1.0 - b2) * (grad * grad)
        denom = np.sqrt(self.v)
        denom *= 1.0 / math.sqrt(1.0 - b2**self.step)
        denom += self.eps
        step = self.m / denom
        step *= lr / (1.0 - b1**self.step)
        self.params -= step


def clip_grad_norm(grad, max_norm):
    """Scale grad in place so its L2 norm is at most max_norm; the norm before clipping."""
    norm = math.sqrt(float(np.dot(grad, grad)))
    if max_norm and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm


def learning_rate(it, lr, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# --- data ----------------------------------------------------------------------------------------


def split_data(ids):
    """The first 90% for training, the last 10% for validation."""
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def get_batch(data, block_size, batch_size, rng):
    """batch_size random windows: inputs [B, T] and targets [B, T], the same shifted by one."""
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = data[starts[:, None] + np.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


# --- training ------------------------------------------------------------------------------------


class Trainer:
    """A model being trained, its optimizer, and the folder it is saved to."""

    def __init__(self, config, tokenizer, out_dir):
        self.config, self.tokenizer, self.out = config, tokenizer, Path(out_dir)
        self.hparams = {"n_vocab": tokenizer.n_vocab, "n_ctx": config["block_size"],
                        "n_embd": config["n_embd"], "n_head": config["n_head"],
                        "n_layer": config["n_layer"]}  # fmt: skip
        shapes = param_shapes(self.hparams)
        self.flat, self.params = flat_views(shapes)
        self.flat_grad, self.grads = flat_views(shapes)
        self.optimizer = AdamW(self.flat, n_decayed(shapes), config["beta1"], config["beta2"],
                               config["weight_decay"])  # fmt: skip
        self.iter = 0
        self.best_val_loss = math.inf
        self.saved_iter = None  # the iteration of the resume state on disk

    def initialize(self):
        init_params(self.params, self.hparams, np.random.default_rng(self.config["seed"]))

    def step(self, x, y, lr, rng):
        """One optimizer step on a batch; the batch's loss before the step."""
        loss, cache = gpt_forward(self.params, self.hparams, x, y, self.config["dropout"], rng)
        gpt_backward(cache, self.params, self.hparams, self.grads)
        clip_grad_norm(self.flat_grad, self.config["grad_clip"])
        self.optimizer.update(self.flat_grad, lr)
        return loss

    def estimate_loss(self, data, rng):
        """Mean loss over eval_iters random batches, without dropout."""
        c = self.config
        losses = [gpt_forward(self.params, self.hparams,
                              *get_batch(data, c["block_size"], c["batch_size"], rng))[0]
                  for _ in range(c["eval_iters"])]  # fmt: skip
        return float(np.mean(losses))

    # --- the model folder: hparams.json, chars.json, train_config.json, the checkpoint, and
    # resume/ (parameters + optimizer state). Checkpoints get a new name each time and the
    # `checkpoint` file, replaced last, is what names the current one: a kill at any moment
    # leaves the previous model (and the previous resume state) whole.

    def save_model(self):
        self.out.mkdir(parents=True, exist_ok=True)
        files.write_json(self.out / "hparams.json", self.hparams)
        files.write_json(self.out / "train_config.json", self.config)
        self.tokenizer.save(self.out)
        prefix = self.out / f"model.ckpt-{self.iter}"
        checkpoint.write(prefix, self.params)
        _remove_other_checkpoints(self.out, "model.ckpt-", prefix.name)

    def save_state(self):
        state_dir = self.out / "resume"
        tensors = dict(self.params)
        tensors.update({
            "adam/m": self.optimizer.m, "adam/v": self.optimizer.v,
            "train/iter": np.array(self.iter, np.int64),
            "train/best_val_loss": np.array(self.best_val_loss, np.float64),
        })  # fmt: skip
        prefix = state_dir / f"state.ckpt-{self.iter}"
        checkpoint.write(prefix, tensors)
        _remove_other_checkpoints(state_dir, "state.ckpt-", prefix.name)
        self.saved_iter = self.iter

    def load_state(self):
        state_dir = self.out / "resume"
        try:
            checkpoint.verify(state_dir)  # every CRC: never continue from damaged numbers
            tensors = checkpoint.read(state_dir)
            for name, array in self.params.items():
                array[...] = _stored(tensors, name, array.shape)
            self.optimizer.m[...] = _stored(tensors, "adam/m", self.flat.shape)
            self.optimizer.v[...] = _stored(tensors, "adam/v", self.flat.shape)
            self.iter = int(_stored(tensors, "train/iter", ()))
            self.best_val_loss = float(_stored(tensors, "train/best_val_loss", ()))
        except checkpoint.CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        self.optimizer.step = self.saved_iter = self.iter


def _stored(tensors, name, shape):
    if name not in tensors:
        raise checkpoint.CheckpointError(f"the resume state has no {name!r}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise checkpoint.CheckpointError(
            f"the resume state's {name!r} is {tensors[name].shape}, expected {shape}")
    return tensors[name]


def _remove_other_checkpoints(folder, stem, keep):
    for path in folder.glob(stem + "*"):
        if not path.name.startswith(keep + "."):
            path.unlink(missing_ok=True)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel.

    Every step allocates and frees the same few MB of activations. By default glibc returns
    large blocks to the kernel (munmap, heap trimming) and the next step faults them back in,
    zeroed, 4 KB at a time: 10,000 page faults a step, a third of its time (39 -> 26 ms/iter
    with the default recipe here). Does nothing where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (the most) from the heap
    except (OSError, AttributeError):
        pass


def train(trainer, data, report=print, status=None, resumed=False):
    """Train until max_iters: evaluate every eval_interval iterations (and at the end), save the
    model when the validation loss improves and the resume state every time. A resumed run
    starts where its state was saved, just after an evaluation, so it does not repeat it."""
    c = trainer.config
    train_data, val_data = data
    max_iters = c["max_iters"]
    decay_iters = c["lr_decay_iters"] if c["lr_decay_iters"] is not None else max_iters
    step_ms = []
    first = trainer.iter
    keep_freed_memory()
    while True:
        it = trainer.iter
        due = it % c["eval_interval"] == 0 or it == max_iters
        if due and not (resumed and it == first):
            eval_rng = np.random.default_rng([c["seed"], 1, it])
            train_loss = trainer.estimate_loss(train_data, eval_rng)
            val_loss = trainer.estimate_loss(val_data, eval_rng)
            ms = float(np.median(step_ms)) if step_ms else None
            improved = val_loss < trainer.best_val_loss
            if improved:
                trainer.best_val_loss = val_loss
                trainer.save_model()
            trainer.save_state()
            record = {"iter": it, "train_loss": round(train_loss, 4),
                      "val_loss": round(val_loss, 4),
                      "ms_per_iter": None if ms is None else round(ms, 2)}  # fmt: skip
            with open(trainer.out / "train_log.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            report(f"iter {it:>{len(str(max_iters))}}: train loss {train_loss:.4f}, "
                   f"val loss {val_loss:.4f}" + (" (best, saved)" if improved else "")
                   + ("" if ms is None else f", {ms:.1f} ms/iter"))  # fmt: skip
            step_ms.clear()
        if it >= max_iters:
            return
        rng = np.random.default_rng([c["seed"], 0, it])  # batch and dropout of this iteration
        x, y = get_batch(train_data, c["block_size"], c["batch_size"], rng)
        lr = learning_rate(it, c["lr"], c["min_lr"], c["warmup_iters"], decay_iters)
        t0 = time.perf_counter()
        loss = trainer.step(x, y, lr, rng)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        trainer.iter = it + 1
        if status is not None:
            status(trainer.iter, max_iters, loss, float(np.median(step_ms[-50:])))




# --- configuration and data: everything checked before any training ---------------------------


def make_config(options, saved=None):
    """The training configuration: `options` (key -> value, None where not given), else the saved
    run's values, else DEFAULTS."""
    config = dict(DEFAULTS)
    if saved:
        config.update({k: v for k, v in saved.items() if k in DEFAULTS})
    for key in DEFAULTS:
        value = options.get(key)
        if value is None:
            continue
        if saved and key in SHAPE_KEYS and value != saved.get(key):
            raise TrainingError(f"--{key.replace('_', '-')} {value}: the model being resumed "
                                f"has {saved.get(key)}; its shape cannot change")
        config[key] = value
    if config["n_embd"] % config["n_head"]:
        raise TrainingError(f"--n-embd {config['n_embd']} is not divisible by "
                            f"--n-head {config['n_head']}")
    if config["min_lr"] > config["lr"]:
        raise TrainingError(f"--min-lr {config['min_lr']} is above --lr {config['lr']}")
    return config


def command_line(text, out, config):
    """The `picogpt train` command that trains this configuration from scratch."""
    flags = [f"--{key.replace('_', '-')} {config[key]}" for key in DEFAULTS
             if config[key] is not None and key != "log_interval"]  # fmt: skip
    where = f"{shlex.quote(str(text))} --out {shlex.quote(str(out))}"
    return f"picogpt train {where} " + " ".join(flags)


def read_text(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: cannot be read as UTF-8 text: {e}") from None
    if not text:
        raise TrainingError(f"{path} is empty")
    return text


def prepare(text_path, out, resume, options, check_saved=None):
    """Check everything that can be wrong before any training: the text, the options, --out.
    `check_saved(config, path)` validates a resumed run's saved configuration. Returns the
    configuration, the tokenizer and the (train, validation) ids."""
    out = Path(out)
    text = read_text(text_path)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    has_model = (out / "hparams.json").exists() or (out / "resume").exists()
    if resume:
        if not (out / "resume" / "checkpoint").exists():
            raise TrainingError(f"{out}: nothing to resume (no resume/ state from a run)")
        try:
            saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
            tokenizer = CharTokenizer.load(out)
        except (OSError, ValueError) as e:
            raise TrainingError(f"{out}: cannot resume: {e}") from None
        if check_saved is not None:
            check_saved(saved, out / "train_config.json")
        config = make_config(options, saved)
    else:
        if has_model:
            raise TrainingError(f"{out} already holds a model: --resume continues it, or "
                                "choose another --out")
        tokenizer = CharTokenizer.from_text(text)
        config = make_config(options)
    try:
        ids = np.array(tokenizer.encode(text), np.uint16 if tokenizer.n_vocab < 65536 else np.int32)
    except ValueError as e:  # resuming on a text with characters the model does not know
        raise TrainingError(f"{text_path}: {e}") from None
    train_data, val_data = split_data(ids)
    need = config["block_size"] + 1
    if len(val_data) < need:
        raise TrainingError(
            f"{text_path} is too short for --block-size {config['block_size']}: its last 10% "
            f"({len(val_data)} characters) must hold a window of {need}")
    return config, tokenizer, (train_data, val_data)
