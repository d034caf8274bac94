"""Weight matrices kept compact in memory (float16, bfloat16 or int8) and widened to float32 a
cache-sized block of rows at a time, inside the products.

Decoding streams every weight from memory once a token, so fewer bytes a weight means less to
stream, and a model twice or four times larger fits the same memory. BLAS multiplies float32
only: each product widens WIDEN_BYTES of float32 rows into a buffer of its thread's, which stays
in the core's caches, and multiplies that (matmul). Widening is done with NumPy's integer
operations, several times faster than its float16 cast:

- float16: sign-extended, shifted into float32's place and scaled by 2^112 (exact for normal
  and subnormal halves alike), then by 2^112 again, which only infinities' and NaNs' exponent
  overflows (so a damaged weight stays non-finite for the logits check to catch);
- bfloat16: the upper half of a float32, shifted into place;
- int8: symmetric, one float32 scale per block of QBLOCK values along a row (ggml's Q8_0, with
  a float32 scale); a row whose length is not a multiple of QBLOCK ends in a shorter block with
  its own scale.

Decoding's products (a few rows of x) save passes over the weights where the math allows: float16
leaves its last pass, a product by 2^-112, to x and the result, and int8 multiplies each block's
partial sum by its scale instead of every weight.

A matrix is [n_out, n_in], each output's weights contiguous (as the engine orders them); slicing
its rows gives a matrix of the same kind. `compress` makes one from float32; `of_halves` and
`BFloat16` take a file's raw 16-bit data as they are (memory-mapped, never widened whole).
"""

import threading

import numpy as np

DTYPES = ("float32", "float16", "bfloat16", "int8")
QBLOCK = 32  # int8 values per scale
# float32 bytes widened at a time for a few rows. Each band is a few NumPy calls, and a thread
# takes the GIL back at the end of each: the longer the calls, the less threads wait on each
# other for it (a wait that sends a core to sleep, and waking it costs tens of microseconds). A
# band a few times the core's L2 still finds its rows in L2 or L3 for the product.
WIDEN_BYTES = 4 << 20
PRODUCT_ROWS = 256  # rows of weights widened at least at a time for many rows
FEW_ROWS = 8  # up to this many rows of x (as kernels.SMALL_BATCH), decoding's Compact.product
_buffers = threading.local()  # each thread's widening buffers, reused


class Compact:
    """A [n_out, n_in] weight matrix in a compact dtype: `data` holds the values (and `scales`
    int8's block scales); `widen(out)` writes it as float32 into out, and `product(x, out)` is
    decoding's x @ it.T."""

    dtype = None

    def __init__(self, data, scales=None):
        self.data, self.scales = data, scales

    @property
    def shape(self):
        return self.data.shape

    @property
    def nbytes(self):
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, rows):
        """Rows (a slice), or one index of the first axis (a [1, n_in, n_out] tensor's matrix)."""
        return type(self)(self.data[rows], None if self.scales is None else self.scales[rows])

    def reshape(self, *shape):
        if self.scales is not None:
            raise ValueError("an int8 matrix keeps its shape")
        return type(self)(self.data.reshape(*shape))

    def take(self, ids):
        """Rows `ids` (any shape of ints) as float32 [*ids.shape, n_in]: the token embedding's
        lookup."""
        ids = np.asarray(ids)
        picked = type(self)(self.data[ids.reshape(-1)],
                            None if self.scales is None else self.scales[ids.reshape(-1)])
        out = np.empty((ids.size, self.shape[1]), np.float32)
        return picked.widen(out).reshape(*ids.shape, self.shape[1])

    def widen(self, out):
        raise NotImplementedError

    def widen_rows(self, start, stop, out):
        """Rows start..stop-1 widened into out."""
        return self[start:stop].widen(out)

    def product(self, x, out):
        """x [M, K] @ self.T into out [M, N] for few rows of x (decoding): a band of rows widened
        at a time into this thread's buffer, each multiplied while it is in cache."""
        return widened_product(x, self, out, _band_rows(self.shape[1]))


class Float16(Compact):
    dtype = "float16"
    MAGNITUDE_SCALE = np.float32(2.0**112)  # float16's exponent bias 15 against float32's 127
    UNSCALE = np.float32(2.0**-112)
    KEEP = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign bit and the 28 low bits

    # Decoding's product takes x times 2^-56 and its result times 2^-56 again: the 2^-112 that
    # widen_scaled leaves out, with x and the result no nearer float32's limits than that.
    HALF_UNSCALE = np.float32(2.0**-56)

    def widen(self, out):
        """float32(h) for each half h: widen_scaled's h times 2^112, times 2^-112."""
        self.widen_scaled(out)
        out *= self.UNSCALE
        return out

    def widen_scaled(self, out):
        """h times 2^112 for each half h (infinite for infinities and NaNs), in 5 passes: h
        sign-extended to 32 bits and shifted left by 13 puts its exponent and mantissa in
        float32's low 28 bits and its sign in bit 31 (bits 28-30 copies of it, cleared); read as
        a float32 that is h times 2^-112, subnormal halves too. Times 2^112 is h for every
        finite half; infinities and NaNs (exponent 31) are 2^16 to 2^17 then, and times 2^112
        again they overflow, where the largest finite half (65504) does not."""
        bits = out.view(np.int32)
        np.copyto(bits, self.data.view(np.int16), casting="unsafe")  # sign-extending
        bits <<= 13
        bits &= self.KEEP
        out *= self.MAGNITUDE_SCALE
        with np.errstate(over="ignore"):
            out *= self.MAGNITUDE_SCALE  # infinities and NaNs overflow
        return out

    def product(self, x, out):
        """Decoding's product over bands widened by widen_scaled: x @ (h 2^112).T, with x and
        the result each times 2^-56."""
        widened_product(x * self.HALF_UNSCALE, self, out, _band_rows(self.shape[1]),
                        widen=lambda start, stop, buffer: self[start:stop].widen_scaled(buffer))
        out *= self.HALF_UNSCALE
        return out


class BFloat16(Compact):
    dtype = "bfloat16"

    def widen(self, out):
        """float32 bits = bfloat16 bits << 16."""
        bits = out.view(np.uint32)
        np.copyto(bits, self.data, casting="unsafe")
        bits <<= 16
        return out


class Int8(Compact):
    dtype = "int8"

    def widen(self, out):
        """q * scale of q's block, block by block along each row."""
        np.copyto(out, self.data, casting="unsafe")
        n_in = out.shape[1]
        whole = n_in // QBLOCK * QBLOCK
        if whole:
            blocks = out[:, :whole].reshape(len(out), -1, QBLOCK)
            blocks *= self.scales[:, : whole // QBLOCK, None]
        if whole < n_in:  # the shorter last block
            out[:, whole:] *= self.scales[:, -1:]
        return out

    def product(self, x, out):
        """Decoding's product: out[m, j] = sum over blocks b of scale[j, b] (q[j, b] . x[m, b]).
        The scales multiply each block's partial sum, a pass over rows x blocks values, not
        every weight (widen's pass, whose inner loop is a block long, is the slower half of
        it). Each band's values are cast to float32 whole, and one batched product gives
        every block's partial sums. Rows of a length not a multiple of QBLOCK go through widen."""
        n_out, n_in = self.shape
        if n_in % QBLOCK:
            return super().product(x, out)
        blocks, band = n_in // QBLOCK, _band_rows(n_in)
        xb = np.ascontiguousarray(x.T).reshape(blocks, QBLOCK, len(x))  # [blocks, QBLOCK, M]
        values = _scratch("values", (min(band, n_out), n_in))
        partial = _scratch("partial", (blocks, min(band, n_out), len(x)))
        for start in range(0, n_out, band):
            stop = min(n_out, start + band)
            q = values[: stop - start]
            np.copyto(q, self.data[start:stop], casting="unsafe")
            by_block = q.reshape(len(q), blocks, QBLOCK).transpose(1, 0, 2)  # [blocks, rows, 32]
            sums = np.matmul(by_block, xb, out=partial[:, : len(q)])  # [blocks, rows, M]
            np.einsum("jb,bjm->mj", self.scales[start:stop], sums, out=out[:, start:stop])
        return out


KINDS = {cls.dtype: cls for cls in (Float16, BFloat16, Int8)}


def of_halves(data):
    """A float16 matrix over raw float16 (or its uint16 bits) data, as it is: no copy."""
    return Float16(data.view(np.uint16))


def compress(w, dtype):
    """w [n_out, n_in] (float32, a file's float16, or another Compact) in `dtype` (float16 or
    bfloat16 rounded to nearest, int8 with a scale per block of QBLOCK: max |w| / 127), done a
    band of rows at a time."""
    if dtype not in KINDS:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    n_out, n_in = w.shape
    data = np.empty(w.shape, np.int8 if dtype == "int8" else np.uint16)
    scales = np.empty((n_out, -(-n_in // QBLOCK)), np.float32) if dtype == "int8" else None
    band = _band_rows(n_in)
    for start in range(0, n_out, band):
        rows = np.ascontiguousarray(widened(w[start : start + band]))
        if dtype == "float16":
            with np.errstate(over="ignore"):
                halves = rows.astype(np.float16)
            if not np.isfinite(halves).all() and np.isfinite(rows).all():
                raise ValueError("values beyond float16's range (65504): use bfloat16 or "
                                 "float32")
            data[start : start + band] = halves.view(np.uint16)
        elif dtype == "bfloat16":
            data[start : start + band] = _round_to_bfloat16(rows)
        else:
            data[start : start + band], scales[start : start + band] = _quantize(rows)
    return KINDS[dtype](data, scales)


def bfloat16(array):
    """float32 `array`, of any shape, rounded to bfloat16 (nearest, ties to even) as a BFloat16
    of that shape, a band at a time."""
    flat = np.asarray(array, np.float32).reshape(-1)
    bits = np.empty(flat.shape, np.uint16)
    band = WIDEN_BYTES // 4
    for start in range(0, len(flat), band):
        bits[start : start + band] = _round_to_bfloat16(flat[start : start + band])
    return BFloat16(bits.reshape(np.shape(array)))


def _round_to_bfloat16(rows):
    """The upper 16 bits of each float32, rounded to nearest, ties to even."""
    bits = rows.view(np.uint32).astype(np.uint64)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def _quantize(rows):
    """int8 values and float32 scales of rows [n, n_in], a scale per block of QBLOCK."""
    n, n_in = rows.shape
    nb = -(-n_in // QBLOCK)
    padded = np.zeros((n, nb * QBLOCK), np.float32)
    padded[:, :n_in] = rows
    blocks = padded.reshape(n, nb, QBLOCK)
    scales = np.abs(blocks).max(axis=-1) / np.float32(127)
    safe = np.where(scales > 0, scales, np.float32(1))
    # A block holding an infinity or a NaN has a non-finite scale, which carries it into every
    # product (so the logits check catches it as in float32); its values are moot.
    with np.errstate(invalid="ignore"):
        q = np.rint(blocks / safe[..., None]).clip(-127, 127).astype(np.int8)
    return q.reshape(n, -1)[:, :n_in], scales


def dtype_of(tensor):
    """'float32', 'float16', 'bfloat16' or 'int8': what a tensor (an array or a Compact) holds."""
    return tensor.dtype if isinstance(tensor, Compact) else str(tensor.dtype)


def storage(tensor):
    """The array holding a tensor's values: itself, or a Compact's data (to release a file's
    pages under it)."""
    return tensor.data if isinstance(tensor, Compact) else tensor


def widened(tensor):
    """A tensor as float32: an array of a file's float16, or a Compact widened whole."""
    if isinstance(tensor, Compact):
        return tensor.widen(np.empty(tensor.shape, np.float32))
    return np.asarray(tensor, np.float32)


def converted(tensor, dtype):
    """A [n_out, n_in] tensor (as a file holds it: float32, float16 or a BFloat16) in `dtype`,
    None for its own: float32 as an array, anything else as a Compact."""
    own = dtype_of(tensor)
    dtype = dtype or own
    if dtype == own:
        if own == "float16":
            return of_halves(tensor)
        return tensor
    if dtype == "float32":
        return widened(tensor)
    return compress(tensor, dtype)


def _scratch(name, shape):
    """This thread's float32 buffer `name` for the widening's temporaries, reused from call to
    call (made anew only when a call needs more)."""
    size = int(np.prod(shape))
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, np.float32)
        setattr(_buffers, name, buffer)
    return buffer[:size].reshape(shape)


def _band_rows(n_in):
    """Rows of a [N, n_in] matrix that make WIDEN_BYTES of float32 (at least one)."""
    return max(1, WIDEN_BYTES // (4 * max(1, n_in)))


def matmul(x, w, out):
    """x [M, K] @ w.T for a compact w [N, K], into out [M, N]. A few rows of x (decoding) go
    through w.product. For more, a band of at least PRODUCT_ROWS rows of w is widened at a
    time (a product over fewer rows of w repacks all of x for little work)."""
    if len(x) <= FEW_ROWS:
        return w.product(x, out)
    return widened_product(x, w, out, max(_band_rows(w.shape[1]), PRODUCT_ROWS))


def widened_product(x, w, out, band, widen=None):
    """x @ w.T into out: `band` rows of w widened at a time into this thread's buffer (by
    `widen(start, stop, buffer)`, w.widen_rows unless given), then one BLAS product each."""
    widen = w.widen_rows if widen is None else widen
    buffer = _scratch("widened", (min(band, len(w)), w.shape[1]))
    for start in range(0, len(w), band):
        stop = min(len(w), start + band)
        block = widen(start, stop, buffer[: stop - start])
        np.matmul(x, block.T, out=out[:, start:stop])
    return out
