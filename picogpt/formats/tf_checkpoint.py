"""TensorFlow V2 checkpoints ("tensor bundles") read, verified and written with NumPy alone.

A checkpoint `model.ckpt` is an index (`model.ckpt.index`, an SSTable mapping tensor names to
protobuf entries) and data shards (`model.ckpt.data-00000-of-00001`, raw tensor bytes). The byte
format is written up in docs/tf-checkpoint-format.md. Reading memory-maps the shards and returns
read-only views, so opening GPT-2 copies nothing; `verify` checks every CRC32C (crc32c.py, on
every core).

Why one module of about 550 lines: it is one file format, read and written, and its parts serve
both directions: the SSTable index and the protobuf entries. Each section below is one of them,
reading and writing at the end.
"""

import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

from picogpt import files
from picogpt.errors import CheckpointError
from picogpt.formats.crc32c import crc32c, crc32c_many, mask_crc, unmask_crc
from picogpt.formats.shapes import check_shape

__all__ = ["CheckpointError", "read", "release", "verify", "write", "resolve_prefix", "crc32c"]


# TensorFlow DataType enum -> NumPy dtype. 14 is bfloat16: read as uint16 and widened to float32.
DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    8: np.complex64, 9: np.int64, 10: np.bool_, 14: np.uint16, 17: np.uint16,
    18: np.complex128, 19: np.float16, 22: np.uint32, 23: np.uint64,
}  # fmt: skip
BFLOAT16 = 14
TF_DTYPE = {np.dtype(v): k for k, v in DTYPES.items() if k != BFLOAT16}

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked CRC32C
MAX_DIMS = 64

# Bounds on what an index may make the reader do, so that work and memory follow the file's size.
# GPT-2 1558M's index is about 50 KB with 580 entries; a training state with Adam's moments, 3x.
INDEX_LIMIT = 16 * files.MB
STATE_FILE_LIMIT = files.MB  # the `checkpoint` text file: a few paths
SHARD_LIMIT = 1 << 48  # data shards are mapped, never read whole: any real size will do
MAX_ENTRIES = 100_000
MAX_KEY_BYTES = 1 << 16
# Keys are prefix-compressed (each entry stores only what differs from the previous key), so the
# keys rebuilt from an index can be longer than the index; TensorFlow's own run below 2x.
KEY_BYTES_PER_INDEX_BYTE = 8


# ---------------------------------------------------------------------------------------------
# Varints, protobuf, and the SSTable index
# ---------------------------------------------------------------------------------------------


class _Buffer:
    """A cursor over bytes that raises CheckpointError (naming the file) instead of IndexError."""

    def __init__(self, data, where):
        self.data, self.pos, self.where = data, 0, where

    def fail(self, what):
        raise CheckpointError(f"{self.where}: {what}")

    def varint(self, max_bits=64):
        result = shift = 0
        while True:
            if self.pos >= len(self.data):
                self.fail("varint runs off the end of the data")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift >= max_bits:
                self.fail("varint is too long")
        if result >> max_bits:
            self.fail("varint is too large")
        return result

    def take(self, n):
        if n > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            self.fail(f"needs {n} bytes at offset {self.pos} but only {left} remain")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def done(self):
        return self.pos >= len(self.data)


def _proto_fields(data, where):
    """Yield (field number, wire type, value) of a protobuf message; skips nothing silently."""
    buf = _Buffer(data, where)
    while not buf.done():
        tag = buf.varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value = buf.varint()
        elif wire == 1:
            value = int.from_bytes(buf.take(8), "little")
        elif wire == 2:
            value = buf.take(buf.varint())
        elif wire == 5:
            value = int.from_bytes(buf.take(4), "little")
        else:
            buf.fail(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _read_block(index, handle, where):
    """The body of the SSTable block at `handle` = (offset, size), after checking its trailer."""
    offset, size = handle
    if offset + size + BLOCK_TRAILER_SIZE > len(index) - FOOTER_SIZE:
        raise CheckpointError(f"{where}: block at offset {offset} of size {size} is past the end")
    raw = index[offset : offset + size + BLOCK_TRAILER_SIZE]
    compression = raw[size]
    stored = int.from_bytes(raw[size + 1 :], "little")
    if unmask_crc(stored) != crc32c(raw[: size + 1]):
        raise CheckpointError(f"{where}: block at offset {offset} fails its CRC32C check")
    if compression != 0:
        raise CheckpointError(
            f"{where}: block at offset {offset} is compressed (type {compression}); "
            "TensorFlow writes tensor-bundle indexes uncompressed"
        )
    return raw[:size]


def _block_entries(block, where, budget):
    """Yield (key, value) of a block's entries; `budget` bounds the key bytes rebuilt in all."""
    if len(block) < 4:
        raise CheckpointError(f"{where}: block too small")
    num_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (num_restarts + 1)
    if num_restarts == 0 or end < 0:
        raise CheckpointError(f"{where}: bad restart count {num_restarts}")
    buf = _Buffer(block[:end], where)
    key = b""
    while not buf.done():
        shared, non_shared, value_len = buf.varint(32), buf.varint(32), buf.varint(32)
        if shared > len(key):
            buf.fail(f"entry shares {shared} bytes of a {len(key)}-byte key")
        if shared + non_shared > MAX_KEY_BYTES:
            buf.fail(f"a key of {shared + non_shared} bytes (at most {MAX_KEY_BYTES})")
        budget.spend(shared + non_shared)
        key = key[:shared] + buf.take(non_shared)
        yield key, buf.take(value_len)


class _Budget:
    """What an index may still cost: key bytes rebuilt (a multiple of its size) and entries."""

    def __init__(self, index_size, where):
        self.key_bytes = KEY_BYTES_PER_INDEX_BYTE * index_size
        self.entries = MAX_ENTRIES + 1  # + the bundle header
        self.where = where

    def spend(self, key_bytes):
        self.key_bytes -= key_bytes
        self.entries -= 1
        if self.entries < 0:
            raise CheckpointError(f"{self.where}: more than {MAX_ENTRIES:,} entries")
        if self.key_bytes < 0:
            raise CheckpointError(
                f"{self.where}: its keys rebuild to more than {KEY_BYTES_PER_INDEX_BYTE}x the "
                "size of the index (prefix compression gone wrong)"
            )


def _handle(value, where):
    buf = _Buffer(value, where)
    return buf.varint(), buf.varint()


def _index_entries(index, where):
    """Yield (key, value) of every entry of the SSTable `index`, in order.

    Each data block is read (and its CRC checked) once: the index block must name them in file
    order without overlaps, as every SSTable writer lays them out. With that, and the budget on
    rebuilt keys, the work and memory are proportional to the size of the index."""
    if len(index) < FOOTER_SIZE:
        raise CheckpointError(f"{where}: file is too short ({len(index)} bytes) to be an index")
    footer = index[-FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:-4], "little") | int.from_bytes(footer[-4:], "little") << 32
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{where}: bad magic number: not a TensorFlow checkpoint index")
    buf = _Buffer(footer[:40], where)
    _metaindex = (buf.varint(), buf.varint())
    index_handle = (buf.varint(), buf.varint())
    index_block = _read_block(index, index_handle, where)
    budget = _Budget(len(index), where)  # for the data blocks' entries; the index block has its own
    next_free = 0  # data blocks start at or after the end of the previous one
    for _, handle_value in _block_entries(index_block, where, _Budget(len(index), where)):
        offset, size = _handle(handle_value, where)
        if offset < next_free:
            raise CheckpointError(
                f"{where}: data block at offset {offset} overlaps the block before it "
                "(the index names blocks out of order or more than once)"
            )
        next_free = offset + size + BLOCK_TRAILER_SIZE
        yield from _block_entries(_read_block(index, (offset, size), where), where, budget)


def _parse_header(value, where):
    header = {"num_shards": 0, "endianness": 0}
    for field, wire, v in _proto_fields(value, where):
        if field == 1 and wire == 0:
            header["num_shards"] = v
        elif field == 2 and wire == 0:
            header["endianness"] = v
    if header["endianness"] not in (0, 1):
        raise CheckpointError(f"{where}: unknown endianness {header['endianness']}")
    return header


def _parse_entry(value, where):
    entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
    for field, wire, v in _proto_fields(value, where):
        if field == 1 and wire == 0:
            entry["dtype"] = v
        elif field == 2 and wire == 2:
            entry["shape"] = _parse_shape(v, where)
        elif field == 3 and wire == 0:
            entry["shard_id"] = v
        elif field == 4 and wire == 0:
            entry["offset"] = v
        elif field == 5 and wire == 0:
            entry["size"] = v
        elif field == 6 and wire == 5:
            entry["crc32c"] = v
        elif field == 7:
            raise CheckpointError(f"{where}: is a partitioned (sliced) tensor, not supported")
    return entry


def _parse_shape(value, where):
    dims = []
    for field, wire, v in _proto_fields(value, where):
        if field == 2 and wire == 2:
            size = 0
            for f, w, d in _proto_fields(v, where):
                if f == 1 and w == 0:
                    size = d - (1 << 64) if d >> 63 else d  # int64 two's complement
            if size < 0:
                raise CheckpointError(f"{where}: has an unknown or negative dimension {size}")
            dims.append(size)
            if len(dims) > MAX_DIMS:
                raise CheckpointError(f"{where}: more than {MAX_DIMS} dimensions")
        elif field == 3 and wire == 0 and v:
            raise CheckpointError(f"{where}: shape of unknown rank")
    return dims


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def resolve_prefix(path):
    """The checkpoint prefix for `path`: a prefix itself, or a folder holding one."""
    path = Path(path)
    if not path.is_dir():
        if Path(str(path) + ".index").exists():
            return path
        raise CheckpointError(f"{path}: no checkpoint here (no {path.name}.index)")
    state = path / "checkpoint"
    if state.exists():
        text = files.read_bytes(state, STATE_FILE_LIMIT, "checkpoint state file",
                                error=CheckpointError).decode("utf-8", errors="replace")
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', text, re.M)
        if match:
            # The recorded path may be absolute and stale (written on another machine).
            prefix = path / Path(match.group(1).replace("\\", "/")).name
            if Path(str(prefix) + ".index").exists():
                return prefix
            raise CheckpointError(f"{state}: names {match.group(1)!r}; {prefix}.index is absent")
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise CheckpointError(f"{path}: no checkpoint (*.index) in this folder")
    names = ", ".join(p.name for p in indexes)
    raise CheckpointError(f"{path}: several checkpoints ({names}) and no 'checkpoint' file")


def _read_entries(prefix):
    """Parse the index of `prefix`: (header, {name: entry}) with every entry checked for sanity.
    Keys must be strictly increasing, as in every SSTable: a tensor named twice is an error."""
    index_path = Path(str(prefix) + ".index")
    where = str(index_path)
    index = files.read_bytes(index_path, INDEX_LIMIT, "checkpoint index", error=CheckpointError)
    header, entries, previous = None, {}, None
    for key, value in _index_entries(index, where):
        if previous is not None and key <= previous:
            name = key.decode("utf-8", errors="replace")
            if key == previous:
                raise CheckpointError(f"{where}: tensor {name!r} is in the index twice")
            raise CheckpointError(f"{where}: keys out of order at tensor {name!r}")
        previous = key
        if key == b"":
            header = _parse_header(value, where)
            continue
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{where}: tensor name {key[:80]!r} is not UTF-8") from e
        entries[name] = _parse_entry(value, f"{where}: tensor {name!r}")
    if header is None:
        raise CheckpointError(f"{where}: no bundle header (empty key)")
    if header["num_shards"] < 1 or header["num_shards"] > 100_000:
        raise CheckpointError(f"{where}: implausible number of shards {header['num_shards']}")
    return header, entries


def _shard_path(prefix, shard, num_shards):
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def _map_shards(prefix, num_shards, needed):
    """Memory-map each shard that some tensor uses."""
    maps = {}
    for shard in sorted(needed):
        path = _shard_path(prefix, shard, num_shards)
        size = files.check_regular(path, SHARD_LIMIT, "data shard", error=CheckpointError)
        if size == 0:
            maps[shard] = np.zeros(0, dtype=np.uint8)
            continue
        try:
            maps[shard] = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map data shard: {e}") from e
    return maps


def _tensor_view(name, entry, maps, header, prefix):
    """A read-only array over the tensor's bytes, after checking everything about them."""
    where = f"{prefix}.index: tensor {name!r}"
    dtype_code = entry["dtype"]
    if dtype_code not in DTYPES:
        kind = "string" if dtype_code == 7 else "unknown"
        raise CheckpointError(f"{where}: {kind} dtype {dtype_code} is not supported")
    if entry["shard_id"] >= header["num_shards"]:
        raise CheckpointError(f"{where}: shard {entry['shard_id']} of {header['num_shards']}")
    dtype = np.dtype(DTYPES[dtype_code])
    shape = entry["shape"]
    n = 1
    for d in shape:
        n *= d  # Python ints: no overflow; compared with the data size before any allocation
    if n * dtype.itemsize != entry["size"]:
        raise CheckpointError(
            f"{where}: size {entry['size']} bytes does not match shape {shape} of {dtype}"
        )
    check_shape(shape, 4 if dtype_code == BFLOAT16 else dtype.itemsize, where)  # as returned
    data = maps[entry["shard_id"]]
    start, end = entry["offset"], entry["offset"] + entry["size"]
    if end > len(data):
        shard = _shard_path(prefix, entry["shard_id"], header["num_shards"])
        raise CheckpointError(
            f"{where}: bytes [{start}, {end}) are outside {shard} ({len(data)} bytes)"
        )
    raw = data[start:end]
    if header["endianness"] == 1:
        array = raw.view(dtype.newbyteorder(">")).astype(dtype)
    else:
        array = raw.view(dtype)
    if dtype_code == BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    array = array.reshape(tuple(shape))
    array.flags.writeable = False
    return array


def _open(path):
    prefix = resolve_prefix(path)
    header, entries = _read_entries(prefix)
    shards = {e["shard_id"] for e in entries.values() if e["shard_id"] < header["num_shards"]}
    maps = _map_shards(prefix, header["num_shards"], shards)
    return prefix, header, entries, maps


def _views(prefix, header, entries, maps):
    """{name: read-only array} after checking each tensor and that no two share bytes: so what
    reading and verifying do is bounded by the size of the data, whatever the index says."""
    views = {name: _tensor_view(name, e, maps, header, prefix) for name, e in entries.items()}
    placed = sorted((e["shard_id"], e["offset"], e["size"], name)
                    for name, e in entries.items() if e["size"])
    for (shard, offset, _, name), (shard_before, start, size, name_before) in zip(
        placed[1:], placed
    ):
        if shard == shard_before and offset < start + size:
            raise CheckpointError(
                f"{prefix}.index: tensors {name_before!r} and {name!r} overlap in "
                f"{_shard_path(prefix, shard, header['num_shards']).name}"
            )
    return views


def read(path):
    """All tensors of the checkpoint at `path` (a prefix or a folder): {name: read-only array}.

    Arrays are views into a memory map of the data shards, so nothing is copied until used
    (except bfloat16, widened to float32, and big-endian data, swapped to native order)."""
    return _views(*_open(path))


def release(array):
    """Hand back the memory-mapped pages under `array` (a tensor from `read`) once a copy of it
    is all that is used: they leave this process's resident set and stay in the page cache, and
    reading the array again faults them back in. A no-op for arrays that are not mapped."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0:
        return
    map_start = np.frombuffer(base, np.uint8).ctypes.data
    start = array.ctypes.data - map_start
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the array only:
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE  # its neighbours stay mapped
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)


def verify(path):
    """Check every tensor's CRC32C against its bytes, on every core; raise CheckpointError naming
    the first tensor (in name order) that fails. Returns {data shard: tensors checked in it}.
    Index blocks' CRCs are checked on every read. The mapped pages are handed back as they are
    read, so verifying does not hold the whole model resident."""
    prefix, header, entries, maps = _open(path)
    _views(prefix, header, entries, maps)  # checks dtype, shape, bounds, overlaps
    for name, entry in entries.items():
        if entry["crc32c"] is None:
            raise CheckpointError(f"{prefix}.index: tensor {name!r} has no checksum")
    spans = [maps[e["shard_id"]][e["offset"] : e["offset"] + e["size"]] for e in entries.values()]
    for name, crc in zip(entries, crc32c_many(spans, done=release)):
        if crc != unmask_crc(entries[name]["crc32c"]):
            raise CheckpointError(f"{prefix}: tensor {name!r} fails its CRC32C check (corrupted)")
    checked = {}
    for entry in entries.values():
        shard = _shard_path(prefix, entry["shard_id"], header["num_shards"])
        checked[shard] = checked.get(shard, 0) + 1
    return checked


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(field, value):
    return _varint(field << 3) + _varint(value) if value else b""


def _field_bytes(field, value):
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _entry_proto(dtype_code, shape, offset, size, crc):
    dims = b"".join(_field_bytes(2, _field_varint(1, d) or b"") for d in shape)
    return (
        _field_varint(1, dtype_code)
        + _field_bytes(2, dims)
        + _field_varint(4, offset)
        + _field_varint(5, size)
        + _varint(6 << 3 | 5)
        + mask_crc(crc).to_bytes(4, "little")
    )


def _block(entries):
    """An SSTable block with one restart point per entry (no prefix compression: simple)."""
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    for r in restarts or [0]:
        body += struct.pack("<I", r)
    body += struct.pack("<I", len(restarts) or 1)
    return bytes(body)


def _with_trailer(block, compression=0):
    trailer_type = bytes([compression])
    crc = crc32c(block + trailer_type)
    return block + trailer_type + struct.pack("<I", mask_crc(crc))


BLOCK_TARGET = 4096  # bytes per data block, as TensorFlow's writer


def _index_bytes(entries, compression=0):
    """An SSTable holding `entries` [(key bytes, value bytes)] in key order."""
    out = bytearray()
    handles, block = [], []

    def flush(block_entries):
        body = _block(block_entries)
        handle = _varint(len(out)) + _varint(len(body))
        out.extend(_with_trailer(body, compression))
        return handle

    for key, value in entries:
        block.append((key, value))
        if sum(len(k) + len(v) + 16 for k, v in block) >= BLOCK_TARGET:
            handles.append((key, flush(block)))
            block = []
    if block:
        handles.append((block[-1][0], flush(block)))
    metaindex_handle = flush([])
    index_handle = flush(handles)
    footer = (metaindex_handle + index_handle).ljust(40, b"\x00")
    out.extend(footer + struct.pack("<Q", TABLE_MAGIC))
    return bytes(out)


def _header_proto(num_shards=1, endianness=0):
    return (
        _field_varint(1, num_shards)
        + _field_varint(2, endianness)
        + _field_bytes(3, _field_varint(1, 1))  # version { producer: 1 }
    )


def _write_synced(path, chunks):
    """Write `chunks` (bytes-like) under path's temporary name (files.temporary_name), fsynced,
    and return that name: write() renames its three files into place only once all are down."""
    tmp = files.temporary_name(path)
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(memoryview(chunk))
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write(prefix, tensors):
    """Write `tensors` ({name: array}) as a V2 checkpoint at `prefix`, plus a `checkpoint` file.

    TensorFlow reads the result back bit-exactly. Files are written under temporary names and
    renamed into place, so an interrupted write never leaves a half-written checkpoint behind."""
    prefix = Path(prefix)
    for name in tensors:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    names = sorted(tensors, key=lambda n: n.encode("utf-8"))
    arrays = []
    for name in names:
        array = np.asarray(tensors[name])
        if array.dtype.newbyteorder("=") not in TF_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be saved")
        arrays.append(np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C"))
    data = [array.reshape(-1).view(np.uint8) for array in arrays]
    entries, offset = [(b"", _header_proto())], 0
    for name, array, raw, crc in zip(names, arrays, data, crc32c_many(data)):
        dtype_code = TF_DTYPE[array.dtype.newbyteorder("=")]
        entries.append((name.encode("utf-8"),
                        _entry_proto(dtype_code, array.shape, offset, raw.nbytes, crc)))
        offset += raw.nbytes
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data_path = _shard_path(prefix, 0, 1)
    index_path = Path(f"{prefix}.index")
    state_path = prefix.parent / "checkpoint"
    tmp_data = _write_synced(data_path, data)
    tmp_index = _write_synced(index_path, [_index_bytes(entries)])
    state = f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
    tmp_state = _write_synced(state_path, [state.encode()])
    # Data first, index second: a reader never sees an index pointing at missing data.
    os.replace(tmp_data, data_path)
    os.replace(tmp_index, index_path)
    os.replace(tmp_state, state_path)
