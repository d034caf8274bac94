"""GPT-2's forward pass in NumPy, with a KV cache and row-blocked products.

`params` is a dict of arrays keyed by OpenAI's names (`model/wte`, `model/h0/attn/c_attn/w`, ...),
as a model folder's loader hands them over; `hparams` has `n_vocab, n_ctx, n_embd, n_head,
n_layer`.
Everything is float32: a stray float64 operand would silently make every product several
times slower.

The weight matrices (the blocks' four and wte, which the logits are a product with) are copied
at load into the order decoding streams them fastest (see streaming_copy) when the copies take
at most half the machine's memory; otherwise they stay mapped from the file, read as they are:
slower, but GPT-2 1558M still runs on an 8 GB laptop. The biases and LayerNorm parameters stay
as they are.
"""

import contextlib
import math

import numpy as np

from picogpt.gpt2 import compact, kernels, memory, parallel
from picogpt.gpt2.kernels import (
    SMALL_BATCH,
    causal_mask,
    column_grain,
    gelu_,
    layer_norm,
    matmul,
    past_mask,
    row_sums,
    vector_layer_norm,
)
from picogpt.gpt2.memory import keep_freed_memory, lazy_zeros
from picogpt.gpt2.params import check_params, param_shapes

# Row blocks bound the temporaries of the two products that grow with the input: attention scores
# ([B, n_head, block, T] instead of [B, n_head, T, T]) and the vocabulary projection. A block of
# scores is small enough to stay in a core's L2 cache (1-2 MB) across softmax's passes over it.
ATTN_BLOCK_BYTES = 1 << 20
ATTN_MAX_ROWS = 128
KEYS_COPY_ROWS = 32  # queries from which attention's copy of the keys, transposed, repays itself
LOGITS_BLOCK_ROWS = 256
TRANSPOSE_ROWS = 16  # rows per band when copying weights into [n_out, n_in] order


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

    parallel.run(columns, len(wt), column_grain(len(rows), rows.shape[1]))
    return out.reshape(*x.shape[:-1], wt.shape[0])


def vector_linear(x, wt, b):
    """linear for one row x [C] (a decoding step's): wt @ x + b, one product on BLAS's threads."""
    out = np.matmul(wt, x)
    out += b
    return out


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
    keys_t = k.swapaxes(-1, -2)  # [B, H, hd, Tk]
    if Tq > 1:
        mask = causal_mask(block)
        past = past_mask(block)
    if Tq >= KEYS_COPY_ROWS:  # BLAS multiplies by a contiguous copy faster than by the view
        keys_t = np.ascontiguousarray(keys_t)
    for start in range(0, Tq, block):
        stop = min(Tq, start + block)
        n_keys = offset + stop
        rows = stop - start
        scores = q[:, :, start:stop] @ keys_t[..., :n_keys]  # [B, H, rows, n_keys]
        own = scores[..., n_keys - rows :]  # this block's own keys, where the future is
        if mask is not None:
            own += mask[:rows, :rows]
        kernels.shifted_exp_(scores)
        if mask is not None:
            own *= past[:rows, :rows]
        sums = row_sums(scores)  # [B, H, rows, 1]
        o = np.matmul(scores, v[:, :, :n_keys], out=out[:, :, start:stop])
        o /= sums
    return out


def embed(wte, ids):
    """The token embedding's rows of ids [B, T]: [B, T, C] float32."""
    return wte[ids] if isinstance(wte, np.ndarray) else wte.take(ids)


def streaming_copy(wt, empty=np.empty):
    """A copy of wt [n_out, n_in] (any strides) laid out for decoding, whose matrix-vector products
    stream every weight from memory once: with its longer dimension contiguous, since BLAS streams
    long contiguous rows faster than short ones (benchmarks/bench_matvec.py). It is returned as
    [n_out, n_in] either way: C-ordered (n_out dot products over rows of n_in) where n_in >= n_out,
    else a transposed view of a [n_in, n_out] copy (n_in column updates over rows of n_out).
    The copy is made in `empty(shape, dtype)`: the engine's is an Arena's (memory.Arena)."""
    if streams_by_rows(wt.shape):
        return contiguous(wt, empty)
    return contiguous(wt.T, empty).T


def streams_by_rows(shape):
    """Whether a [n_out, n_in] matrix streams fastest in that order (its rows, n_in long, are
    its longer dimension) rather than transposed (see streaming_copy)."""
    n_out, n_in = shape
    return n_in >= n_out


def contiguous(a, empty=np.empty):
    """A C-ordered copy of a 2-D array, in `empty(a.shape, a.dtype)`: a plain copy where a is
    C-ordered, transposed()'s banded copy where it is a transposed view."""
    out = empty(a.shape, a.dtype)
    if not a.flags.c_contiguous:
        return transposed(a.T, out)
    np.copyto(out, a)
    return out


def transposed(w, out=None):
    """A contiguous copy of w.T (into `out` if given), made in bands of TRANSPOSE_ROWS rows of w,
    so that each row of the copy takes one cache line per band. A plain w.T copy reads whole
    columns, a page per row of w, more pages than the TLB holds, and runs several times slower."""
    out = np.empty(w.shape[::-1], w.dtype) if out is None else out
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

    parallel.run(vocabulary, len(wte), column_grain(len(rows), rows.shape[1]))
    return out.reshape(*x.shape[:-1], -1)


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


class GPT:
    """GPT-2 over a params dict; `forward` runs new tokens through it, extending a KV cache."""

    def __init__(self, params, hparams, release=None, dtype=None):
        """`release(array)`, if given, is called on each weight matrix once its copy is made:
        the loader hands back a mapped file's pages there (the network knows no files).
        `dtype` is what the weight matrices are kept in (compact.DTYPES); None keeps each as
        its tensor is (float32, or a file's float16 / bfloat16)."""
        self.hparams = dict(hparams)
        check_params(params, self.hparams)
        if dtype is not None and dtype not in compact.DTYPES:
            raise ValueError(f"dtype {dtype!r}: one of {', '.join(compact.DTYPES)}")
        keep_freed_memory()
        self.n_ctx, self.n_head = self.hparams["n_ctx"], self.hparams["n_head"]
        n_embd, n_layer = self.hparams["n_embd"], self.hparams["n_layer"]
        self.head_dim = n_embd // self.n_head
        self.scale = np.float32(1 / math.sqrt(self.head_dim))  # attention's queries, scaled
        expected = param_shapes(self.hparams)

        matrices = [name for name in expected if name.startswith("model/h") and name.endswith("/w")]
        matrices.append("model/wte")
        ram = memory.physical_memory()
        self.reordered = ram is None or sum(params[n].nbytes for n in matrices) <= ram // 2
        self.dtype = dtype or compact.dtype_of(params["model/wte"])

        def copied(name):
            """Whether matrix `name` becomes a float32 copy laid out for decoding. Not when it is
            kept compact, nor a float32 file's matrix read in place (not reordered); a 16-bit wte
            that is not reordered is widened whole by compact.converted instead."""
            own = compact.dtype_of(params[name])
            if (dtype or own) != "float32":
                return False
            return self.reordered or (own != "float32" and name != "model/wte")

        # The float32 copies share one buffer on huge pages (memory.Arena).
        sizes = [math.prod(params[name].shape) for name in matrices if copied(name)]
        if sizes:
            empty = memory.Arena(memory.huge_page_buffer(memory.Arena.bytes_for(sizes))).empty
        else:
            empty = np.empty

        def w(name):
            """Block matrix `name` ([1, nx, nf]) as [nf, nx] in `dtype`; a ValueError (a value
            beyond float16's range, say) names the tensor."""
            try:
                return matrix(name)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from e

        def matrix(name):
            tensor = params[name]
            source, own = tensor[0], compact.dtype_of(tensor)
            kind = dtype or own
            if copied(name):  # (a file's float16 / bfloat16 widened first)
                wt = streaming_copy(compact.widened(source).T, empty)
            elif kind == "float32":  # a float32 file's, not reordered
                return source.T  # [nf, nx], a view of OpenAI's [nx, nf] order
            elif kind == own:  # a file's float16 / bfloat16: its 16 bits reordered as they are
                wt = compact.KINDS[kind](transposed(compact.storage(source).view(np.uint16)))
            else:  # compressed a band of rows at a time
                wt = compact.compress(compact.widened(source).T, kind)
            if release is not None:  # the copy is used from now on, not the mapped file
                release(compact.storage(tensor))
            return wt

        wte = params["model/wte"]  # [n_vocab, C] is already [n_out, n_in]
        try:
            if copied("model/wte"):  # [V, C], its V columns contiguous
                self.wte = streaming_copy(compact.widened(wte), empty)
            else:
                self.wte = compact.converted(wte, dtype)
        except ValueError as e:
            raise ValueError(f"tensor 'model/wte': {e}") from e
        if release is not None and not np.may_share_memory(compact.storage(self.wte),
                                                           compact.storage(wte)):
            release(compact.storage(wte))  # a copy: the file's pages are not used
        self.wpe = params["model/wpe"]
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
        BLAS's threads and the short passes whole, unless the weights are compact. One token
        of float32 weights goes through _step, over vectors."""
        ids = np.asarray(ids)
        B, T = ids.shape
        if cache.length + T > cache.n_ctx:
            raise ValueError(f"{cache.length + T} positions do not fit a cache of {cache.n_ctx}")
        if B != cache.batch:
            raise ValueError(f"batch of {B} rows for a cache of {cache.batch}")
        if B * T == 1 and self.dtype == "float32":  # decoding one token (see _step)
            logits = self._step(int(ids[0, 0]), cache)
            return logits[None, None] if all_logits else logits[None]
        # Compact weights are widened on every core, also when decoding.
        split = B * T > SMALL_BATCH or self.dtype != "float32"
        with parallel.passes() if split else contextlib.nullcontext():
            return self._forward(ids, cache, all_logits)

    def _forward(self, ids, cache, all_logits):
        T = ids.shape[1]
        start = cache.length
        x = embed(self.wte, ids) + self.wpe[start : start + T]  # [B, T, C]
        for layer, blk in enumerate(self.blocks):
            # Without all_logits only the last position's output reaches the logits: the last
            # block computes that row alone (every row's keys and values still go to the cache).
            last = layer == len(self.blocks) - 1 and not all_logits
            x = self._block(x, blk, cache, layer, 1 if last else T)
        cache.length = start + T
        if not all_logits:
            return project(layer_norm(x[:, -1], *self.ln_f), self.wte)  # [B, V]: the last row
        return project(layer_norm(x, *self.ln_f), self.wte)

    def _block(self, x, blk, cache, layer, rows):
        """One transformer block, x + attn(ln_1(x)), then + mlp(ln_2(.)), for the last `rows` of
        x's positions: [B, rows, C] (x itself, updated in place, when that is all of them). Every
        position's keys and values go into the cache; queries, attention and the MLP run for
        those rows only, the products of the others' (10 of 12 C^2 per row) skipped."""
        B, T, C = x.shape
        h = layer_norm(x, *blk["ln_1"])
        wt, b = blk["c_attn"]  # [3C, C]: the queries' rows, then the keys', then the values'
        if rows == T:
            qkv = linear(h, wt, b)  # [B, T, 3C]
            q, k, v = qkv.reshape(B, T, 3, self.n_head, self.head_dim).transpose(2, 0, 3, 1, 4)
        else:
            kv = linear(h, wt[C:], b[C:])  # [B, T, 2C]
            k, v = kv.reshape(B, T, 2, self.n_head, self.head_dim).transpose(2, 0, 3, 1, 4)
            q = linear(h[:, T - rows :], wt[:C], b[:C])  # [B, rows, C]
            q = q.reshape(B, rows, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
            x = np.ascontiguousarray(x[:, T - rows :])  # [B, rows, C]
        a = self.attend(q, k, v, cache, layer)  # [B, H, rows, hd], [B, H, T, hd] -> [B, rows, C]
        linear(a, *blk["c_proj"], then=add_into(x))  # x += a @ c_proj
        h = layer_norm(x, *blk["ln_2"])
        f = linear(h, *blk["c_fc"], then=gelu_columns)  # [B, rows, 4C]
        linear(f, *blk["mlp_proj"], then=add_into(x))  # x += f @ mlp_proj
        return x

    def _step(self, token, cache):
        """One token through the network, for decoding: _forward's math over vectors ([C], not
        [1, 1, C]); logits [V]. A decoding step's time is its products' streaming and its NumPy
        calls, each cold after a product has streamed weights through the caches, not their
        math, and this path makes far fewer calls than _forward. The tests hold it to _forward."""
        t = cache.length
        x = self.wte[token] + self.wpe[t]  # [C]
        for layer, blk in enumerate(self.blocks):
            h = vector_layer_norm(x, *blk["ln_1"])
            q, k, v = vector_linear(h, *blk["c_attn"]).reshape(3, self.n_head, self.head_dim)
            x += vector_linear(self._attend_one(q, k, v, cache, layer), *blk["c_proj"])
            h = vector_layer_norm(x, *blk["ln_2"])
            x += vector_linear(gelu_(vector_linear(h, *blk["c_fc"])), *blk["mlp_proj"])
        cache.length = t + 1
        return np.matmul(self.wte, vector_layer_norm(x, *self.ln_f))  # [V]

    def _attend_one(self, q, k, v, cache, layer):
        """attention() for one query, q, k, v [H, hd]: k and v appended to the layer's cache,
        then softmax(q keys^T / sqrt(hd)) over every key so far, times the values: [C]."""
        t = cache.length
        keys = cache.k[layer][0, :, : t + 1]  # [H, t + 1, hd]
        values = cache.v[layer][0, :, : t + 1]
        keys[:, t], values[:, t] = k, v
        scores = (q * self.scale)[:, None] @ keys.swapaxes(-1, -2)  # [H, 1, t + 1]
        kernels.shifted_exp_(scores)
        out = scores @ values  # [H, 1, hd]
        out /= np.add.reduce(scores, axis=-1, keepdims=True)  # one row a head: no einsum needed
        return out.reshape(-1)

    def attend(self, q, k, v, cache, layer):
        """Append k, v [B, H, T, hd] to the layer's cache and attend q [B, H, Tq, hd], the last Tq
        of those T positions, over it: [B, Tq, C]. The heads are split over the cores (inside
        parallel.passes) for more query rows than decoding's: a decoding step's attention is
        shorter than waking a core for it."""
        B, H, Tq, hd = q.shape
        T = k.shape[2]
        start = cache.length
        out = np.empty((B, Tq, H, hd), np.float32)
        heads_out = out.transpose(0, 2, 1, 3)  # [B, H, Tq, hd], a view of out

        def heads(i, j):
            keys, values = cache.k[layer][:, i:j], cache.v[layer][:, i:j]
            keys[:, :, start : start + T] = k[:, i:j]
            values[:, :, start : start + T] = v[:, i:j]
            attention(q[:, i:j] * self.scale, keys[:, :, : start + T], values[:, :, : start + T],
                      start + T - Tq, out=heads_out[:, i:j])  # fmt: skip

        if B * Tq > SMALL_BATCH:
            parallel.run(heads, H, kernels.pair_grain(B * Tq, start + T))
        else:
            heads(0, H)
        return out.reshape(B, Tq, H * hd)
