"""GPT-2's forward pass in NumPy, with a KV cache and row-blocked products.

`params` is a dict of arrays keyed by OpenAI's names (`model/wte`, `model/h0/attn/c_attn/w`, ...),
as a model folder's loader hands them over; `hparams` has `n_vocab, n_ctx, n_embd, n_head,
n_layer`.
Everything is float32: a stray float64 operand would silently make every product several
times slower.

The blocks' weight matrices are copied at load from OpenAI's [n_in, n_out] to [n_out, n_in]
order (see matmul for why) when the copy takes at most half the machine's memory; otherwise they
stay mapped from the file, read through transposed views: slower, but GPT-2 1558M still runs on
an 8 GB laptop. The embeddings, biases and LayerNorm parameters stay as they are.
"""

import contextlib
import ctypes
import functools
import math
import mmap
import os
import re

import numpy as np

from picogpt.gpt2 import parallel

LN_EPS = 1e-5
# Row blocks bound the temporaries of the two products that grow with the input: attention scores
# ([B, n_head, block, T] instead of [B, n_head, T, T]) and the vocabulary projection. A block of
# scores is small enough to stay in a core's L2 cache (1-2 MB) across softmax's passes over it.
ATTN_BLOCK_BYTES = 1 << 20
ATTN_MAX_ROWS = 128
LOGITS_BLOCK_ROWS = 256
SMALL_BATCH = 8  # up to this many rows, products run row by row (see matmul)
# Row-by-row products go through the weights in chunks this large: small enough to stay in cache
# for the next rows, large enough that OpenBLAS still splits each product over two cores (below
# about 2 MB it runs on one, and 4 rows cost 3x one instead of 2x).
MATVEC_CHUNK_BYTES = 3 << 20
TRANSPOSE_ROWS = 16  # rows per band when copying weights into [n_out, n_in] order
# A forward of more rows than SMALL_BATCH splits its passes over the cores (parallel.passes):
# products by their output's columns, at least COLUMN_GRAIN a thread (narrower products lose
# BLAS's speed), LayerNorm by rows, at least ROW_GRAIN a thread, attention by heads.
COLUMN_GRAIN = 32
ROW_GRAIN = 16
GELU_C = math.sqrt(2 / math.pi)
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


def layer_norm(x, g, b, eps=LN_EPS):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * g + b; split by rows over
    the cores (inside parallel.passes)."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    parallel.run(lambda i, j: _layer_norm_rows(rows[i:j], g, b, eps, out[i:j]), len(rows),
                 ROW_GRAIN)  # fmt: skip
    return out.reshape(x.shape)


def _layer_norm_rows(x, g, b, eps, out):
    """layer_norm of x [N, C] into out [N, C], in place there."""
    mean = row_sums(x)
    mean *= 1.0 / x.shape[-1]
    xc = np.subtract(x, mean, out=out)
    var = np.einsum("...i,...i->...", xc, xc)[..., None]
    var *= 1.0 / x.shape[-1]
    var += eps
    rstd = np.reciprocal(np.sqrt(var, out=var), out=var)  # per row: a product, not a division
    xc *= rstd
    xc *= g
    xc += b
    return xc


def gelu_(x):
    """GPT-2's tanh GELU, in place: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    t = x * x  # x*x*x, never x**3: the generic power is many times slower
    t *= GELU_C * 0.044715
    t += GELU_C
    t *= x
    np.tanh(t, out=t)
    t += 1.0
    x *= t
    x *= 0.5
    return x


def matmul(x, wt, out=None):
    """x [M, K] @ wt.T for weights wt [N, K], each output's weights contiguous; into `out` if given.

    Decoding is a matrix-vector product that streams every weight from memory once, and in this
    order OpenBLAS runs it as N dot products over contiguous rows, which stream faster
    (benchmarks/bench_matvec.py) than the column updates it runs over OpenAI's [K, N] order.
    For a few rows (batched decoding) one such product per row beats gemm, which repacks all
    of wt on every call. The rows go through wt in chunks of MATVEC_CHUNK_BYTES: the first row
    streams a chunk from memory and the others find it in cache (GPT-2 1558M's matrices, whole,
    do not fit)."""
    out = np.empty((len(x), wt.shape[0]), np.float32) if out is None else out
    if len(x) > SMALL_BATCH:
        return np.matmul(x, wt.T, out=out)
    # One row, or a transposed view (see GPT) whose rows are strided: wt whole, in one product.
    step = len(wt)
    if len(x) > 1 and wt.flags.c_contiguous:
        step = max(1, MATVEC_CHUNK_BYTES // (wt.shape[1] * 4))
    for start in range(0, len(wt), step):
        chunk = wt[start : start + step]
        for row, row_out in zip(x, out):
            np.matmul(chunk, row, out=row_out[start : start + step])
    return out


def linear(x, wt, b, then=None):
    """x @ wt.T + b over the last axis, for x of any leading shape; then `then(out_columns,
    start, stop)` on each part of the output's columns (an elementwise epilogue: GELU, a
    residual add). The output's columns are split over the cores (inside parallel.passes)."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((len(rows), wt.shape[0]), np.float32)

    def columns(start, stop):
        o = matmul(rows, wt[start:stop], out=out[:, start:stop])
        o += b[start:stop]
        if then is not None:
            then(o, start, stop)

    parallel.run(columns, len(wt), COLUMN_GRAIN)
    return out.reshape(*x.shape[:-1], wt.shape[0])


def gelu_columns(o, start, stop):
    """linear's epilogue for the MLP: GELU on each part of the output."""
    gelu_(o)


def add_into(x):
    """linear's epilogue for a residual: x[:, start:stop] += each part of the output ([N, C]
    rows of x)."""
    rows = x.reshape(-1, x.shape[-1])

    def add(o, start, stop):
        rows[:, start:stop] += o

    return add


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


def attention(q, k, v, offset, out=None):
    """Causal attention. q: [B, H, Tq, hd] holds positions offset..offset+Tq-1 (already scaled by
    1/sqrt(hd)); k, v: [B, H, offset+Tq, hd]. Query rows go in blocks, each seeing only the keys up
    to its last row's position: no [Tq, Tk] score matrix is ever whole, and the blocks skip most
    of the masked upper triangle instead of computing it. Into `out` [B, H, Tq, hd] if given
    (a view: the heads of a [B, Tq, H, hd] array).

    softmax(s) v = (exp(s - max) v) / sum(exp(s - max)): the division is done on the [rows, hd]
    output, not on the [rows, n_keys] weights, a pass over memory fewer. The future keys' scores
    are -inf before the max (so it is over the past), and their weights, e^SOFTMAX_FLOOR after
    the floor, are multiplied by 0 (so they are exactly 0)."""
    B, H, Tq, hd = q.shape
    out = np.empty_like(q) if out is None else out
    per_row = B * H * k.shape[2] * 4
    block = max(1, min(Tq, ATTN_BLOCK_BYTES // per_row, ATTN_MAX_ROWS))
    mask = past = None  # one query (decoding) sees every key
    if Tq > 1:
        mask = causal_mask(block)
        past = past_mask(block)
    for start in range(0, Tq, block):
        stop = min(Tq, start + block)
        n_keys = offset + stop
        rows = stop - start
        scores = q[:, :, start:stop] @ k[:, :, :n_keys].swapaxes(-1, -2)  # [B, H, rows, n_keys]
        own = scores[..., n_keys - rows :]  # this block's own keys, where the future is
        if mask is not None:
            own += mask[:rows, :rows]
        shifted_exp_(scores)
        if mask is not None:
            own *= past[:rows, :rows]
        sums = row_sums(scores)  # [B, H, rows, 1]
        o = np.matmul(scores, v[:, :, :n_keys], out=out[:, :, start:stop])
        o /= sums
    return out


def transposed(w):
    """A contiguous copy of w.T, made in bands of TRANSPOSE_ROWS rows of w, so that each row of
    the copy takes one cache line per band. A plain w.T copy reads whole columns, a page per
    row of w, more pages than the TLB holds, and runs several times slower."""
    out = np.empty(w.shape[::-1], w.dtype)
    for start in range(0, w.shape[0], TRANSPOSE_ROWS):
        out[:, start : start + TRANSPOSE_ROWS] = w[start : start + TRANSPOSE_ROWS].T
    return out


def project(x, wte):
    """Logits x @ wte.T for x [..., C] and wte [n_vocab, C], in row blocks into one output; the
    vocabulary split over the cores (inside parallel.passes)."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((len(rows), wte.shape[0]), np.float32)

    def vocabulary(start, stop):
        for first in range(0, len(rows), LOGITS_BLOCK_ROWS):
            last = first + LOGITS_BLOCK_ROWS
            matmul(rows[first:last], wte[start:stop], out=out[first:last, start:stop])

    parallel.run(vocabulary, len(wte), COLUMN_GRAIN)
    return out.reshape(*x.shape[:-1], -1)


def physical_memory():
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel.
    Process-wide: the engine and training call it, as they start.

    A prefill or a training step allocates and frees the same few MB of activations each time.
    By default glibc returns large blocks to the kernel (munmap, heap trimming) and the next call
    faults them back in, zeroed, 4 KB at a time: thousands of page faults each (benchmarks/
    README.md has what that cost). The price is that the heap stays at its peak. Does nothing
    where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (the most) from the heap
    except (OSError, AttributeError):
        pass


def lazy_zeros(shape):
    """float32 zeros whose memory is committed only where written, a 4 KB page at a time.

    np.zeros would do for small arrays, but NumPy asks the kernel for 2 MB huge pages on large
    ones, so the first key written into each head's slab of a KV cache commits 2 MB: a batched
    cache commits hundreds of MB before it holds a token. An anonymous map has no such advice."""
    n_bytes = math.prod(shape) * 4
    if n_bytes == 0:
        return np.zeros(shape, np.float32)
    return np.frombuffer(mmap.mmap(-1, n_bytes), np.float32).reshape(shape)


def param_shapes(hparams):
    """Every tensor of a GPT-2 checkpoint: OpenAI's name -> shape, in the network's order."""
    d = hparams["n_embd"]
    shapes = {"model/wte": (hparams["n_vocab"], d), "model/wpe": (hparams["n_ctx"], d)}
    for i in range(hparams["n_layer"]):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": (d,), p + "ln_1/b": (d,),
            p + "attn/c_attn/w": (1, d, 3 * d), p + "attn/c_attn/b": (3 * d,),
            p + "attn/c_proj/w": (1, d, d), p + "attn/c_proj/b": (d,),
            p + "ln_2/g": (d,), p + "ln_2/b": (d,),
            p + "mlp/c_fc/w": (1, d, 4 * d), p + "mlp/c_fc/b": (4 * d,),
            p + "mlp/c_proj/w": (1, 4 * d, d), p + "mlp/c_proj/b": (d,),
        })  # fmt: skip
    shapes.update({"model/ln_f/g": (d,), "model/ln_f/b": (d,)})
    return shapes


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to n_ctx
    (reserved, not committed: see lazy_zeros)."""

    def __init__(self, n_layer, batch, n_head, n_ctx, head_dim):
        shape = (batch, n_head, n_ctx, head_dim)
        self.k = [lazy_zeros(shape) for _ in range(n_layer)]
        self.v = [lazy_zeros(shape) for _ in range(n_layer)]
        self.length = 0
        self.n_ctx = n_ctx

    @property
    def batch(self):
        return self.k[0].shape[0]

    def expand(self, batch):
        """A new cache holding `batch` copies of this batch-1 cache's contents."""
        n_layer, (_, n_head, n_ctx, head_dim) = len(self.k), self.k[0].shape
        new = KVCache(n_layer, batch, n_head, n_ctx, head_dim)
        for src, dst in zip(self.k + self.v, new.k + new.v):
            dst[:, :, : self.length] = src[:, :, : self.length]
        new.length = self.length
        return new


HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def check_hparams(hparams):
    """Raise ValueError unless `hparams` gives GPT-2's five sizes as positive integers, with
    n_embd a multiple of n_head."""
    for key in HPARAMS:
        if key not in hparams:
            raise ValueError(f"{key} is missing")
        value = hparams[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise ValueError(f"n_embd {hparams['n_embd']} is not divisible by n_head "
                         f"{hparams['n_head']}")


def check_params(params, hparams):
    """Raise ValueError unless `params` are exactly the float32 tensors `hparams` describe.

    Nothing is built from hparams before it is compared with the tensors: n_layer is checked
    against the layers the names show first, so the table of shapes is never longer than the
    checkpoint, and every other size is a tensor's shape the file holds."""
    check_hparams(hparams)
    layers = {m.group(1) for m in map(_LAYER.match, params) if m}
    if hparams["n_layer"] != len(layers):
        raise ValueError(f"n_layer is {hparams['n_layer']} but the checkpoint's tensors are those "
                         f"of {len(layers)} layer(s)")
    expected = param_shapes(hparams)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(params[name].shape)}; these "
                             f"hparams need {shape}")
        if params[name].dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {params[name].dtype}, expected float32")
    extra = sorted(set(params) - expected.keys())
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        shown = ", ".join(map(repr, extra[:3])) + more
        raise ValueError(f"the checkpoint has {len(extra)} tensor(s) that GPT-2 with these "
                         f"hparams does not use: {shown}")


_LAYER = re.compile(r"model/h(\d+)/")


class GPT:
    """GPT-2 over a params dict; `forward` runs new tokens through it, extending a KV cache."""

    def __init__(self, params, hparams, release=None):
        """`release(array)`, if given, is called on each block matrix once its reordered copy is
        made: the loader hands back a mapped file's pages there (the network knows no files)."""
        self.hparams = dict(hparams)
        check_params(params, self.hparams)
        keep_freed_memory()
        self.n_ctx, self.n_head = self.hparams["n_ctx"], self.hparams["n_head"]
        n_embd, n_layer = self.hparams["n_embd"], self.hparams["n_layer"]
        self.head_dim = n_embd // self.n_head
        expected = param_shapes(self.hparams)

        matrices = [name for name in expected if name.startswith("model/h") and name.endswith("/w")]
        ram = physical_memory()
        self.reordered = ram is None or sum(params[n].nbytes for n in matrices) <= ram // 2

        def w(name):
            if not self.reordered:
                return params[name][0].T  # [nf, nx], a view of OpenAI's [nx, nf] order
            wt = transposed(params[name][0])  # [1, nx, nf] -> [nf, nx]
            if release is not None:
                release(params[name])  # the copy is used from now on, not the mapped file
            return wt

        self.wte, self.wpe = params["model/wte"], params["model/wpe"]
        self.ln_f = params["model/ln_f/g"], params["model/ln_f/b"]
        self.blocks = []
        for i in range(n_layer):
            p = f"model/h{i}/"
            self.blocks.append({
                "ln_1": (params[p + "ln_1/g"], params[p + "ln_1/b"]),
                "c_attn": (w(p + "attn/c_attn/w"), params[p + "attn/c_attn/b"]),
                "c_proj": (w(p + "attn/c_proj/w"), params[p + "attn/c_proj/b"]),
                "ln_2": (params[p + "ln_2/g"], params[p + "ln_2/b"]),
                "c_fc": (w(p + "mlp/c_fc/w"), params[p + "mlp/c_fc/b"]),
                "mlp_proj": (w(p + "mlp/c_proj/w"), params[p + "mlp/c_proj/b"]),
            })  # fmt: skip

    def new_cache(self, batch=1, length=None):
        """An empty cache for `batch` rows of up to `length` (default n_ctx) positions."""
        length = self.n_ctx if length is None else length
        return KVCache(len(self.blocks), batch, self.n_head, length, self.head_dim)

    def forward(self, ids, cache, all_logits=False):
        """Run `ids` ([B, T] ints, positions cache.length..) through the network, appending their
        keys and values to `cache`. Returns logits [B, n_vocab] of the last position, or
        [B, T, n_vocab] with all_logits (computed in row blocks). More than SMALL_BATCH rows
        (a prefill) split each pass over the cores; fewer (decoding) leave the products to
        BLAS's threads and the short passes whole."""
        ids = np.asarray(ids)
        B, T = ids.shape
        if cache.length + T > cache.n_ctx:
            raise ValueError(f"{cache.length + T} positions do not fit a cache of {cache.n_ctx}")
        if B != cache.batch:
            raise ValueError(f"batch of {B} rows for a cache of {cache.batch}")
        with parallel.passes() if B * T > SMALL_BATCH else contextlib.nullcontext():
            return self._forward(ids, cache, all_logits)

    def _forward(self, ids, cache, all_logits):
        B, T = ids.shape
        start = cache.length
        x = self.wte[ids] + self.wpe[start : start + T]  # [B, T, C]
        for layer, blk in enumerate(self.blocks):
            h = layer_norm(x, *blk["ln_1"])
            qkv = linear(h, *blk["c_attn"])  # [B, T, 3C]
            q, k, v = qkv.reshape(B, T, 3, self.n_head, self.head_dim).transpose(2, 0, 3, 1, 4)
            a = self.attend(q, k, v, cache, layer)  # each [B, H, T, hd] -> [B, T, C]
            linear(a, *blk["c_proj"], then=add_into(x))  # x += a @ c_proj
            h = layer_norm(x, *blk["ln_2"])
            f = linear(h, *blk["c_fc"], then=gelu_columns)  # [B, T, 4C]
            linear(f, *blk["mlp_proj"], then=add_into(x))  # x += f @ mlp_proj
        cache.length = start + T
        if not all_logits:
            return project(layer_norm(x[:, -1], *self.ln_f), self.wte)  # [B, V]: the last row
        return project(layer_norm(x, *self.ln_f), self.wte)

    def attend(self, q, k, v, cache, layer):
        """Append k, v [B, H, T, hd] to the layer's cache and attend q over it: [B, T, C]. The
        heads are split over the cores (inside parallel.passes)."""
        B, H, T, hd = q.shape
        start = cache.length
        scale = np.float32(1.0 / math.sqrt(hd))
        out = np.empty((B, T, H, hd), np.float32)
        heads_out = out.transpose(0, 2, 1, 3)  # [B, H, T, hd], a view of out

        def heads(i, j):
            keys, values = cache.k[layer][:, i:j], cache.v[layer][:, i:j]
            keys[:, :, start : start + T] = k[:, i:j]
            values[:, :, start : start + T] = v[:, i:j]
            attention(q[:, i:j] * scale, keys[:, :, : start + T], values[:, :, : start + T],
                      start, out=heads_out[:, i:j])  # fmt: skip

        parallel.run(heads, H)
        return out.reshape(B, T, H * hd)
