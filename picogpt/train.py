"""Train a character-level GPT with backpropagation written out in NumPy.

The model is GPT-2 exactly (token and position embeddings, pre-LayerNorm blocks, causal
attention, tanh-GELU MLP, final LayerNorm, output projection tied to the token embedding), so
what this trains runs unchanged in picogpt's engine. Each layer is a forward function and its
backward, side by side; the backward takes what its forward saved and the gradient of the
output, writes the parameters' gradients into the buffers it is given and returns the gradient
of the input. The tests check every pair against finite differences and the whole model against
PyTorch's autograd.

Activations are [N, C] matrices, N = batch * block_size rows, so every product is one 2-D BLAS
call; attention alone works on [B, n_head, T, head_dim]. All parameters live in one flat float32
buffer (and their gradients in another), so AdamW and gradient clipping are a few whole-buffer
operations, and the engine's names and shapes are views of it.

    picogpt train input.txt --out weights/my-model          # see `picogpt train --help`
"""

import ctypes
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from picogpt import checkpoint, model
from picogpt.chars import CharTokenizer
from picogpt.errors import TrainingError
from picogpt.model import GELU_C, LN_EPS, causal_mask

GELU_A = 0.044715

# nanoGPT's CPU recipe for Tiny Shakespeare: trains in about a minute here.
DEFAULTS = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
    "max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
    "lr_decay_iters": None,  # None: max_iters
    "dropout": 0.0, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "eval_interval": 250, "eval_iters": 20, "log_interval": 10, "seed": 1337,
}  # fmt: skip
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


# --- layers: each forward beside its backward ------------------------------------------------


def embedding_forward(wte, wpe, idx):
    """Token plus position embedding: idx [B, T] ints -> x [B*T, C]."""
    B, T = idx.shape
    return (wte[idx] + wpe[:T]).reshape(B * T, -1)


def embedding_backward(dx, idx, dwte, dwpe):
    """Adds into dwte (the output projection shares it and has written its part); sets dwpe."""
    B, T = idx.shape
    dx = dx.reshape(B, T, -1)
    dwpe[:T] = dx.sum(axis=0)
    dwpe[T:] = 0
    np.add.at(dwte, idx.reshape(-1), dx.reshape(B * T, -1))


def layer_norm_forward(x, g, b):
    """(x - mean) / sqrt(var + eps) * g + b over the last axis of x [N, C]."""
    xhat = x - x.mean(axis=-1, keepdims=True)
    var = np.einsum("ij,ij->i", xhat, xhat)[:, None] / x.shape[-1]
    rstd = 1.0 / np.sqrt(var + LN_EPS)  # [N, 1]
    xhat *= rstd
    return xhat * g + b, (xhat, rstd)


def layer_norm_backward(dout, cache, g, dg, db):
    xhat, rstd = cache
    np.einsum("ij,ij->j", dout, xhat, out=dg)
    np.sum(dout, axis=0, out=db)
    dxhat = dout * g
    # The mean and the variance depend on every x of the row: the gradient loses its row mean
    # and its component along xhat.
    C = dout.shape[-1]
    mean_dxhat = dxhat.sum(axis=-1, keepdims=True) / C
    mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xhat)[:, None] / C
    dxhat -= mean_dxhat
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return dxhat


def linear_forward(x, w, b):
    """x [N, nx] @ w [nx, nf] + b."""
    out = x @ w
    out += b
    return out


def linear_backward(dout, x, w, dw, db):
    np.matmul(x.T, dout, out=dw)
    np.sum(dout, axis=0, out=db)
    return dout @ w.T


softmax_forward = model.softmax_  # the engine's: softmax over the last axis, in place


def softmax_backward(dout, y):
    """dx = y * (dout - sum(dout * y)): the Jacobian diag(y) - y y^T applied to dout, per row."""
    dx = dout * y
    dx -= y * dx.sum(axis=-1, keepdims=True)
    return dx


def attention_forward(qkv, B, T, n_head, dropout=0.0, rng=None):
    """Causal multi-head self-attention: qkv [B*T, 3C] -> y [B*T, C].

    The mask adds -inf to the scores of future positions, so their probabilities are exactly 0,
    and so are the gradients flowing to them."""
    C = qkv.shape[-1] // 3
    hd = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # each [B, H, T, hd]
    scale = 1.0 / math.sqrt(hd)
    att = q @ k.swapaxes(-1, -2)  # [B, H, T, T]
    att *= scale
    att += causal_mask(T)  # the engine's: 0, and -inf on the future
    softmax_forward(att)
    att_dropped, mask = dropout_forward(att, dropout, rng)
    y = att_dropped @ v  # [B, H, T, hd]
    y = y.transpose(0, 2, 1, 3).reshape(B * T, C)
    return y, (q, k, v, att, att_dropped, mask, scale)


def attention_backward(dy, cache):
    q, k, v, att, att_dropped, mask, scale = cache
    B, H, T, hd = q.shape
    dy = dy.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    dqkv = np.empty((3, B, H, T, hd), dy.dtype)
    np.matmul(att_dropped.swapaxes(-1, -2), dy, out=dqkv[2])  # dv
    datt = dropout_backward(dy @ v.swapaxes(-1, -2), mask)
    dscores = softmax_backward(datt, att)
    dscores *= scale
    np.matmul(dscores, k, out=dqkv[0])  # dq
    np.matmul(dscores.swapaxes(-1, -2), q, out=dqkv[1])  # dk
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * H * hd)


def gelu_forward(x):
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(c (x + a x^3)))."""
    t = x * x  # x*x*x, never x**3 (a slow generic power)
    t *= GELU_A
    t += 1.0
    t *= x
    t *= GELU_C
    np.tanh(t, out=t)
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, t


def gelu_backward(dout, x, t):
    """d/dx = 0.5 (1 + t + x (1 - t^2) c (1 + 3 a x^2)), t the forward's tanh."""
    inner = x * x
    inner *= 3 * GELU_A
    inner += 1.0
    inner *= GELU_C
    inner *= x
    dx = t * t
    np.subtract(1.0, dx, out=dx)
    dx *= inner
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dout
    return dx


def dropout_forward(x, p, rng):
    """Zero each element with probability p (rounded to a multiple of 2^-16) and scale the rest by
    1/(1-p); identity at p=0. The mask is drawn as 16-bit integers, not floats: on the bundled
    model's recipe that cut dropout's cost from about 45 to 35 ms of a 320 ms step."""
    if not p:
        return x, None
    cut = round(p * (1 << 16))
    keep = rng.integers(0, 1 << 16, x.shape, dtype=np.uint16) >= cut  # P(keep) = 1 - p
    mask = np.multiply(keep, np.float32((1 << 16) / ((1 << 16) - cut)), dtype=np.float32)
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


def cross_entropy_forward(logits, targets):
    """Mean negative log-likelihood of targets [N] under softmax(logits [N, V])."""
    rows = np.arange(len(targets))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    sums = probs.sum(axis=-1, keepdims=True)
    loss = float(np.mean(np.log(sums[:, 0]) - shifted[rows, targets]))
    probs /= sums
    return loss, probs


def cross_entropy_backward(probs, targets):
    """d loss / d logits = (softmax - one_hot(targets)) / N."""
    dlogits = probs.copy()
    dlogits[np.arange(len(targets)), targets] -= 1.0
    dlogits /= len(targets)
    return dlogits


# --- the model: blocks and the whole network ---------------------------------------------------


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


def block_forward(x, p, B, T, n_head, dropout=0.0, rng=None):
    """One transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)). x [B*T, C]."""
    h1, ln_1 = layer_norm_forward(x, *p["ln_1"])
    qkv = linear_forward(h1, *p["c_attn"])  # [N, 3C]
    a, attn = attention_forward(qkv, B, T, n_head, dropout, rng)
    a_out, drop_1 = dropout_forward(linear_forward(a, *p["c_proj"]), dropout, rng)
    x2 = x + a_out  # residual
    h2, ln_2 = layer_norm_forward(x2, *p["ln_2"])
    f = linear_forward(h2, *p["c_fc"])  # [N, 4C]
    g, tanh = gelu_forward(f)
    m_out, drop_2 = dropout_forward(linear_forward(g, *p["mlp_proj"]), dropout, rng)
    out = x2 + m_out  # residual
    return out, (h1, ln_1, a, attn, drop_1, h2, ln_2, f, g, tanh, drop_2)


def block_backward(dout, cache, p, grads):
    """A residual's backward hands its output gradient to both of its branches unchanged."""
    h1, ln_1, a, attn, drop_1, h2, ln_2, f, g, tanh, drop_2 = cache
    dm = dropout_backward(dout, drop_2)
    dg = linear_backward(dm, g, p["mlp_proj"][0], *grads["mlp_proj"])
    df = gelu_backward(dg, f, tanh)
    dh2 = linear_backward(df, h2, p["c_fc"][0], *grads["c_fc"])
    dx2 = dout + layer_norm_backward(dh2, ln_2, p["ln_2"][0], *grads["ln_2"])
    da_out = dropout_backward(dx2, drop_1)
    da = linear_backward(da_out, a, p["c_proj"][0], *grads["c_proj"])
    dqkv = attention_backward(da, attn)
    dh1 = linear_backward(dqkv, h1, p["c_attn"][0], *grads["c_attn"])
    return dx2 + layer_norm_backward(dh1, ln_1, p["ln_1"][0], *grads["ln_1"])


def gpt_forward(params, hparams, idx, targets, dropout=0.0, rng=None):
    """Mean cross-entropy of predicting targets [B, T] from idx [B, T]; and what backward needs."""
    B, T = idx.shape
    wte = params["model/wte"]
    x, drop = dropout_forward(embedding_forward(wte, params["model/wpe"], idx), dropout, rng)
    blocks = []
    for i in range(hparams["n_layer"]):
        x, cache = block_forward(x, block_params(params, i), B, T, hparams["n_head"], dropout, rng)
        blocks.append(cache)
    h, ln_f = layer_norm_forward(x, params["model/ln_f/g"], params["model/ln_f/b"])
    logits = h @ wte.T  # [N, V]: the output projection is the token embedding
    loss, probs = cross_entropy_forward(logits, targets.reshape(-1))
    return loss, (idx, targets, drop, blocks, h, ln_f, probs)


def gpt_backward(cache, params, hparams, grads):
    """Fill `grads` (arrays shaped like params) with d loss / d params."""
    idx, targets, drop, blocks, h, ln_f, probs = cache
    wte = params["model/wte"]
    dlogits = cross_entropy_backward(probs, targets.reshape(-1))
    np.matmul(dlogits.T, h, out=grads["model/wte"])  # the output projection's part of dwte
    dh = dlogits @ wte
    dx = layer_norm_backward(dh, ln_f, params["model/ln_f/g"], grads["model/ln_f/g"],
                             grads["model/ln_f/b"])  # fmt: skip
    for i in reversed(range(hparams["n_layer"])):
        dx = block_backward(dx, blocks[i], block_params(params, i), block_params(grads, i))
    dx = dropout_backward(dx, drop)
    embedding_backward(dx, idx, grads["model/wte"], grads["model/wpe"])


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
        _write_json(self.out / "hparams.json", self.hparams)
        _write_json(self.out / "train_config.json", self.config)
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


def _write_json(path, obj):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


# --- the command line ------------------------------------------------------------------------


def add_arguments(parser):
    """`picogpt train`'s arguments (the CLI builds the parser; this module fills it)."""
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Train a character-level GPT (GPT-2's architecture, backpropagation in NumPy) on a text\n"
        "file. The vocabulary is the text's characters; the first 90% is for training, the\n"
        "last 10% for validation. The model with the best validation loss is saved to --out,\n"
        "a model folder that `picogpt --model DIR` and picogpt.load(DIR) use like GPT-2.\n"
        "Defaults are nanoGPT's CPU recipe for Tiny Shakespeare (about a minute here)."
    )
    parser.epilog = (
        "examples:\n"
        "  picogpt train tinyshakespeare.txt --out weights/shakespeare\n"
        "  picogpt --model weights/shakespeare \"ROMEO:\" --n 200\n"
        "  picogpt train tinyshakespeare.txt --out weights/shakespeare --resume --max-iters 4000\n"
        "\n"
        "the folder: hparams.json, chars.json, train_config.json, the TF checkpoint (best model),\n"
        "train_log.jsonl (every evaluation) and resume/ (the latest parameters and optimizer\n"
        "state, for --resume). Saves are atomic: a kill at any moment leaves the last good model."
    )

    def positive(value):
        n = int(value)
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
        return n

    def whole(value):
        n = int(value)
        if n < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
        return n

    def rate(value):
        x = float(value)
        if not 0 <= x < 1:
            raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
        return x

    def nonnegative(value):
        x = float(value)
        if not x >= 0 or math.isinf(x):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
        return x

    parser.add_argument("text", metavar="TEXT", help="a UTF-8 text file to learn from")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the model in DIR from its last saved state")
    model = parser.add_argument_group("model (fixed once training starts)")
    training = parser.add_argument_group("training (--resume keeps the saved values unless given)")
    for group, flag, metavar, kind, text in [
        (model, "--n-layer", "N", positive, "transformer blocks"),
        (model, "--n-head", "N", positive, "attention heads"),
        (model, "--n-embd", "N", positive, "embedding width"),
        (model, "--block-size", "N", positive, "context length in characters"),
        (training, "--batch-size", "N", positive, "windows per step"),
        (training, "--max-iters", "N", whole, "optimizer steps in all"),
        (training, "--lr", "LR", nonnegative, "peak learning rate"),
        (training, "--min-lr", "LR", nonnegative, "final learning rate"),
        (training, "--warmup-iters", "N", whole, "linear warmup steps"),
        (training, "--lr-decay-iters", "N", whole, "cosine decay reaches --min-lr here"),
        (training, "--dropout", "P", rate, "dropout probability"),
        (training, "--weight-decay", "W", nonnegative, "AdamW weight decay, matrices only"),
        (training, "--beta1", "B", rate, "AdamW's beta1"),
        (training, "--beta2", "B", rate, "AdamW's beta2"),
        (training, "--grad-clip", "NORM", nonnegative, "clip the gradient's norm; 0: off"),
        (training, "--eval-interval", "N", positive, "evaluate and save every N steps"),
        (training, "--eval-iters", "N", positive, "batches per loss estimate"),
        (training, "--log-interval", "N", positive, "steps per progress line (not on a terminal)"),
        (training, "--seed", "S", int, "initialisation, batches and dropout"),
    ]:
        default = DEFAULTS[flag[2:].replace("-", "_")]
        default = "--max-iters" if default is None else default
        group.add_argument(flag, metavar=metavar, type=kind, help=f"{text} ({default})")


def make_config(args, saved=None):
    """The training configuration: given flags, else the saved run's values, else DEFAULTS."""
    config = dict(DEFAULTS)
    if saved:
        config.update({k: v for k, v in saved.items() if k in DEFAULTS})
    for key in DEFAULTS:
        value = getattr(args, key, None)
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


def prepare(args):
    """Check everything that can be wrong before any training: text, flags, --out."""
    out = Path(args.out)
    text = read_text(args.text)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    has_model = (out / "hparams.json").exists() or (out / "resume").exists()
    if args.resume:
        if not (out / "resume" / "checkpoint").exists():
            raise TrainingError(f"{out}: nothing to resume (no resume/ state from a run)")
        try:
            saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
            tokenizer = CharTokenizer.load(out)
        except (OSError, ValueError) as e:
            raise TrainingError(f"{out}: cannot resume: {e}") from None
        config = make_config(args, saved)
    else:
        if has_model:
            raise TrainingError(f"{out} already holds a model: --resume continues it, or "
                                "choose another --out")
        tokenizer = CharTokenizer.from_text(text)
        config = make_config(args)
    try:
        ids = np.array(tokenizer.encode(text), np.uint16 if tokenizer.n_vocab < 65536 else np.int32)
    except ValueError as e:  # resuming on a text with characters the model does not know
        raise TrainingError(f"{args.text}: {e}") from None
    train_data, val_data = split_data(ids)
    need = config["block_size"] + 1
    if len(val_data) < need:
        raise TrainingError(
            f"{args.text} is too short for --block-size {config['block_size']}: its last 10% "
            f"({len(val_data)} characters) must hold a window of {need}")
    return config, tokenizer, (train_data, val_data)


def run(args):
    """`picogpt train`: exit status 0, 2 for bad input, 130 when interrupted."""
    try:
        config, tokenizer, data = prepare(args)
    except TrainingError as e:
        print(f"picogpt train: error: {e}", file=sys.stderr)
        return 2
    config["command"] = command_line(args.text, args.out, config)
    trainer = Trainer(config, tokenizer, args.out)
    if args.resume:
        try:
            trainer.load_state()
        except TrainingError as e:
            print(f"picogpt train: error: {e}", file=sys.stderr)
            return 2
    else:
        trainer.initialize()
    n_params = trainer.flat.size
    print(f"{n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB), {tokenizer.n_vocab} "
          f"characters, {len(data[0]):,} training and {len(data[1]):,} validation characters"
          + (f"; resuming at iter {trainer.iter}" if args.resume else ""))  # fmt: skip
    status = _Status(sys.stdout, config["log_interval"])
    try:
        train(trainer, data, report=status.report, status=status.update, resumed=args.resume)
    except KeyboardInterrupt:
        status.report(f"interrupted at iter {trainer.iter}")
        _say_where(trainer, args, interrupted=True)
        return 130
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        status.report(f"picogpt train: error: cannot save to {trainer.out}: {e}")
        _say_where(trainer, args, interrupted=True)
        return 1
    _say_where(trainer, args)
    return 0


def command_line(text, out, config):
    """The `picogpt train` command that trains this configuration from scratch."""
    flags = [f"--{key.replace('_', '-')} {config[key]}" for key in DEFAULTS
             if config[key] is not None and key != "log_interval"]  # fmt: skip
    where = f"{shlex.quote(str(text))} --out {shlex.quote(str(out))}"
    return f"picogpt train {where} " + " ".join(flags)


def _say_where(trainer, args, interrupted=False):
    out, text = shlex.quote(str(trainer.out)), shlex.quote(str(args.text))
    if math.isfinite(trainer.best_val_loss):
        print(f"best model (val loss {trainer.best_val_loss:.4f}) in {out}; try: "
              f"picogpt --model {out} \"{_sample_prompt(trainer)}\" --n 200")
    if trainer.saved_iter is None:
        return
    if interrupted:
        print(f"picogpt train {text} --out {out} --resume   continues from iter "
              f"{trainer.saved_iter} (the last evaluation)")
    else:
        print(f"picogpt train {text} --out {out} --resume --max-iters N   trains it further")


def _sample_prompt(trainer):
    return "ROMEO:" if "R" in trainer.tokenizer.chars and ":" in trainer.tokenizer.chars else ""


class _Status:
    """Progress: on a terminal one line redrawn at most ten times a second; otherwise a line
    every log_interval steps. Evaluation reports are always whole lines."""

    def __init__(self, stream, log_interval):
        self.stream, self.log_interval = stream, log_interval
        self.tty = stream.isatty()
        self.shown = 0.0
        self.width = shutil.get_terminal_size().columns if self.tty else 0

    def update(self, it, max_iters, loss, ms):
        eta = (max_iters - it) * ms / 1e3
        line = (f"iter {it}/{max_iters}  loss {loss:.4f}  {ms:.1f} ms/iter  "
                f"ETA {_duration(eta)}")  # fmt: skip
        if self.tty:
            now = time.monotonic()
            if now - self.shown >= 0.1 or it == max_iters:
                self.shown = now
                self.stream.write("\r" + line[: self.width - 1] + "\x1b[K")
                self.stream.flush()
        elif it % self.log_interval == 0:
            self.stream.write(line + "\n")
            self.stream.flush()

    def report(self, line):
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
