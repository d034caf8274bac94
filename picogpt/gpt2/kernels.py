"""The math both directions of the network run on: the inference engine (engine.py) and the
training layers (layers.py) call these, so a faster kernel speeds up both.

Each takes float32 arrays of any leading shape over the last axis, unless it says otherwise.
Where a kernel is written as an in-place chain for speed, its plain formula is in its docstring.
"""

import functools
import math

import numpy as np

from picogpt.gpt2 import compact, parallel

LN_EPS = 1e-5
SMALL_BATCH = 8  # up to this many rows, products run row by row (see matmul)
# Row-by-row products go through the weights in chunks this large: small enough to stay in cache
# for the next rows, large enough that OpenBLAS still splits each product over two cores (below
# about 2 MB it runs on one, and 4 rows cost 3x one instead of 2x).
MATVEC_CHUNK_BYTES = 3 << 20
# A forward of more rows than SMALL_BATCH splits its passes over the cores (parallel.passes):
# products by their output's columns, at least COLUMN_GRAIN a thread (narrower products lose
# BLAS's speed), LayerNorm and GELU by rows, at least ROW_GRAIN a thread, attention by heads.
# Handing a range to a thread and waiting for it costs tens of microseconds (a wake each way),
# so a range also holds at least SPLIT_MACS multiply-adds of a product or SPLIT_ELEMENTS
# elements of an elementwise pass (attention's scores among them), tens of microseconds of work
# on one core: a smaller pass runs whole (row_grain, column_grain, pair_grain).
COLUMN_GRAIN = 32
ROW_GRAIN = 16
SPLIT_MACS = 1 << 22
SPLIT_ELEMENTS = 1 << 15
GELU_C = math.sqrt(2 / math.pi)
GELU_A = 0.044715
# Softmax weights exp(s - max) below e^-87.3 are subnormal floats, which Intel cores compute with
# dozens of times slower (AMD's barely slow down), and GPT-2's attention rows are full of them. So
# scores more than 48 below their row's maximum are raised to that floor before exp. It is exact
# to float32 rounding: each such probability changes by less than e^-48 = 1.4e-21 absolute, so a
# row's sum (at least 1, the max's own weight) moves by under n x 1.4e-21, far below its half-ulp
# of 6e-8, and an output sum(p v) by under n x 1.4e-21 x max|v|, 1e-13 of float32's resolution.
# A floor this high (not -80) also keeps the products the weights enter out of the subnormal
# range: e^-48 v for any |v| above 1e-17, and training's backward p dp (p >= e^-48 / n) for
# |dp| above 1e-14 in rows of 1024.
SOFTMAX_FLOOR = np.float32(-48.0)
FLOOR_CUT = np.float32(np.exp(-48.0) * (1 + 2**-20))  # just above e^-48 in float32 (see softmax_)


def row_grain(width):
    """Rows a thread takes at least when a pass over rows of `width` elements is split."""
    return max(ROW_GRAIN, -(-SPLIT_ELEMENTS // width))


def column_grain(rows, depth):
    """Output columns a thread takes at least when a product of `rows` rows is split, each
    column `depth` multiply-adds a row."""
    return max(COLUMN_GRAIN, -(-SPLIT_MACS // (rows * depth)))


def pair_grain(rows, keys):
    """(sequence, head) pairs a thread takes at least when attention is split, each pair
    `rows` queries over up to `keys` keys: counted by its scores, whose softmax's passes cost
    more than their products at GPT-2's head sizes."""
    return -(-SPLIT_ELEMENTS // (rows * keys))


def normalize(x, out, eps=LN_EPS):
    """LayerNorm without its gain and bias, row by row of x [N, C]: out = (x - mean) * rstd with
    rstd = 1 / sqrt(var + eps); returns rstd [N, 1] (training keeps it for the backward)."""
    mean = row_sums(x)
    mean *= 1.0 / x.shape[-1]
    xc = np.subtract(x, mean, out=out)
    var = np.einsum("...i,...i->...", xc, xc)[..., None]
    var *= 1.0 / x.shape[-1]
    var += eps
    rstd = np.reciprocal(np.sqrt(var, out=var), out=var)  # per row: a product, not a division
    xc *= rstd
    return rstd


def layer_norm(x, g, b, eps=LN_EPS):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * g + b; split by rows over
    the cores (inside parallel.passes). One row goes through vector_layer_norm."""
    if x.size == x.shape[-1]:
        return vector_layer_norm(x.reshape(-1), g, b, eps).reshape(x.shape)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)

    def part(i, j):
        normalize(rows[i:j], out[i:j], eps)
        out[i:j] *= g
        out[i:j] += b

    parallel.run(part, len(rows), row_grain(rows.shape[1]))
    return out.reshape(x.shape)


def vector_layer_norm(v, g, b, eps=LN_EPS):
    """layer_norm of one row v [C], its mean and variance as scalars: 6 NumPy calls where rows
    take 14. A decoding step's 25 LayerNorms cost less in their math than in their calls."""
    xc = v - np.float32(np.add.reduce(v) / len(v))
    rstd = np.float32(1 / math.sqrt(float(np.dot(xc, xc)) / len(v) + eps))
    xc *= rstd
    xc *= g
    xc += b
    return xc


def gelu_gate(x, out):
    """GPT-2's tanh GELU is x * gate(x), gate = 0.5 (1 + tanh(c (x + a x^3))); this writes the
    gate into out, as 7 passes: u = x (c + c a x^2), gate = 0.5 tanh(u) + 0.5. In float32 the
    gate is 0 or at least 2^-25 (tanh near -1 steps by 2^-24), so no subnormal comes out of it."""
    gate = np.multiply(x, x, out=out)  # x*x*x, never x**3 (a slow generic power)
    gate *= GELU_C * GELU_A
    gate += GELU_C
    gate *= x
    np.tanh(gate, out=gate)
    gate *= 0.5
    gate += 0.5
    return gate


def gelu_(x):
    """GPT-2's tanh GELU in place: x * 0.5 (1 + tanh(c (x + a x^3))) (see gelu_gate)."""
    x *= gelu_gate(x, np.empty_like(x))
    return x


def matmul(x, wt, out=None):
    """x [M, K] @ wt.T for weights wt [N, K]; into `out` if given.

    Decoding is a matrix-vector product that streams every weight from memory once: over a
    C-ordered wt OpenBLAS runs it as N dot products along contiguous rows, over a transposed
    view (wt.T C-ordered) as K column updates along contiguous rows of wt.T; the engine lays
    each matrix out in whichever order has the longer rows (engine.streaming_copy). For a few
    rows (batched decoding) one such product per row beats gemm, which repacks all of wt on
    every call. The rows go through wt in chunks of MATVEC_CHUNK_BYTES: the first row streams
    a chunk from memory and the others find it in cache (GPT-2 1558M's matrices, whole, do not
    fit). A compact wt (gpt2/compact.py) is widened block by block inside the product."""
    out = np.empty((len(x), wt.shape[0]), np.float32) if out is None else out
    if not isinstance(wt, np.ndarray):  # float16, bfloat16 or int8, widened inside
        return compact.matmul(x, wt, out)
    if len(x) > SMALL_BATCH:
        return np.matmul(x, wt.T, out=out)
    if len(x) == 1:  # one row: wt whole, in one product
        np.matmul(wt, x[0], out=out[0])
        return out
    step = max(1, MATVEC_CHUNK_BYTES // (wt.shape[1] * 4))
    for start in range(0, len(wt), step):
        chunk = wt[start : start + step]
        for row, row_out in zip(x, out):
            np.matmul(chunk, row, out=row_out[start : start + step])
    return out


def shifted_exp_(x):
    """exp(x - rowmax(x)) over the last axis, in place, with every weight below e^SOFTMAX_FLOOR
    raised to it (see SOFTMAX_FLOOR): entries in [e^-48, 1], never subnormal. A -inf (masked)
    score's weight is e^-48 too: a caller zeroes those again (attention multiplies them by 0,
    softmax_ subtracts e^-48)."""
    x -= x.max(axis=-1, keepdims=True)
    # Clip, not np.maximum: with a scalar bound NumPy's maximum takes a much slower loop.
    np.clip(x, SOFTMAX_FLOOR, np.float32(0.0), out=x)  # x <= 0 already: the upper bound is moot
    np.exp(x, out=x)
    return x


def row_sums(x):
    """x.sum(axis=-1, keepdims=True), through einsum, whose loop is several times faster than
    ndarray.sum's on rows as short as attention's and LayerNorm's (64-1024)."""
    return np.einsum("...i->...", x)[..., None]


def softmax_(x):
    """Softmax over the last axis, in place: exp(x - max) / sum(exp(x - max)), with probabilities
    below about e^SOFTMAX_FLOOR / sum flushed to exactly 0 (-inf, masked, entries among them).

    The weights shifted_exp_ raised to e^-48 go back to exactly 0 by subtracting a cut a few
    ulps above e^-48 (whatever exp's last bit) and flooring at 0. Every other weight w loses the
    cut too, which changes nothing for w > 2^26 e^-48 (about 1e-13: less than half an ulp), and
    what is left is 0 or at least ulp(e^-48) = 2^-93 (Sterbenz: w - cut is exact for w < 2 cut),
    so no subnormal comes out of the division by the sum (at most n) either."""
    shifted_exp_(x)
    x -= FLOOR_CUT
    np.clip(x, np.float32(0.0), np.float32(1.0), out=x)  # negatives (what was floored) to 0
    x /= row_sums(x)
    return x


@functools.lru_cache(maxsize=8)
def causal_mask(n):
    """[n, n] float32, read-only: 0 on and below the diagonal, -inf above (the future). Made
    once per size: training's attention asks for one each layer of each step."""
    mask = np.triu(np.full((n, n), -np.inf, np.float32), k=1)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8)
def past_mask(n):
    """[n, n] float32, read-only: 1 on and below the diagonal, 0 above (the future)."""
    mask = np.tril(np.ones((n, n), np.float32))
    mask.setflags(write=False)
    return mask


def column_sums(x, out):
    """x.sum(axis=0) of x [N, F] into out [F], as ones(N) @ x: BLAS's matrix-vector product,
    several times faster than NumPy's reduction over rows (and summed more accurately)."""
    return np.matmul(_ones(len(x), x.dtype), x, out=out)


@functools.lru_cache(maxsize=16)
def _ones(n, dtype):
    ones = np.ones(n, dtype)
    ones.setflags(write=False)
    return ones
