"""The optimizer: AdamW over the flat parameter buffer (decay on the matrices only), gradient
clipping by the global norm, and the learning-rate schedule (linear warm-up, cosine decay)."""

import math

import numpy as np

from picogpt.gpt2 import parallel

# Elements updated at a time: the block's five arrays (2.5 MB) stay in the L2 and L3 caches
# between the update's dozen NumPy calls, and each call is long enough that the threads seldom
# wait on each other for the GIL (a block 4x smaller made two threads barely faster than one).
ADAM_BLOCK = 1 << 17
ADAM_GRAIN = 2  # blocks a thread takes at least: fewer cost more to hand out than to update
FLAT_GRAIN = 1 << 19  # elements a thread takes at least in a pass over a flat buffer (2 MB)


class AdamW:
    """Adam with decoupled weight decay over one flat parameter buffer (as torch.optim.AdamW):

        p *= 1 - lr * weight_decay            (matrices only: the first n_decay elements)
        m = beta1 m + (1 - beta1) g
        v = beta2 v + (1 - beta2) g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    done ADAM_BLOCK elements at a time: GPT-2 124M's buffers are 500 MB each, and whole-buffer
    expressions would stream them from memory a dozen times and allocate as many temporaries.
    The blocks are split over the cores (inside parallel.passes)."""

    def __init__(self, flat_params, n_decay, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8):
        self.params, self.n_decay = flat_params, n_decay
        self.beta1, self.beta2, self.weight_decay, self.eps = beta1, beta2, weight_decay, eps
        self.m = np.zeros_like(flat_params)
        self.v = np.zeros_like(flat_params)
        self.step = 0

    def update(self, grad, lr):
        self.step += 1
        b1, b2 = self.beta1, self.beta2
        decay = 1.0 - lr * self.weight_decay
        rescale = 1.0 / math.sqrt(1.0 - b2**self.step)
        step_size = lr / (1.0 - b1**self.step)

        def blocks(first, last):  # blocks first..last-1, with a temporary of this thread's
            t = np.empty(min(ADAM_BLOCK, self.params.size), self.params.dtype)
            for start in range(first * ADAM_BLOCK, min(last * ADAM_BLOCK, self.params.size),
                               ADAM_BLOCK):  # fmt: skip
                stop = min(start + ADAM_BLOCK, self.params.size)
                p, g, m, v = (a[start:stop] for a in (self.params, grad, self.m, self.v))
                tmp = t[: stop - start]
                if self.weight_decay and start < self.n_decay:
                    p[: self.n_decay - start] *= decay
                m *= b1
                np.multiply(g, 1.0 - b1, out=tmp)
                m += tmp
                v *= b2
                np.multiply(g, g, out=tmp)
                tmp *= 1.0 - b2
                v += tmp
                np.sqrt(v, out=tmp)
                tmp *= rescale
                tmp += self.eps
                np.divide(m, tmp, out=tmp)
                tmp *= step_size
                p -= tmp

        parallel.run(blocks, -(-self.params.size // ADAM_BLOCK), ADAM_GRAIN)


def clip_grad_norm(grad, max_norm):
    """Scale grad in place so its L2 norm is at most max_norm; the norm before clipping. The sum
    of squares is split over the cores (inside parallel.passes), as is the scaling."""
    squares = parallel.run(lambda i, j: float(np.dot(grad[i:j], grad[i:j])), len(grad), FLAT_GRAIN)
    norm = math.sqrt(sum(squares))
    if max_norm and norm > max_norm:
        scale_(grad, max_norm / (norm + 1e-6))
    return norm


def scale_(x, factor):
    """x *= factor, in place, split over the cores (inside parallel.passes): over a flat buffer
    of every parameter (500 MB for GPT-2 124M) one core alone cannot draw the memory's
    bandwidth."""
    factor = x.dtype.type(factor)
    parallel.run(lambda i, j: np.multiply(x[i:j], factor, out=x[i:j]), len(x), FLAT_GRAIN)


def accumulate(total, grad, first):
    """total = grad (the first micro-batch's) or total += grad, in place, split over the cores
    (inside parallel.passes), as scale_."""
    def part(i, j):
        if first:
            total[i:j] = grad[i:j]
        else:
            total[i:j] += grad[i:j]

    parallel.run(part, len(total), FLAT_GRAIN)


def learning_rate(it, lr, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
