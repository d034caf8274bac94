"""safetensors files read and written with NumPy alone: HuggingFace's format for weights.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data section:

    {"__metadata__": {"format": "pt"},                   (optional, str -> str)
     "wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]}, ...}

`data_offsets` are [begin, end) in bytes from the start of the data section, little-endian,
C order. Nothing from the file is trusted before it is checked: the header length is bounded
(at most MAX_HEADER bytes and inside the file) before the header is read, and every tensor's
dtype, shape and offsets are checked against the data section (inside it, sizes that match
the shape, no overlaps, no holes) before any view of it is made. Tensors are read-only views of
a memory map, so opening a file copies nothing (except BF16, which NumPy has no type for: it is
widened to float32, exactly, as checkpoint.py does for TensorFlow's bfloat16).
"""

import json
import math
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from picogpt import files
from picogpt.errors import CheckpointError
from picogpt.formats.shapes import check_shape
from picogpt.gpt2 import compact

__all__ = ["CheckpointError", "TensorInfo", "read", "read_header", "write"]

MAX_HEADER = 100_000_000  # bytes, as the safetensors library's own limit
MAX_DIMS = 64
HEADER_ALIGN = 8  # the writer pads the header with spaces so the data section starts aligned
METADATA = "__metadata__"

# safetensors dtype -> the little-endian NumPy dtype its bytes are. BF16 is read as its 16 bits.
DTYPES = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}  # fmt: skip
NAME_OF = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items() if name != "BF16"}


class TensorInfo(NamedTuple):
    """One tensor's entry in the header, checked: where its bytes are in the data section."""

    dtype: str  # a key of DTYPES
    shape: tuple
    begin: int
    end: int


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_header(path):
    """(metadata, {name: TensorInfo}, data_start) of the safetensors file at `path`, every entry
    checked against the data section; raises CheckpointError naming the file and the problem."""
    path = Path(path)
    size = files.check_regular(path, sys.maxsize, "safetensors file", error=CheckpointError)
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    try:
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) != 8:
                raise CheckpointError(f"{path}: the file shrank while it was read")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n:,} is more than the "
                                      f"{MAX_HEADER:,} bytes a safetensors header can be")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n:,} runs past the end of the "
                                      f"file ({size:,} bytes): the file is cut short or not "
                                      "a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != n:
        raise CheckpointError(f"{path}: the file shrank while it was read")
    text = files.decode_utf8(raw, path, "safetensors header", error=CheckpointError)
    if not text.startswith("{"):
        raise CheckpointError(f"{path}: the header is not a JSON object: not a safetensors file")
    header = files.parse_json(text, path, "safetensors header", error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = _metadata(header.pop(METADATA, None), path)
    entries = {name: _entry(name, value, path) for name, value in header.items()}
    _check_layout(entries, size - 8 - n, path)
    return metadata, entries, 8 + n


def _metadata(value, path):
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(f"{path}: {METADATA} must map strings to strings")
    return value


def _entry(name, value, path):
    """A header entry, checked on its own: a known dtype, a shape of whole numbers, two offsets
    whose difference is exactly the shape's size in bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: expected an object with exactly dtype, shape and "
                              "data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPES:
        known = ", ".join(DTYPES)
        raise CheckpointError(f"{where}: dtype {dtype!r} is not supported (only {known})")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of whole numbers")
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{where}: {len(shape)} dimensions, more than {MAX_DIMS}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_whole, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not two whole numbers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}) end before they begin")
    # Python's integers do not overflow, and a shape's product is compared with the byte count
    # (bounded below by the file's size) before anything is allocated or mapped.
    n_bytes = math.prod(shape) * DTYPES[dtype].itemsize
    if n_bytes != end - begin:
        raise CheckpointError(f"{where}: shape {shape} of {dtype} is {n_bytes:,} bytes, but "
                              f"data_offsets [{begin}, {end}) hold {end - begin:,}")
    check_shape(shape, 4 if dtype == "BF16" else DTYPES[dtype].itemsize, where)  # as returned
    return TensorInfo(dtype, tuple(shape), begin, end)


def _whole(x):
    return type(x) is int and x >= 0  # not bool, not float


def _check_layout(entries, data_size, path):
    """The tensors tile the data section exactly: in offset order each begins where the one
    before it ends, the first at 0 and the last at the end (what the format requires: no
    overlaps, no holes), so no two views share a byte and no byte is outside the file."""
    position, previous = 0, None
    for name, info in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            if info.begin < position:
                problem = f"overlaps tensor {previous!r}"
            else:
                problem = f"leaves a hole of {info.begin - position:,} bytes before it"
            raise CheckpointError(f"{path}: tensor {name!r} at bytes [{info.begin}, {info.end}) "
                                  f"of the data section {problem}")
        if info.end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} at bytes [{info.begin}, {info.end}) "
                                  f"is outside the data section ({data_size:,} bytes): the file "
                                  "is cut short or its header lies")
        position, previous = info.end, name
    if position != data_size:
        raise CheckpointError(f"{path}: the data section has {data_size - position:,} bytes "
                              "that no tensor accounts for")


def read(path, bfloat16="float32"):
    """Every tensor of the safetensors file at `path`: {name: read-only array}, in native byte
    order. Arrays are views of a memory map; BF16, which NumPy has no type for, is widened to
    float32 (exactly), or with bfloat16="raw" kept as its 16 bits, mapped (a compact.BFloat16)."""
    path = Path(path)
    _, entries, start = read_header(path)
    data = _map(path, start + max((e.end for e in entries.values()), default=0))
    return {name: _view(name, info, data, start, path, bfloat16)
            for name, info in entries.items()}  # fmt: skip


def _map(path, expected):
    """The whole file as a read-only uint8 array, checked to be as long as the header says."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map the file: {e}") from e
    if len(data) < expected:
        raise CheckpointError(f"{path}: the file shrank while it was read")
    return data


def _view(name, info, data, start, path, bfloat16="float32"):
    array = data[start + info.begin : start + info.end].view(DTYPES[info.dtype])
    if info.dtype == "BF16" and bfloat16 == "raw":
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))  # a big-endian machine
        array.flags.writeable = False
        return compact.BFloat16(array.reshape(info.shape))
    if info.dtype == "BF16":  # the top half of a float32: widen exactly
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif info.dtype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise CheckpointError(f"{path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # a big-endian machine
    array = array.reshape(info.shape)
    array.flags.writeable = False
    return array


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write(path, tensors, metadata=None):
    """Write `tensors` ({name: array}) to a safetensors file at `path`, atomically (a temporary
    file, fsynced, renamed into place). `metadata` is an optional {str: str}, such as
    {"format": "pt"}, which transformers asks for. Tensors are laid out largest item first, so
    with the header padded to 8 bytes every tensor is aligned to its item size."""
    path = Path(path)
    if metadata is not None:
        _metadata(metadata, "metadata")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == METADATA:
            raise ValueError(f"tensor names must be non-empty strings other than {METADATA}, "
                             f"got {name!r}")
        if isinstance(value, compact.BFloat16):  # its 16 bits, as BF16
            arrays[name] = (np.asarray(value.data, "<u2", order="C"), "BF16")
            continue
        array = np.asarray(value)
        if array.dtype.newbyteorder("=") not in NAME_OF:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be saved "
                             f"(only {', '.join(DTYPES)}, BF16 as a compact.BFloat16)")
        array = np.asarray(array, array.dtype.newbyteorder("<"), order="C")
        arrays[name] = (array, NAME_OF[array.dtype.newbyteorder("=")])
    order = sorted(arrays, key=lambda n: (-arrays[n][0].dtype.itemsize, n))
    header, offset = {}, 0
    if metadata:
        header[METADATA] = dict(metadata)
    for name in order:
        array, dtype = arrays[name]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = _json(header)
    text += " " * (-len(text) % HEADER_ALIGN)
    with files.atomic_file(path) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode("ascii"))
        for name in order:
            f.write(memoryview(arrays[name][0].reshape(-1).view(np.uint8)))


def _json(obj):
    return json.dumps(obj, separators=(",", ":"))  # ASCII: non-ASCII names are \u-escaped
