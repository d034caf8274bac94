"""GPT-2's layers for training: each forward beside its backward, as in llm.c.

A forward returns its output and what its backward needs, as a named tuple (a `...Cache`); the
backward takes the gradient of the output and that cache, writes the parameters' gradients into
the buffers it is given and returns the gradient of the input. The tests check every pair
against finite differences (float64) and the whole network against PyTorch's autograd.

Activations are [N, C] matrices, N = batch * block_size rows, so every product is one 2-D BLAS
call; attention alone works on [B, n_head, T, head_dim]. Inside parallel.passes() each pass is
split over the cores: products by their output's columns, LayerNorm and GELU by rows, attention
by (sequence, head) pairs, the loss by the vocabulary; outside, each runs whole on one thread.
`params` and `grads` are dicts keyed by OpenAI's tensor names (gpt2/params.py), weights as
the checkpoint stores them ([1, nx, nf]).
"""

import math
from typing import NamedTuple

import numpy as np

from picogpt.gpt2 import kernels, parallel
from picogpt.gpt2.kernels import (
    SOFTMAX_FLOOR,
    causal_mask,
    column_grain,
    column_sums,
    gelu_gate,
    normalize,
    pair_grain,
    past_mask,
    row_grain,
    row_sums,
)

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
    """(x - mean) / sqrt(var + eps) * g + b over the last axis of x [N, C] (kernels.normalize,
    as the engine's LayerNorm)."""
    out, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((len(x), 1), x.dtype)

    def rows(i, j):
        rstd[i:j] = normalize(x[i:j], xhat[i:j])
        np.multiply(xhat[i:j], g, out=out[i:j])
        out[i:j] += b

    parallel.run(rows, len(x), row_grain(x.shape[1]))
    return out, LayerNormCache(xhat, rstd)


def layer_norm_output(cache, g, b):
    """The forward's output again, from its cache: cheaper to recompute than to keep."""
    out = np.empty_like(cache.xhat)

    def rows(i, j):
        np.multiply(cache.xhat[i:j], g, out=out[i:j])
        out[i:j] += b

    parallel.run(rows, len(out), row_grain(out.shape[1]))
    return out


def layer_norm_backward(dout, cache, g, dg, db):
    """dg = sum(dout xhat), db = sum(dout) over rows; dx = rstd (dxhat - mean(dxhat) - xhat
    mean(dxhat xhat)) with dxhat = dout g: the mean and the variance depend on every x of the
    row, so the gradient loses its row mean and its component along xhat. Each thread sums its
    rows' dg and db, added up after."""
    xhat, rstd = cache
    C = dout.shape[-1]
    dx = np.empty_like(dout)

    def rows(i, j):
        d, xh = dout[i:j], xhat[i:j]
        part = np.einsum("ij,ij->j", d, xh), column_sums(d, np.empty(C, d.dtype))
        dxhat = np.multiply(d, g, out=dx[i:j])
        mean_dxhat = row_sums(dxhat) / C
        mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xh)[:, None] / C
        dxhat -= mean_dxhat
        dxhat -= xh * mean_dxhat_xhat
        dxhat *= rstd[i:j]
        return part

    parts = parallel.run(rows, len(dout), row_grain(C))
    dg[...], db[...] = parts[0]
    for part_dg, part_db in parts[1:]:
        dg += part_dg
        db += part_db
    return dx


# --- linear ------------------------------------------------------------------------------------


def linear_forward(x, w, b):
    """x [N, nx] @ w [nx, nf] + b."""
    out = np.empty((len(x), w.shape[1]), np.result_type(x, w))

    def columns(i, j):
        np.matmul(x, w[:, i:j], out=out[:, i:j])
        out[:, i:j] += b[i:j]

    parallel.run(columns, w.shape[1], column_grain(len(x), w.shape[0]))
    return out


def linear_backward(dout, x, w, dw, db):
    """dw = x^T dout and db = sum(dout) over rows, split by dw's columns; dx = dout w^T, split by
    dx's columns."""

    def weight_columns(i, j):
        np.matmul(x.T, dout[:, i:j], out=dw[:, i:j])
        column_sums(dout[:, i:j], db[i:j])

    parallel.run(weight_columns, w.shape[1], column_grain(len(x), x.shape[1]))
    dx = np.empty((len(dout), w.shape[0]), np.result_type(dout, w))
    parallel.run(lambda i, j: np.matmul(dout, w[i:j].T, out=dx[:, i:j]), w.shape[0],
                 column_grain(len(dout), w.shape[1]))  # fmt: skip
    return dx


# --- softmax and attention ---------------------------------------------------------------------

softmax_forward = kernels.softmax_  # the engine's: softmax over the last axis, in place


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
    cache. The scale goes on q ([T, hd]) rather than on the scores. The (sequence, head) pairs
    are split over the cores (inside parallel.passes; without dropout, whose mask is drawn in
    order from one generator)."""
    C = qkv.shape[-1] // 3
    hd = C // n_head
    # Each [B, H, T, hd], copied contiguous: NumPy multiplies stacks of strided matrices (views
    # into qkv) without BLAS, 7x slower at GPT-2 124M's shapes.
    q, k, v = np.ascontiguousarray(qkv.reshape(B, T, 3, n_head, hd).transpose(2, 0, 3, 1, 4))
    scale = np.float32(1.0 / math.sqrt(hd))
    q *= scale  # in the copy: [T, hd] multiplies instead of [T, T]
    rows = min(rows, T)
    out = np.empty((B * T, C), q.dtype)
    y = out.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)  # [B, H, T, hd], a view of out
    spans = [(start, min(T, start + rows)) for start in range(0, T, rows)]
    probs = [np.empty((B, n_head, stop - start, stop), q.dtype) for start, stop in spans]
    dropped, masks = list(probs), [None] * len(spans)

    def pairs(first, last):
        for b, h in _pair_slices(first, last, n_head):
            for i, (start, stop) in enumerate(spans):
                p = probs[i][b, h]
                _attention_probs(q[b, h, start:stop], k[b, h, :stop], start, rows, out=p)
                if dropout:
                    dropped[i], masks[i] = dropout_forward(p, dropout, rng)
                # Written into [B*T, C] through its [B, H, T, hd] view: BLAS takes the strided
                # rows as they are, and no copy is left to make.
                np.matmul(dropped[i][b, h], v[b, h, :stop], out=y[b, h, start:stop])

    if dropout:
        pairs(0, B * n_head)
    else:
        parallel.run(pairs, B * n_head, pair_grain(T, T))
    return out, AttentionCache(q, k, v, probs, dropped, masks, scale, rows)


def _pair_slices(first, last, n_head):
    """(b, h) index pairs of slices covering the (sequence, head) pairs first..last-1 in
    sequence-major order: whole sequences where the range holds them."""
    if first % n_head == 0 and last % n_head == 0:
        yield slice(first // n_head, last // n_head), slice(None)
        return
    while first < last:
        b, h = divmod(first, n_head)
        stop = min(last, (b + 1) * n_head)
        yield slice(b, b + 1), slice(h, h + stop - b * n_head)
        first = stop


def _attention_probs(q, k, start, rows, out):
    """The attention probabilities [..., r, stop] of q's rows start..start+r-1 over k's keys
    0..stop-1, into `out`. The scores' exp is the engine's (floored at the row's max - 48: no
    subnormal weights, see kernels.SOFTMAX_FLOOR), or, when the scores span less than the floor,
    shifted by each row's score against itself instead of its max (the same softmax; nothing to
    floor). The future's weights are then multiplied by 0, so their probabilities are exactly 0,
    and so are the gradients flowing to them."""
    r, stop = out.shape[-2:]
    att = np.matmul(q, k.swapaxes(-1, -2), out=out)  # [..., r, stop]
    own = att[..., start:stop]  # the block's own keys: the diagonal, with the future
    if att.max() - att.min() <= -SOFTMAX_FLOOR:
        # The scores (the future's too) span less than the floor, so shifted by any of them, by
        # each row's own score against itself say, exp stays within e^(+-SOFTMAX_FLOOR):
        # nothing to floor, no overflow, and the rows' maxima (a slow reduction over short rows)
        # need not be found. (The row's own score, not the block's max: that would make a row's
        # rounding depend on later positions.)
        att -= np.diagonal(own, axis1=-2, axis2=-1).copy()[..., None]  # (own is a view of att)
        np.exp(att, out=att)
    else:
        own += causal_mask(rows)[:r, :r]  # the max is over the past
        kernels.shifted_exp_(att)
    own *= past_mask(rows)[:r, :r]
    sums = row_sums(att)  # [..., r, 1]
    att *= np.reciprocal(sums, out=sums)
    return att


def attention_backward(dy, cache):
    """Block by block as the forward, the last first: a block's rows give dq of its rows, and add
    to dk and dv of the keys they saw. The last block saw all T keys, so it writes dk and dv
    whole and only the others add (with one block, nothing is added). The (sequence, head) pairs
    are split over the cores (inside parallel.passes)."""
    q, k, v, probs, dropped, masks, scale, rows = cache
    B, H, T, hd = q.shape
    dy = np.ascontiguousarray(dy.reshape(B, T, H, hd).transpose(0, 2, 1, 3))  # [B, H, T, hd]
    out = np.empty((B * T, 3 * H * hd), dy.dtype)  # d qkv, written through [B, H, T, hd] views
    dq, dk, dv = out.reshape(B, T, 3, H, hd).transpose(2, 0, 3, 1, 4)
    spans = [(start, min(T, start + rows)) for start in range(0, T, rows)]

    def pairs(first, last):
        for b, h in _pair_slices(first, last, H):
            shape = q[b, h].shape  # [b, h, T, hd]
            parts = np.empty((2, *shape), dy.dtype) if T > rows else None  # a block's dk, dv
            for i, (start, stop) in reversed(list(enumerate(spans))):
                dk_i, dv_i = (dk[b, h], dv[b, h]) if stop == T else parts[..., :stop, :]
                dy_rows = dy[b, h, start:stop]  # [b, h, r, hd]
                np.matmul(dropped[i][b, h].swapaxes(-1, -2), dy_rows, out=dv_i)
                datt = dy_rows @ v[b, h, :stop].swapaxes(-1, -2)  # [b, h, r, stop]
                if masks[i] is not None:
                    datt *= masks[i][b, h]  # dropout's backward, in place
                dscores = softmax_backward(datt, probs[i][b, h], out=datt)
                np.matmul(dscores, k[b, h, :stop], out=dq[b, h, start:stop])
                np.matmul(dscores.swapaxes(-1, -2), q[b, h, start:stop], out=dk_i)  # (q scaled)
                if stop < T:
                    dk[b, h, :stop] += dk_i
                    dv[b, h, :stop] += dv_i
            dq[b, h] *= scale  # the gradient of the unscaled q

    parallel.run(pairs, B * H, pair_grain(T, T))
    return out


# --- GELU --------------------------------------------------------------------------------------


class GeluCache(NamedTuple):
    x: np.ndarray  # the input
    gate: np.ndarray  # 0.5 (1 + tanh(c (x + a x^3))), the factor x is multiplied by


def gelu_forward(x):
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(c (x + a x^3))) = x * gate (kernels.gelu_gate, as the
    engine's GELU); keeps x and the gate for the backward."""
    gate, out = np.empty_like(x), np.empty_like(x)

    def rows(i, j):
        np.multiply(x[i:j], gelu_gate(x[i:j], gate[i:j]), out=out[i:j])

    parallel.run(rows, len(x), row_grain(x.shape[1]))
    return out, GeluCache(x, gate)


def gelu_output(cache):
    """The forward's output again, x gate, from its cache: one pass, cheaper than keeping it."""
    out = np.empty_like(cache.x)
    parallel.run(lambda i, j: np.multiply(cache.x[i:j], cache.gate[i:j], out=out[i:j]),
                 len(out), row_grain(out.shape[1]))  # fmt: skip
    return out


def gelu_backward(dout, cache):
    """d/dx = gate + x dgate/dx = gate (1 + (1 - gate) 2 c x (1 + 3 a x^2)), since
    d tanh(u)/du = 1 - tanh^2 = 4 gate (1 - gate): 9 passes over [N, 4C]."""
    x, gate = cache
    dx = np.empty_like(x)

    def rows(i, j):
        d = np.multiply(x[i:j], x[i:j], out=dx[i:j])
        d *= 6 * kernels.GELU_C * kernels.GELU_A
        d += 2 * kernels.GELU_C
        d *= x[i:j]  # 2 c x (1 + 3 a x^2)
        d *= 1.0 - gate[i:j]
        d += 1.0
        d *= gate[i:j]
        d *= dout[i:j]

    parallel.run(rows, len(x), row_grain(x.shape[1]))
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
VOCAB_GRAIN = 1024  # the vocabulary is split over the cores in slices of at least this many rows


def classifier_forward(h, wte, targets, dwte=None, rows=LOSS_ROWS):
    """Mean cross-entropy of targets [N] under softmax(h [N, C] @ wte.T); with `dwte`, also the
    backward, in the same pass: dwte is set to d loss / d wte (the output projection's part) and
    d loss / d h [N, C] is returned, else None.

    The logits go `rows` rows at a time, each block becoming its probabilities and then its
    gradient (softmax - one_hot(targets)) / N in place, in one buffer: [N, n_vocab] is never
    whole, and the logits are never recomputed for the backward. Within a block the vocabulary
    is split over the cores (inside parallel.passes): each thread its slice's logits, their exp
    and their gradient, with each row's max and sum gathered between."""
    N = len(targets)
    total = 0.0
    dh = None if dwte is None else np.empty_like(h)
    dtype = np.result_type(h, wte)  # float32 (float64 in the gradient tests)
    # One buffer for every block: 51 MB for GPT-2's vocabulary, which malloc maps anew for each
    # allocation, so it is faulted in once a call rather than once a block.
    buffer = np.empty((min(rows, N), len(wte)), dtype)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        hb, tb = h[start:stop], targets[start:stop]
        i = np.arange(stop - start)
        block = buffer[: stop - start]

        def logits(a, b, hb=hb, block=block):  # [r, C] -> [r, b - a]; each row's max there
            return np.matmul(hb, wte[a:b].T, out=block[:, a:b]).max(axis=-1, keepdims=True)

        row_max = np.max(parallel.run(logits, len(wte), VOCAB_GRAIN), axis=0)  # [r, 1]
        picked = block[i, tb] - row_max[:, 0]  # the targets' shifted logits

        def exps(a, b, block=block, row_max=row_max):
            part = block[:, a:b]
            part -= row_max
            # Clip, not np.maximum: with a scalar bound NumPy's maximum takes a much slower loop.
            # Floored as attention's exp is (kernels.SOFTMAX_FLOOR): a 50,257-way softmax has
            # thousands of weights per row below float32's normal range, which Intel cores
            # compute many times slower; floored, probabilities / N stay normal for N up to 10^7
            # rows, and each moves by under e^-48 absolute.
            np.clip(part, SOFTMAX_FLOOR, 0.0, out=part)  # part <= 0: the upper bound is moot
            np.exp(part, out=part)
            return row_sums(part)  # [r, 1]

        sums = np.sum(parallel.run(exps, len(wte), VOCAB_GRAIN), axis=0)  # [r, 1]
        total += float(np.sum(np.log(sums[:, 0]) - picked, dtype=np.float64))
        if dwte is None:
            continue
        scale = 1.0 / (sums * N)

        def gradients(a, b, hb=hb, tb=tb, block=block, scale=scale, first=start == 0):
            part = block[:, a:b]
            part *= scale  # the probabilities / N
            mine = (tb >= a) & (tb < b)
            part[np.flatnonzero(mine), tb[mine] - a] -= 1.0 / N  # -> d loss / d logits
            if first:
                np.matmul(part.T, hb, out=dwte[a:b])  # [b - a, r] @ [r, C] -> [b - a, C]
            else:  # added through slices of VOCAB_ROWS rows, not a second [b - a, C]
                tmp = np.empty((min(VOCAB_ROWS, b - a), hb.shape[1]), dtype)
                for v in range(a, b, VOCAB_ROWS):
                    w = min(b, v + VOCAB_ROWS)
                    dwte[v:w] += np.matmul(part[:, v - a : w - a].T, hb, out=tmp[: w - v])
            return part @ wte[a:b]  # this slice's part of d loss / d h [r, C]

        parts = parallel.run(gradients, len(wte), VOCAB_GRAIN)
        dh_block = dh[start:stop]
        dh_block[...] = parts[0]
        for part in parts[1:]:
            dh_block += part
    return total / N, dh
