"""CRC32C (Castagnoli), the checksum TensorFlow keeps for every tensor and index block,
vectorised with NumPy and run on every core.

CRC without its initial and final xor is linear over GF(2): crc(a ^ b) = crc(a) ^ crc(b), and
appending n zero bytes is a fixed linear map of the 32-bit state. So the data is cut into L
interleaved lanes (lane j holds 32-bit words j, j+L, j+2L, ...); each row of L contiguous words
is folded into L lane states at once by two 64K-entry table lookups per word, where the tables
compose "absorb this word" with "skip the other lanes' (L-1)*4 bytes". The lane states are then
combined pairwise in log2(L) levels, each level one fixed "append n zero bytes" map.

The same linearity splits one buffer into pieces checked independently: the raw state after
A + B is zeros(len(B))(state after A) ^ (B's state from 0). `crc32c_many` cuts its buffers into
pieces of CHUNK bytes (a buffer's first piece takes the remainder), computes the pieces on every
core (NumPy lets go of the GIL inside its loops), and folds each buffer's pieces in order with
the one map zeros(CHUNK).
"""

import threading

import numpy as np

from picogpt.gpt2 import parallel

CRC32C_POLY = 0x82F63B78  # reflected 0x1EDC6F41
LANES = 4096
# What is left after the rows of LANES lanes goes through rows of this few (a 256-byte row) before
# the byte loop: a tensor's last 16 kB, a bias of 3 kB, a hundred times faster than byte by byte.
FEW_LANES = 64
MIN_ROWS = 4  # fewer rows than this go a narrower way: the lanes' combine costs about as much
CHUNK = 1 << 22  # bytes per piece: whole rows of lanes, and many pieces per GPT-2 matrix


def _byte_table():
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(CRC32C_POLY), table >> 1)
    return table.astype(np.uint32)


BYTE_TABLE = _byte_table()
_BYTE_LIST = BYTE_TABLE.tolist()  # Python ints: fast in the byte loop


def _crc32c_bytes(state, data):
    """The reference byte-at-a-time update of a raw (un-xored) state: for short inputs."""
    for byte in data:
        state = _BYTE_LIST[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


def _apply(tables, state):
    """Apply a GF(2)-linear map of 32-bit states given as four 256-entry byte tables."""
    return (
        tables[0][state & 0xFF]
        ^ tables[1][(state >> 8) & 0xFF]
        ^ tables[2][(state >> 16) & 0xFF]
        ^ tables[3][state >> 24]
    )


def _zeros_map(n_bytes):
    """Byte tables of the map 'append n_bytes zero bytes' on a raw CRC state."""
    basis = np.array([1 << i for i in range(32)], dtype=np.uint32)
    # Square-and-multiply on the 32 images of the basis vectors, one zero byte being the base map.
    one_byte = BYTE_TABLE[basis & 0xFF] ^ (basis >> 8)
    result = basis.copy()
    power = one_byte
    while n_bytes:
        if n_bytes & 1:
            result = _compose(power, result)
        power = _compose(power, power)
        n_bytes >>= 1
    return _tables_from_images(result)


def _compose(outer, inner):
    """Images of the basis under outer(inner(x)), both maps given as basis images."""
    out = np.zeros(32, dtype=np.uint32)
    for bit in range(32):
        out ^= np.where((inner >> np.uint32(bit)) & 1, outer[bit], np.uint32(0)).astype(np.uint32)
    return out


def _tables_from_images(images):
    """Four 256-entry tables for a linear map given by the images of the 32 basis vectors."""
    tables = []
    byte = np.arange(256, dtype=np.uint32)
    for k in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            table ^= np.where((byte >> bit) & 1, images[8 * k + bit], np.uint32(0)).astype(
                np.uint32
            )
        tables.append(table)
    return tables


def _word_tables(skip_bytes):
    """Two 64K tables: absorb one little-endian 32-bit word into a raw state, then skip
    `skip_bytes` zero bytes. Indexed by the low and high 16 bits of (state ^ word)."""
    x = np.arange(65536, dtype=np.uint32)
    lo, hi = x, x << 16
    for _ in range(32):  # four bytes through the byte table, bit by bit
        lo = np.where(lo & 1, (lo >> 1) ^ np.uint32(CRC32C_POLY), lo >> 1).astype(np.uint32)
        hi = np.where(hi & 1, (hi >> 1) ^ np.uint32(CRC32C_POLY), hi >> 1).astype(np.uint32)
    if skip_bytes:
        skip = _zeros_map(skip_bytes)
        lo, hi = _apply(skip, lo), _apply(skip, hi)
    return lo, hi


_TABLES = {}
_making = threading.Lock()  # the tables are made once, by whichever thread asks first


def _tables(lanes=LANES):
    """The tables of `lanes` lanes (made on first use), and the map that skips a CHUNK."""
    with _making:
        if not _TABLES:
            _TABLES["last"] = _word_tables(0)
            _TABLES["chunk"] = _zeros_map(CHUNK)
        if lanes not in _TABLES:
            _TABLES[lanes] = {
                "row": _word_tables((lanes - 1) * 4), "last": _TABLES["last"],
                "combine": [_zeros_map(4 << level) for level in range(lanes.bit_length())]}
    return _TABLES[lanes]


def _crc32c_raw_lanes(words, initial):
    """Raw CRC state after `words`, a [rows, lanes] uint32 array in file order, from `initial`."""
    lanes = words.shape[1]
    tables = _tables(lanes)
    row_lo, row_hi = tables["row"]
    state = np.zeros(lanes, dtype=np.uint32)
    state[0] = initial  # by linearity, the same as xoring it into the first word
    x, tmp = np.empty(lanes, dtype=np.uint32), np.empty(lanes, dtype=np.uint32)
    # The indices in NumPy's own index type: `take` copies any other into it, on every call.
    lo, hi = np.empty(lanes, dtype=np.intp), np.empty(lanes, dtype=np.intp)
    low_half = np.uint32(0xFFFF)
    rows = len(words)
    for r in range(rows):
        np.bitwise_xor(state, words[r], out=x)
        if r == rows - 1:
            row_lo, row_hi = tables["last"]
        np.bitwise_and(x, low_half, out=lo)
        np.right_shift(x, 16, out=hi)
        # mode="wrap" skips "raise"'s check of each index, all below 65536 by construction.
        np.take(row_lo, lo, out=state, mode="wrap")
        np.take(row_hi, hi, out=tmp, mode="wrap")
        state ^= tmp
    # Lane j's state still lacks the (lanes-1-j)*4 bytes that follow it in its last row.
    level = 0
    while len(state) > 1:
        left, right = state[0::2], state[1::2]
        state = _apply(tables["combine"][level], left) ^ right
        level += 1
    return int(state[0])


def _as_bytes(data):
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    return buf.reshape(-1).view(np.uint8)


def _raw(buf, raw):
    """The raw state after the uint8 array `buf`, from the raw state `raw`: whole rows of LANES
    lanes, then of FEW_LANES, then byte by byte."""
    done = 0
    for lanes in (LANES, FEW_LANES):
        rows = (len(buf) - done) // (4 * lanes)
        if rows >= MIN_ROWS:
            end = done + rows * 4 * lanes
            raw = _crc32c_raw_lanes(buf[done:end].view("<u4").reshape(-1, lanes), raw)
            done = end
    return _crc32c_bytes(raw, buf[done:].tobytes())


def crc32c(data, state=0):
    """CRC32C of `data` (bytes-like or a uint8 array), continuing from a previous `state`."""
    return _raw(_as_bytes(data), state ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def crc32c_many(buffers, done=None):
    """[CRC32C of each buffer] (bytes-like or arrays), computed on every core. `done(piece)`,
    if given, is called with each piece (a uint8 view) once it has been read: a caller whose
    buffers are mapped from a file hands the pages back there."""
    _tables()  # which also makes the map that skips a CHUNK
    skip_chunk = _TABLES["chunk"]
    pieces = []  # (buffer, view, initial raw state): a buffer's first piece starts its CRC
    for i, data in enumerate(map(_as_bytes, buffers)):
        first = len(data) % CHUNK or min(len(data), CHUNK)
        pieces.append((i, data[:first], 0xFFFFFFFF))
        pieces += [(i, data[at : at + CHUNK], 0) for at in range(first, len(data), CHUNK)]
    raws = [None] * len(pieces)
    order = sorted(range(len(pieces)), key=lambda j: -len(pieces[j][1]))  # largest first
    taken = iter(order)
    handing = threading.Lock()

    def work(start, stop):  # every thread takes the next piece until none is left
        while True:
            with handing:
                j = next(taken, None)
            if j is None:
                return
            raws[j] = _raw(pieces[j][1], pieces[j][2])
            if done is not None:
                done(pieces[j][1])

    with parallel.passes():
        parallel.run(work, parallel.threads())
    states = [None] * len(buffers)
    for (i, _, initial), raw in zip(pieces, raws):
        states[i] = raw if initial else int(_apply(skip_chunk, np.uint32(states[i]))) ^ raw
    return [state ^ 0xFFFFFFFF for state in states]


def mask_crc(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked):
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
