"""The safetensors reader and writer against the real `safetensors` package (each reads what the
other writes, for every dtype), and every malformed or lying file against CheckpointError."""

import json
import mmap
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picogpt.errors import CheckpointError
from picogpt.formats import safetensors

NUMPY_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "float16", "uint32", "int32",
                "float32", "uint64", "int64", "float64"]  # fmt: skip


def sample_tensors(rng):
    """One tensor of each NumPy dtype the format has, and the awkward shapes: 0-d, empty, 3-d."""
    tensors = {}
    for i, name in enumerate(NUMPY_DTYPES):
        dtype = np.dtype(name)
        shape = [(), (0, 3), (2, 3, 4), (5,)][i % 4]
        if dtype.kind == "b":
            value = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            value = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        tensors[f"t.{name}"] = value
    tensors["model/h0/attn/c_attn/w"] = rng.standard_normal((1, 4, 12)).astype(np.float32)
    tensors["ünïcode name"] = np.arange(3, dtype=np.int64)
    return tensors


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        value = np.asarray(value)
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


def test_the_safetensors_package_reads_what_picogpt_writes(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors(np.random.default_rng(0))
    safetensors.write(tmp_path / "a.safetensors", tensors, {"format": "pt", "note": "ü"})
    assert_same(sn.load_file(tmp_path / "a.safetensors"), tensors)
    from safetensors import safe_open

    with safe_open(tmp_path / "a.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt", "note": "ü"}


def test_picogpt_reads_what_the_safetensors_package_writes(tmp_path):
    sn = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors(np.random.default_rng(1))
    sn.save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "np"})
    assert_same(safetensors.read(tmp_path / "a.safetensors"), tensors)
    metadata, entries, _ = safetensors.read_header(tmp_path / "a.safetensors")
    assert metadata == {"format": "np"}
    w = entries["model/h0/attn/c_attn/w"]
    assert w.shape == (1, 4, 12) and w.dtype == "F32" and w.end - w.begin == 4 * 48


def test_bfloat16_from_torch_is_widened_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    value = torch.randn(7, 3, dtype=torch.bfloat16)
    save_file({"w": value, "h": value.half()}, tmp_path / "a.safetensors")
    got = safetensors.read(tmp_path / "a.safetensors")
    assert got["w"].dtype == np.float32
    assert np.array_equal(got["w"], value.float().numpy())
    assert got["h"].dtype == np.float16 and np.array_equal(got["h"], value.half().numpy())


def test_round_trip_and_alignment(tmp_path):
    tensors = sample_tensors(np.random.default_rng(2))
    path = tmp_path / "a.safetensors"
    safetensors.write(path, tensors)
    assert_same(safetensors.read(path), tensors)
    metadata, entries, start = safetensors.read_header(path)
    assert metadata == {} and start % 8 == 0
    for name, info in entries.items():
        assert info.begin % np.asarray(tensors[name]).dtype.itemsize == 0, name


def test_arrays_are_read_only_views_of_a_memory_map(tmp_path):
    path = tmp_path / "a.safetensors"
    safetensors.write(path, {"w": np.arange(4096, dtype=np.float32)})
    w = safetensors.read(path)["w"]
    assert not w.flags.writeable
    base = w
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.base
    assert isinstance(base, mmap.mmap)


def test_write_is_atomic_and_checks_its_input(tmp_path):
    path = tmp_path / "a.safetensors"
    safetensors.write(path, {"old": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="complex64"):
        safetensors.write(path, {"a": np.ones(2), "c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="__metadata__"):
        safetensors.write(path, {"__metadata__": np.ones(2)})
    with pytest.raises(CheckpointError, match="strings"):
        safetensors.write(path, {"a": np.ones(2)}, metadata={"format": 1})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# --- malformed files --------------------------------------------------------------------------

def raw_file(path, header, data=b"", length=None):
    """A safetensors file with `header` (a dict, or str/bytes as they are) and `data`."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [
    ({"a": entry(offsets=(0, 12))}, "8 bytes, but data_offsets"),
    ({"a": entry(shape=(3,))}, "12 bytes"),
    ({"a": entry(shape=(4,), offsets=(0, 16))}, "outside the data section"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, "overlaps"),
    ({"a": entry(offsets=(4, 12))}, "hole"),
    ({"a": entry(shape=(1,), offsets=(0, 4))}, "no tensor accounts for"),
    ({"a": entry(offsets=(8, 0))}, "end before they begin"),
    ({"a": entry(offsets=(-8, 0))}, "not two whole numbers"),
    ({"a": entry(offsets=(0, 8.0))}, "not two whole numbers"),
    ({"a": entry(offsets=(0,))}, "not two whole numbers"),
    ({"a": entry(shape=(-2,))}, "whole numbers"),
    ({"a": entry(shape=(True, 2))}, "whole numbers"),
    ({"a": entry(shape=(2**62, 2**62, 2**62))}, "data_offsets"),  # no allocation: a mismatch
    # Empty, so its offsets match; NumPy still cannot describe it ("array is too big").
    ({"a": entry(shape=(0, 2**63 - 1, 2**63 - 1), offsets=(0, 0)), "b": entry()}, "cannot exist"),
    ({"a": entry(shape=(0, 2**70), offsets=(0, 0)), "b": entry()}, "cannot exist"),
    ({"a": entry(shape=(1,) * 65 + (2,))}, "dimensions"),
    ({"a": entry(dtype="F8_E4M3")}, "not supported"),
    ({"a": entry(dtype="c64")}, "not supported"),
    ({"a": {**entry(), "extra": 1}}, "exactly dtype"),
    ({"a": [1, 2]}, "exactly dtype"),
    ({"__metadata__": {"format": 3}, "a": entry()}, "strings to strings"),
    ("[1, 2]", "not a JSON object"),
    ('{"a": ', "not valid JSON"),
    ('{"a": ' + "[" * 100_000, "nested too deeply"),
    (b'{"\xff": 1}', "not UTF-8"),
]


@pytest.mark.parametrize("header, message", BAD_HEADERS, ids=[m for _, m in BAD_HEADERS])
def test_lying_or_malformed_headers(tmp_path, header, message):
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=message) as e:
        safetensors.read(path)
    assert str(path) in str(e.value)


def test_header_length_is_bounded_before_it_is_read(tmp_path):
    path = raw_file(tmp_path / "a.safetensors", b"{}", length=safetensors.MAX_HEADER + 1)
    with pytest.raises(CheckpointError, match="more than the 100,000,000 bytes"):
        safetensors.read(path)
    path = raw_file(tmp_path / "b.safetensors", b"{}", length=2**64 - 1)
    with pytest.raises(CheckpointError, match="more than"):
        safetensors.read(path)
    path = raw_file(tmp_path / "c.safetensors", b"{}    ", length=1000)
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        safetensors.read(path)


@pytest.mark.parametrize("size", [0, 5])
def test_too_short(tmp_path, size):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\1" * size)
    with pytest.raises(CheckpointError, match="too short"):
        safetensors.read(path)


def test_cut_short(tmp_path):
    path = tmp_path / "a.safetensors"
    safetensors.write(path, {"a": np.ones(100, np.float32), "b": np.ones(3, np.int8)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(CheckpointError, match="cut short"):
        safetensors.read(path)


def test_bool_bytes_other_than_0_and_1(tmp_path):
    path = raw_file(tmp_path / "a.safetensors", {"b": entry("BOOL", (2,), (0, 2))}, b"\1\2")
    with pytest.raises(CheckpointError, match="BOOL tensor 'b'"):
        safetensors.read(path)


def test_not_a_regular_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safetensors.read(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        safetensors.read(tmp_path)


def test_empty_tensors_may_share_an_offset(tmp_path):
    header = {"a": entry(shape=(0,), offsets=(0, 0)), "b": entry(shape=(0, 5), offsets=(0, 0)),
              "c": entry()}  # fmt: skip
    got = safetensors.read(raw_file(tmp_path / "a.safetensors", header, b"\0" * 8))
    assert got["a"].shape == (0,) and got["b"].shape == (0, 5) and got["c"].shape == (2,)


# --- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def read_or_checkpoint_error(path):
    """Either CheckpointError, or tensors that the safetensors package reads the same."""
    try:
        got = safetensors.read(path)
    except CheckpointError:
        return None
    for name, value in got.items():
        assert value.nbytes <= path.stat().st_size, name
    return got


@FUZZ
@given(data=st.data())
def test_fuzz_flips_and_truncations(tmp_path_factory, data):
    sn = pytest.importorskip("safetensors.numpy")
    path = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    tensors = sample_tensors(np.random.default_rng(3))
    del tensors["t.bool"]  # a flipped bool byte is refused by picogpt only
    safetensors.write(path, tensors, {"format": "pt"})
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    n_header = 8 + struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else len(raw)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        if raw:  # mostly in the header, where a flip can make the file lie
            at = data.draw(st.integers(0, min(len(raw), n_header + 16) - 1), label="at")
            raw[at] = data.draw(st.integers(0, 255), label="byte")
    path.write_bytes(bytes(raw))
    got = read_or_checkpoint_error(path)
    if got is not None:  # what picogpt accepts, the reference reads the same
        assert_same(got, sn.load_file(path))


@st.composite
def lying_headers(draw):
    """Headers of a few tensors with arbitrary dtypes, shapes and offsets, and a data section of
    arbitrary length: most lie, some happen to be true."""
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    header = {}
    for name in names:
        dtype = draw(st.sampled_from([*safetensors.DTYPES, "F8_E5M2"]))
        shape = draw(st.lists(st.integers(0, 6) | st.integers(-1, 2**64), max_size=3))
        begin = draw(st.integers(0, 64) | st.integers(-1, 2**64))
        end = draw(st.integers(0, 64) | st.integers(-1, 2**64))
        header[name] = entry(dtype, shape, (begin, end))
    return header, draw(st.integers(0, 96))


@FUZZ
@given(case=lying_headers())
def test_fuzz_lying_headers(tmp_path_factory, case):
    header, data_size = case
    path = raw_file(tmp_path_factory.mktemp("fuzz") / "a.safetensors", header,
                    b"\1" * data_size)  # fmt: skip
    got = read_or_checkpoint_error(path)
    if got is not None:
        assert sum(v.size * safetensors.DTYPES[header[k]["dtype"]].itemsize
                   for k, v in got.items()) == data_size  # fmt: skip
