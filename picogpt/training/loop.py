"""Train a GPT-2 in NumPy: `Trainer` (a model being trained, its optimizer and its run folder)
and `train`, the loop: batches, steps, evaluation, saving, the log. The network's forward and
backward are in picogpt/gpt2/ (network.py composes the layers); the command (`picogpt train`, its
options and messages) is in picogpt/cli/.

    picogpt train input.txt --out weights/my-model          # see `picogpt train --help`
"""

import json
import math
import time

import numpy as np

from picogpt.errors import PicogptError, TrainingError
from picogpt.formats import tf_checkpoint
from picogpt.gpt2 import network, parallel
from picogpt.gpt2.memory import keep_freed_memory
from picogpt.training import resume
from picogpt.training.data import get_batch
from picogpt.training.memory import shards
from picogpt.training.optimizer import AdamW, accumulate, clip_grad_norm, learning_rate, scale_
from picogpt.training.run_folder import STATE_DIR


class Trainer:
    """A model being trained, its optimizer, and the folder it is saved to."""

    def __init__(self, config, hparams, tokenizer, folder, vocabulary):
        keep_freed_memory()  # each step's activations: reused, not faulted in anew every step
        self.config, self.hparams, self.tokenizer = config, dict(hparams), tokenizer
        self.folder, self.vocabulary = folder, vocabulary
        self.out = folder.path
        shapes = network.param_shapes(self.hparams)
        self.flat, self.params = network.flat_views(shapes)
        self.flat_grad, self.grads = network.flat_views(shapes)
        self.shard_grads = []  # (flat, views) of each shard's gradient after the first's
        # With --grad-accum, the micro-batches' gradients are summed here.
        self.grad_sum = np.zeros_like(self.flat) if config["grad_accum"] > 1 else None
        self.optimizer = AdamW(self.flat, network.n_decayed(shapes), config["beta1"],
                               config["beta2"], config["weight_decay"])  # fmt: skip
        self.iter = 0
        self.best_val_loss = math.inf
        self.saved_iter = None  # the iteration of the resume state on disk
        self.saved_model = None  # (iteration, val loss) of the model on disk
        self.vocabulary_saved = False  # the tokenizer's files are written by the first save
        self.record = None  # what the state records of the folder (resume.py), made once

    def initialize(self, params=None):
        """GPT-2's random initialisation, or a copy of `params` (--init's model)."""
        if params is None:
            rng = np.random.default_rng(self.config["seed"])
            network.init_params(self.params, self.hparams, rng)
            return
        for name, array in self.params.items():  # (hub.folder.read_folder checked the shapes)
            array[...] = params[name]
            tf_checkpoint.release(params[name])  # the copy is what is used: unmap the file's pages

    def step(self, x, y, lr, rng):
        """One optimizer step on a batch of grad_accum micro-batches: their mean gradient, as
        one step over the whole batch. The batch's mean loss before the step. Every pass of it
        is split over the cores (parallel.passes)."""
        c = self.config
        n = c["grad_accum"]
        losses = []
        with parallel.passes():
            for i, (xi, yi) in enumerate(zip(np.split(x, n), np.split(y, n))):
                losses.append(self.loss(xi, yi, rng, backward=True))
                if self.grad_sum is not None:
                    accumulate(self.grad_sum, self.flat_grad, first=i == 0)
            grad = self.flat_grad
            if self.grad_sum is not None:
                grad = self.grad_sum
                scale_(grad, 1.0 / n)
            clip_grad_norm(grad, c["grad_clip"])
            self.optimizer.update(grad, lr)
        return float(np.mean(losses))

    def loss(self, x, y, rng=None, backward=False):
        """The mean loss of predicting y [B, T] from x [B, T]; with `backward`, with dropout and
        its gradient in self.flat_grad.

        A small model's sequences go in shards (memory.shards), each shard's forward and backward
        on a thread of its own, into a gradient buffer of its own (the first shard's is
        self.grads); the shards' losses and gradients are then averaged, weighted by their
        sizes: the mean over the whole batch. Each shard draws its dropout from its own
        generator, seeded from `rng`. Otherwise the whole batch goes through once, each pass
        split over the cores."""
        parts = shards(self.hparams, len(x))
        if backward:
            while len(self.shard_grads) < len(parts) - 1:
                self.shard_grads.append(network.flat_views(network.param_shapes(self.hparams)))
            grads = [self.grads] + [views for _, views in self.shard_grads]
        rngs = [rng] * len(parts)
        if rng is not None and len(parts) > 1:
            seed = int(rng.integers(1 << 63))
            rngs = [np.random.default_rng([seed, i]) for i in range(len(parts))]

        def shard(i):
            start, stop = parts[i]
            xs, ys = x[start:stop], y[start:stop]
            if not backward:
                return network.gpt_forward(self.params, self.hparams, xs, ys)[0]
            loss, cache = network.gpt_forward(self.params, self.hparams, xs, ys,
                                              self.config["dropout"], rngs[i], grads=grads[i])
            network.gpt_backward(cache, self.params, self.hparams, grads[i])
            return loss

        with parallel.passes():  # one shard a thread, or the one shard's passes split
            ranges = parallel.run(lambda a, b: [shard(i) for i in range(a, b)], len(parts))
        losses = [loss for part in ranges for loss in part]
        weights = [(stop - start) / len(x) for start, stop in parts]
        if backward and len(parts) > 1:
            scale_(self.flat_grad, weights[0])
            for w, (flat, _) in zip(weights[1:], self.shard_grads):
                scale_(flat, w)
                accumulate(self.flat_grad, flat, first=False)
        return sum(w * loss for w, loss in zip(weights, losses))

    def estimate_loss(self, data, rng):
        """Mean loss over eval_iters random batches, without dropout."""
        c = self.config
        losses = [self.loss(*get_batch(data, c["block_size"], c["batch_size"], rng))
                  for _ in range(c["eval_iters"])]  # fmt: skip
        return float(np.mean(losses))

    # --- the model folder: hparams.json, the tokenizer, train_config.json, the checkpoint, and
    # resume/ (parameters + optimizer state). Checkpoints get a new name each time and the
    # `checkpoint` file, replaced last, is what names the current one: a kill at any moment
    # leaves the previous model (and the previous resume state) whole.

    def save_model(self, val_loss):
        self.folder.write_json("hparams.json", self.hparams)
        self.folder.write_json("train_config.json", self.config)
        if not self.vocabulary_saved:  # once a run: the files a resumed run was checked with
            for name, data in self.vocabulary.items():
                self.folder.write_bytes(name, data)
            self.vocabulary_saved = True
        self.folder.write_checkpoint("", "model.ckpt-", self.iter, self.params)
        self.saved_model = (self.iter, val_loss)

    def save_state(self):
        # The configuration goes with every state, not only with a better model: what a
        # resumed run was given (--lr, --max-iters, ...) is what the next --resume keeps.
        self.folder.write_json("train_config.json", self.config)
        if self.record is None:  # so that --resume can tell a folder edited since
            self.record = resume.as_tensor(resume.describe(self.hparams, self.config,
                                                           self.tokenizer))  # fmt: skip
        tensors = dict(self.params)
        tensors.update({
            "adam/m": self.optimizer.m, "adam/v": self.optimizer.v,
            "train/iter": np.array(self.iter, np.int64),
            "train/best_val_loss": np.array(self.best_val_loss, np.float64),
            resume.RECORD: self.record,
        })  # fmt: skip
        self.folder.write_checkpoint(STATE_DIR, "state.ckpt-", self.iter, tensors)
        self.saved_iter = self.iter

    def load_state(self):
        """The parameters, AdamW's moments and the iteration of the folder's resume state (whose
        every CRC, and its record of the folder, prepare has checked: resume.check_state)."""
        state_dir = self.out / STATE_DIR
        try:
            tensors = tf_checkpoint.read(state_dir)
            for name, array in self.params.items():
                array[...] = _stored(tensors, name, array.shape)
            self.optimizer.m[...] = _stored(tensors, "adam/m", self.flat.shape)
            self.optimizer.v[...] = _stored(tensors, "adam/v", self.flat.shape)
            self.iter = int(_stored(tensors, "train/iter", ()))
            self.best_val_loss = float(_stored(tensors, "train/best_val_loss", ()))
        except PicogptError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        self.optimizer.step = self.saved_iter = self.iter
        if math.isfinite(self.best_val_loss):
            self.saved_model = (None, self.best_val_loss)

    def log(self, record):
        self.folder.record("train_log.jsonl")
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")


def _stored(tensors, name, shape):
    if name not in tensors:
        raise tf_checkpoint.CheckpointError(f"the resume state has no {name!r}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise tf_checkpoint.CheckpointError(
            f"the resume state's {name!r} is {tensors[name].shape}, expected {shape}")
    return tensors[name]


def train(trainer, data, report=print, status=None, resumed=False, busy=None):
    """Train until max_iters: evaluate every eval_interval iterations (and at the end), save the
    model when the validation loss improves and the resume state every time. A resumed run
    starts where its state was saved, just after an evaluation, so it does not repeat it.

    report(line): each evaluation's result. status(iter, max_iters, loss, ms_per_iter, eta): after
    each step, eta the seconds left, the evaluations and saves to come counted at what the last
    one took. busy(what): before an evaluation and each save (a fine-tuned model's take seconds)."""
    c = trainer.config
    train_data, val_data = data
    max_iters = c["max_iters"]
    decay_iters = c["lr_decay_iters"] if c["lr_decay_iters"] is not None else max_iters
    step_ms = []
    first = trainer.iter
    eval_s = 0.0  # what the last evaluation took, with its saves
    busy = busy or (lambda what: None)
    while True:
        it = trainer.iter
        due = it % c["eval_interval"] == 0 or it == max_iters
        if due and not (resumed and it == first):
            t_eval = time.perf_counter()
            busy(f"evaluating at iter {it}")
            eval_rng = np.random.default_rng([c["seed"], 1, it])
            train_loss = trainer.estimate_loss(train_data, eval_rng)
            val_loss = trainer.estimate_loss(val_data, eval_rng)
            ms = float(np.median(step_ms)) if step_ms else None
            improved = val_loss < trainer.best_val_loss
            if improved:
                trainer.best_val_loss = val_loss
                busy(f"saving the model of iter {it}")
                trainer.save_model(val_loss)
            busy(f"saving the resume state of iter {it}")
            trainer.save_state()
            trainer.log({"iter": it, "train_loss": round(train_loss, 4),
                         "val_loss": round(val_loss, 4),
                         "ms_per_iter": None if ms is None else round(ms, 2)})  # fmt: skip
            report(f"iter {it:>{len(str(max_iters))}}: train loss {train_loss:.4f}, "
                   f"val loss {val_loss:.4f}" + (" (best, saved)" if improved else "")
                   + ("" if ms is None else f", {ms:.1f} ms/iter"))  # fmt: skip
            step_ms.clear()
            eval_s = time.perf_counter() - t_eval
        if it >= max_iters:
            return
        rng = np.random.default_rng([c["seed"], 0, it])  # batch and dropout of this iteration
        x, y = get_batch(train_data, c["block_size"], c["batch_size"] * c["grad_accum"], rng)
        lr = learning_rate(it, c["lr"], c["min_lr"], c["warmup_iters"], decay_iters)
        t0 = time.perf_counter()
        loss = trainer.step(x, y, lr, rng)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        trainer.iter = it + 1
        if status is not None:
            ms = float(np.median(step_ms[-50:]))
            eta = (max_iters - trainer.iter) * ms / 1e3
            eta += evaluations_left(trainer.iter, max_iters, c["eval_interval"]) * eval_s
            status(trainer.iter, max_iters, loss, ms, eta)


def evaluations_left(it, max_iters, interval):
    """How many evaluations a run that has made `it` steps has still to make, the one due at `it`
    among them: at each multiple of `interval` from `it` on, and at max_iters."""
    if it > max_iters:
        return 0
    return max_iters // interval - (it - 1) // interval + (max_iters % interval != 0)
