"""GPT-2's layers for training: each forward beside its backward, as in llm.c.

A forward returns its output and what its backward needs, as a named tuple (a `...Cache`); the
backward takes the gradient of the output and that cache, writes the parameters' gradients into
the buffers it is given and returns the gradient of the input. The tests check every pair
against finite differences (float64) and the whole network against PyTorch's autograd.

Activations are [N, C] matrices, N = batch * block_size rows, so every product is one 2-D BLAS
call; attention alone works on [B, n_head, T, head_dim]. `params` and `grads` are dicts keyed by
OpenAI's tensor names (engine.param_shapes), weights as the checkpoint stores them ([1, nx, nf]).
"""

import functools
import math
from typing import NamedTuple

import numpy as np

from picogpt.gpt2 import engine
from picogpt.gpt2.engine import GELU_C, LN_EPS, causal_mask, past_mask

GELU_A = 0.044715


def column_sums(x, out):
    """x.sum(axis=0) of x [N, F] into out [F], as ones(N) @ x: BLAS's matrix-vector product,
    several times faster than NumPy's reduction over rows (and summed more accurately)."""
    return np.matmul(_ones(len(x), x.dtype), x, out=out)


@functools.lru_cache(maxsize=16)
def _ones(n, dtype):
    ones = np.ones(n, dtype)
    ones.setflags(write=False)
    return ones


# --- embedding ---------------------------------------------------------------------------------


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
    # Each token's rows summed, then added to its row once: the rows sorted by token, and
    # np.add.reduceat over each token's run: faster than np.add.at's element-by-element loop.
    ids = idx.reshape(-1)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # where each token's run begins
    dwte[ids[starts]] += np.add.reduceat(dx.reshape(B * T, -1)[order], starts, axis=0)


# --- layer norm --------------------------------------------------------------------------------


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # [N, C]: the input normalised, before the gain and bias
    rstd: np.ndarray  # [N, 1]: 1 / sqrt(var + eps) per row


def layer_norm_forward(x, g, b):
    """(x - mean) / sqrt(var + eps) * g + b over the last axis of x [N, C]."""
    xhat = x - engine.row_sums(x) / x.shape[-1]
    var = np.einsum("ij,ij->i", xhat, xhat)[:, None] / x.shape[-1]
    rstd = 1.0 / np.sqrt(var + LN_EPS)  # [N, 1]
    xhat *= rstd
    return xhat * g + b, LayerNormCache(xhat, rstd)


def layer_norm_output(cache, g, b):
    """The forward's output again, from its cache: cheaper to recompute than to keep."""
    return cache.xhat * g + b


def layer_norm_backward(dout, cache, g, dg, db):
    xhat, rstd = cache
    np.einsum("ij,ij->j", dout, xhat, out=dg)
    column_sums(dout, db)
    dxhat = dout * g
    # The mean and the variance depend on every x of the row: the gradient loses its row mean
    # and its component along xhat.
    C = dout.shape[-1]
    mean_dxhat = engine.row_sums(dxhat) / C
    mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xhat)[:, None] / C
    dxhat -= mean_dxhat
    dxhat -= xhat * mean_dxhat_xhat
    dxhat *= rstd
    return dxhat


# --- linear ------------------------------------------------------------------------------------


def linear_forward(x, w, b):
    """x [N, nx] @ w [nx, nf] + b."""
    out = x @ w
    out += b
    return out


def linear_backward(dout, x, w, dw, db):
    np.matmul(x.T, dout, out=dw)
    column_sums(dout, db)
    return dout @ w.T


# --- softmax and attention ---------------------------------------------------------------------

softmax_forward = engine.softmax_  # the engine's: softmax over the last axis, in place


def softmax_backward(dout, y, out=None):
    """dx = y * (dout - sum(dout * y)): the Jacobian diag(y) - y y^T applied to dout, per row.
    Three passes (the row sums, the subtraction, the product), into `out` if given (which may
    be dout)."""
    dx = np.subtract(dout, np.einsum("...i,...i->...", dout, y)[..., None], out=out)
    dx *= y
    return dx


ATTN_ROWS = 128  # query rows per block in training's attention (see attention_forward)


class AttentionCache(NamedTuple):
    q: np.ndarray  # [B, H, T, hd], contiguous, already scaled by 1 / sqrt(hd)
    k: np.ndarray  # [B, H, T, hd], contiguous
    v: np.ndarray  # [B, H, T, hd], contiguous
    probs: list  # per row block, [B, H, rows, stop]: the attention probabilities of its rows
    dropped: list  # per row block, its probabilities after dropout (the same arrays without)
    masks: list  # per row block, its dropout mask (None without dropout)
    scale: float  # 1 / sqrt(hd)
    rows: int  # query rows per block


def attention_forward(qkv, B, T, n_head, dropout=0.0, rng=None, rows=ATTN_ROWS):
    """Causal multi-head self-attention: qkv [B*T, 3C] -> y [B*T, C].

    softmax(q k^T / sqrt(hd) + mask) v, with the mask -inf on future positions. The query rows
    go in blocks of `rows`, each against the keys up to its last row (as the engine's
    engine.attention does): the masked upper triangle beyond the diagonal blocks is neither
    computed nor kept, about half of [T, T] at T = 1024, and a block's softmax passes stay in
    cache. The scale goes on q ([T, hd]) rather than on the scores; the scores' exp is the
    engine's (floored at the row's max - 48: no subnormal weights, see engine.SOFTMAX_FLOOR), or,
    when a block's scores span less than the floor, shifted by each row's score against itself
    instead of its max (the same softmax; nothing to floor). The future's weights are then
    multiplied by 0, so their probabilities are exactly 0, and so are the gradients flowing to
    them."""
    C = qkv.shape[-1] // 3
    hd = C // n_head
    # Each [B, H, T, hd], copied contiguous: NumPy multiplies stacks of strided matrices (views
    # into qkv) without BLAS, 7x slower at GPT-2 124M's shapes.
    q, k, v = np.ascontiguousarray(qkv.reshape(B, T, 3, n_head, hd).transpose(2, 0, 3, 1, 4))
    scale = np.float32(1.0 / math.sqrt(hd))
    q *= scale  # in the copy: [T, hd] multiplies instead of [T, T]
    rows = min(rows, T)
    future, past = causal_mask(rows), past_mask(rows)  # the engine's: -inf / 0 above the diagonal
    out = np.empty((B * T, C), q.dtype)
    y = out.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd], a view of out
    probs, dropped, masks = [], [], []
    for start in range(0, T, rows):
        stop = min(T, start + rows)
        r = stop - start
        att = q[:, :, start:stop] @ k[:, :, :stop].swapaxes(-1, -2)  # [B, H, r, stop]
        own = att[..., start:stop]  # the block's own keys: the diagonal, with the future
        if att.max() - att.min() <= -engine.SOFTMAX_FLOOR:
            # The block's scores (the future's too) span less than the floor, so shifted by any
            # of them, by each row's own score against itself say, exp stays within
            # e^(+-SOFTMAX_FLOOR): nothing to floor, no overflow, and the rows' maxima (a slow
            # reduction over short rows) need not be found. (The row's own score, not the
            # block's max: that would make a row's rounding depend on later positions.)
            att -= np.diagonal(own, axis1=-2, axis2=-1).copy()[..., None]  # (own is a view of att)
            np.exp(att, out=att)
        else:
            own += future[:r, :r]  # the max is over the past
            engine.shifted_exp_(att)
        own *= past[:r, :r]
        sums = engine.row_sums(att)  # [B, H, r, 1]
        att *= np.reciprocal(sums, out=sums)
        att_dropped, mask = dropout_forward(att, dropout, rng)
        # Written into [B*T, C] through its [B, H, T, hd] view: BLAS takes the strided rows as
        # they are, and no copy is left to make.
        np.matmul(att_dropped, v[:, :, :stop], out=y[:, :, start:stop])  # [B, H, r, hd]
        probs.append(att)
        dropped.append(att_dropped)
        masks.append(mask)
    return out, AttentionCache(q, k, v, probs, dropped, masks, scale, rows)


def attention_backward(dy, cache):
    """Block by block as the forward, the last first: a block's rows give dq of its rows, and add
    to dk and dv of the keys they saw. The last block saw all T keys, so it writes dk and dv
    whole and only the others add (with one block, nothing is added)."""
    q, k, v, probs, dropped, masks, scale, rows = cache
    B, H, T, hd = q.shape
    dy = np.ascontiguousarray(dy.reshape(B, T, H, hd).transpose(0, 2, 1, 3))  # [B, H, T, hd]
    out = np.empty((B * T, 3 * H * hd), dy.dtype)  # d qkv, written through [B, H, T, hd] views
    dq, dk, dv = out.reshape(B, T, 3, H, hd).transpose(2, 0, 3, 1, 4)
    parts = np.empty((2, B, H, T, hd), dy.dtype) if T > rows else None  # a narrower block's dk, dv
    for i, start in reversed(list(enumerate(range(0, T, rows)))):
        stop = min(T, start + rows)
        dk_i, dv_i = (dk, dv) if stop == T else parts[:, :, :, :stop]
        dy_rows = dy[:, :, start:stop]  # [B, H, r, hd]
        np.matmul(dropped[i].swapaxes(-1, -2), dy_rows, out=dv_i)
        datt = dy_rows @ v[:, :, :stop].swapaxes(-1, -2)  # [B, H, r, stop]
        if masks[i] is not None:
            datt *= masks[i]  # dropout's backward, in place
        dscores = softmax_backward(datt, probs[i], out=datt)
        np.matmul(dscores, k[:, :, :stop], out=dq[:, :, start:stop])
        np.matmul(dscores.swapaxes(-1, -2), q[:, :, start:stop], out=dk_i)  # (q is scaled)
        if stop < T:
            dk[:, :, :stop] += dk_i
            dv[:, :, :stop] += dv_i
    dq *= scale  # the gradient of the unscaled q
    return out


# --- GELU --------------------------------------------------------------------------------------


class GeluCache(NamedTuple):
    x: np.ndarray  # the input
    gate: np.ndarray  # 0.5 (1 + tanh(c (x + a x^3))), the factor x is multiplied by


def gelu_forward(x):
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(c (x + a x^3))) = x * gate, written as 8 passes over
    [N, 4C]: u = x (c + c a x^2), gate = 0.5 tanh(u) + 0.5, out = x gate. In float32 the gate is
    0 or at least 2^-25 (tanh near -1 steps by 2^-24), so no subnormal comes out of it."""
    gate = x * x  # x*x*x, never x**3 (a slow generic power)
    gate *= GELU_C * GELU_A
    gate += GELU_C
    gate *= x
    np.tanh(gate, out=gate)
    gate *= 0.5
    gate += 0.5
    return x * gate, GeluCache(x, gate)


def gelu_output(cache):
    """The forward's output again, x gate, from its cache: one pass, cheaper than keeping it."""
    return cache.x * cache.gate


def gelu_backward(dout, cache):
    """d/dx = gate + x dgate/dx = gate (1 + (1 - gate) 2 c x (1 + 3 a x^2)), since
    d tanh(u)/du = 1 - tanh^2 = 4 gate (1 - gate): 9 passes over [N, 4C]."""
    x, gate = cache
    dx = x * x
    dx *= 6 * GELU_C * GELU_A
    dx += 2 * GELU_C
    dx *= x  # 2 c x (1 + 3 a x^2)
    dx *= 1.0 - gate
    dx += 1.0
    dx *= gate
    dx *= dout
    return dx


# --- dropout -----------------------------------------------------------------------------------


def dropout_forward(x, p, rng):
    """Zero each element with probability p (rounded to a multiple of 2^-16) and scale the rest by
    1/(1-p); identity at p=0. Returns the output and the mask (None at p=0). The mask is drawn as
    16-bit integers, not floats: a quarter of the random bytes (benchmarks/README.md has the
    measured saving)."""
    if not p:
        return x, None
    cut = round(p * (1 << 16))
    keep = rng.integers(0, 1 << 16, x.shape, dtype=np.uint16) >= cut  # P(keep) = 1 - p
    mask = np.multiply(keep, np.float32((1 << 16) / ((1 << 16) - cut)), dtype=np.float32)
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


# --- the output layer and the loss --------------------------------------------------------------

LOSS_ROWS = 256  # rows of logits [rows, n_vocab] alive at a time: 51 MB for GPT-2's vocabulary
# d loss / d wte gets each row block's part through [VOCAB_ROWS, C] slices: a temporary of
# 12 MB for GPT-2 124M, still in cache when it is added, instead of a second [n_vocab, C].
VOCAB_ROWS = 4096
# Logits more than this far below their row's maximum are raised to it before exp: exp(-60) is
# about 1e-26, so probabilities and their gradient (divided by up to 10^7 rows) stay normal
# floats. Below about exp(-87) float32 goes subnormal, which Intel CPUs compute many times
# slower, and a 50,257-way softmax has thousands of such entries per row. The raised entries
# change a probability by less than 1e-26 absolute (the sum of a row by less than 1e-21).
EXP_FLOOR = np.float32(-60.0)


def classifier_forward(h, wte, targets, dwte=None, rows=LOSS_ROWS):
    """Mean cross-entropy of targets [N] under softmax(h [N, C] @ wte.T); with `dwte`, also the
    backward, in the same pass: dwte is set to d loss / d wte (the output projection's part) and
    d loss / d h [N, C] is returned, else None.

    The logits go `rows` rows at a time, each block becoming its probabilities and then its
    gradient (softmax - one_hot(targets)) / N in place, in one buffer: [N, n_vocab] is never
    whole, and the logits are never recomputed for the backward."""
    N = len(targets)
    total = 0.0
    dh = None if dwte is None else np.empty_like(h)
    dtype = np.result_type(h, wte)  # float32 (float64 in the gradient tests)
    # One buffer for every block: 51 MB for GPT-2's vocabulary, which malloc maps anew for each
    # allocation, so it is faulted in once a call rather than once a block.
    buffer = np.empty((min(rows, N), len(wte)), dtype)
    part = None  # a slice of dwte's contribution from one block, after the first
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        i = np.arange(stop - start)
        block = np.matmul(h[start:stop], wte.T, out=buffer[: stop - start])  # [r, C] -> [r, V]
        block -= block.max(axis=-1, keepdims=True)
        picked = block[i, targets[start:stop]]  # the targets' shifted logits
        # Clip, not np.maximum: with a scalar bound NumPy's maximum takes a much slower loop.
        np.clip(block, EXP_FLOOR, 0.0, out=block)  # block <= 0: the upper bound is moot
        np.exp(block, out=block)
        sums = engine.row_sums(block)  # [r, 1]
        total += float(np.sum(np.log(sums[:, 0]) - picked, dtype=np.float64))
        if dwte is None:
            continue
        block *= 1.0 / (sums * N)  # the probabilities / N
        block[i, targets[start:stop]] -= 1.0 / N  # -> d loss / d logits
        np.matmul(block, wte, out=dh[start:stop])  # [r, V] -> [r, C]
        if start == 0:
            np.matmul(block.T, h[start:stop], out=dwte)  # [V, r] @ [r, C] -> [V, C]
            continue
        if part is None:
            part = np.empty((min(VOCAB_ROWS, len(wte)), h.shape[1]), dtype)
        for v in range(0, len(wte), VOCAB_ROWS):
            w = min(len(wte), v + VOCAB_ROWS) - v
            dwte[v : v + w] += np.matmul(block[:, v : v + w].T, h[start:stop], out=part[:w])
    return total / N, dh
