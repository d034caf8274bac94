"""The checkpoint reader against bytes written by real TensorFlow, the writer against TensorFlow's
reader, and every malformed input against CheckpointError."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _memory import HAS_SMAPS, resident_kb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picogpt.formats import crc32c as crc
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.formats.tf_checkpoint import CheckpointError
from picogpt.gpt2 import parallel

FIXTURES = Path(__file__).parent / "fixtures"
TF_WRITTEN = ["gpt2-tiny", "dtypes", "many"]


def crc32c_reference(data):
    """Bit-at-a-time CRC32C, straight from the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


def expected_values(name):
    with np.load(FIXTURES / f"{name}.npz") as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture
def tiny(tmp_path):
    """A private copy of the TF-written GPT-2 fixture, safe to corrupt."""
    folder = tmp_path / "gpt2-tiny"
    shutil.copytree(FIXTURES / "gpt2-tiny", folder)
    return folder


# --- reading what TensorFlow wrote --------------------------------------------------------------


@pytest.mark.parametrize("name", TF_WRITTEN)
def test_reads_every_tensor_tensorflow_wrote(name):
    assert_same_tensors(checkpoint.read(FIXTURES / name), expected_values(name))
    checkpoint.verify(FIXTURES / name)


def test_gpt2_layout_names_and_shapes():
    params = checkpoint.read(FIXTURES / "gpt2-tiny")
    assert params["model/h1/attn/c_attn/w"].shape == (1, 32, 96)
    assert params["model/h0/mlp/c_proj/w"].shape == (1, 128, 32)
    assert params["model/wte"].shape == (513, 32)
    assert all(v.dtype == np.float32 for v in params.values())


def test_many_tensors_span_several_index_blocks():
    index = (FIXTURES / "many" / "model.ckpt.index").read_bytes()
    assert len(index) > 2 * checkpoint.BLOCK_TARGET  # else the test would not cover block walks
    assert len(checkpoint.read(FIXTURES / "many")) == 400


def test_arrays_are_read_only_views_of_the_file():
    params = checkpoint.read(FIXTURES / "gpt2-tiny")
    w = params["model/wte"]
    assert not w.flags.writeable and not w.flags.owndata
    base = w
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    with pytest.raises(ValueError):
        w[0, 0] = 1.0


@pytest.mark.skipif(not HAS_SMAPS, reason="needs Linux's smaps")
def test_release_hands_back_the_pages_and_keeps_the_values(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal(1000).astype(np.float32),
        "big": rng.standard_normal((2048, 4096)).astype(np.float32),  # 32 MB
        "c": rng.standard_normal(1000).astype(np.float32),
    }
    checkpoint.write(tmp_path / "model.ckpt", tensors)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    params = checkpoint.read(tmp_path)
    assert float(params["big"].sum()) == pytest.approx(float(tensors["big"].sum()), rel=1e-4)
    touched = resident_kb(data)
    assert touched >= 32 << 10
    checkpoint.release(params["big"])
    assert resident_kb(data) <= touched - (32 << 10) + 8  # at most its two edge pages stay
    assert_same_tensors(params, tensors)  # released pages fault back in, unchanged
    checkpoint.release(tensors["a"])  # not mapped: nothing to do
    checkpoint.release(params["a"])  # smaller than a page: no whole page to hand back
    assert_same_tensors(params, tensors)


def test_prefix_folder_and_stale_absolute_path(tiny):
    expected = expected_values("gpt2-tiny")
    assert_same_tensors(checkpoint.read(tiny / "model.ckpt"), expected)
    # As in OpenAI's downloads: the recorded path was absolute on another machine.
    (tiny / "checkpoint").write_text('model_checkpoint_path: "/home/openai/models/model.ckpt"\n')
    assert_same_tensors(checkpoint.read(tiny), expected)
    (tiny / "checkpoint").unlink()  # no state file: the folder's single index is used
    assert_same_tensors(checkpoint.read(tiny), expected)


def test_folder_errors(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.read(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.read(empty)
    (tiny / "checkpoint").write_text('model_checkpoint_path: "other.ckpt"\n')
    with pytest.raises(CheckpointError, match="other.ckpt"):
        checkpoint.read(tiny)
    (tiny / "checkpoint").unlink()
    shutil.copy(tiny / "model.ckpt.index", tiny / "second.index")
    with pytest.raises(CheckpointError, match="several"):
        checkpoint.read(tiny)


# --- CRC32C -------------------------------------------------------------------------------------


def test_crc32c_check_value():
    assert checkpoint.crc32c(b"123456789") == 0xE3069283
    assert checkpoint.crc32c(b"") == 0


@pytest.mark.parametrize("size", [1, 3, 4095, 65536, 4 * 4 * crc.LANES + 5, 300_001])
def test_crc32c_matches_reference_at_every_size(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    # The bit-at-a-time reference is slow: compare it on the ends, the table loop on the whole.
    expected = crc._crc32c_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    assert checkpoint.crc32c(data) == expected
    assert checkpoint.crc32c(data[:2000]) == crc32c_reference(data[:2000])
    cut = size // 3
    assert checkpoint.crc32c(data[cut:], checkpoint.crc32c(data[:cut])) == expected


@pytest.mark.parametrize("threads", [1, 3])
def test_crc32c_many_in_pieces_on_every_core_is_crc32c_of_each(threads):
    before = parallel.set_threads(threads)
    try:
        rng = np.random.default_rng(threads)
        sizes = [0, 1, 5000, crc.CHUNK - 1, crc.CHUNK, crc.CHUNK + 1, 2 * crc.CHUNK + 4100]
        buffers = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
        seen = []
        got = crc.crc32c_many(buffers, done=lambda piece: seen.append(len(piece)))
        assert got == [crc.crc32c(b) for b in buffers]
        assert sum(seen) == sum(sizes) and max(seen) == crc.CHUNK  # each piece read once
    finally:
        parallel.set_threads(before)


@pytest.mark.parametrize("name", TF_WRITTEN)
def test_crc32c_matches_what_tensorflow_stored(name):
    entries = checkpoint._read_entries(FIXTURES / name / "model.ckpt")[1]
    params = checkpoint.read(FIXTURES / name)
    for tensor, entry in entries.items():
        crc = checkpoint.crc32c(np.ascontiguousarray(params[tensor]).reshape(-1).view(np.uint8))
        if tensor == "bf16/vector":  # widened on read: TF's CRC is of the 16-bit bytes
            continue
        assert checkpoint.mask_crc(crc) == entry["crc32c"], tensor
        assert checkpoint.unmask_crc(entry["crc32c"]) == crc


# --- writing ------------------------------------------------------------------------------------


def sample_tensors():
    rng = np.random.default_rng(3)
    tensors = {
        "model/wte": rng.standard_normal((50, 8)).astype(np.float32),
        "model/h0/attn/c_attn/w": rng.standard_normal((1, 8, 24)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal(4).astype(np.float16),
        "i8": np.arange(-5, 5, dtype=np.int8),
        "u16": np.arange(7, dtype=np.uint16),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i64": np.array([-(2**40), 2**40]),
        "bool": np.array([True, False, True]),
        "c128": np.array([1 + 2j, -3j]),
        "scalar": np.array(7.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big": rng.standard_normal(40_000).astype(np.float32),  # the vectorised CRC path
        "fortran": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "big_endian": np.arange(4, dtype=">i4"),
    }
    tensors.update({f"many/tensor_{i:03d}": np.full(3, i, np.float32) for i in range(300)})
    return tensors


def test_write_then_read(tmp_path):
    tensors = sample_tensors()
    checkpoint.write(tmp_path / "model.ckpt", tensors)
    got = checkpoint.read(tmp_path)
    checkpoint.verify(tmp_path)
    expected = {k: v.astype(v.dtype.newbyteorder("=")) for k, v in tensors.items()}
    assert_same_tensors(got, expected)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
    ]  # fmt: skip


def test_write_then_tensorflow_reads(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tensors = sample_tensors()
    checkpoint.write(tmp_path / "model.ckpt", tensors)
    reader = tf.train.load_checkpoint(str(tmp_path))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tensors)
    for name, value in tensors.items():
        got = np.asarray(reader.get_tensor(name))
        assert got.dtype == value.dtype.newbyteorder("="), name
        assert got.shape == value.shape and np.array_equal(got, value), name


def test_write_rejects_what_it_cannot_save(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        checkpoint.write(tmp_path / "m.ckpt", {"s": np.array(["text"])})
    with pytest.raises(ValueError, match="names"):
        checkpoint.write(tmp_path / "m.ckpt", {"": np.zeros(1)})
    assert not list(tmp_path.iterdir())


def test_write_replaces_an_older_checkpoint_whole(tmp_path):
    checkpoint.write(tmp_path / "model.ckpt", {"a": np.zeros(1000, np.float32)})
    checkpoint.write(tmp_path / "model.ckpt", {"b": np.ones(3, np.float32)})
    assert_same_tensors(checkpoint.read(tmp_path), {"b": np.ones(3, np.float32)})
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- bundles TensorFlow does not write by default, built from the format's parts ----------------


def build_bundle(prefix, tensors, header=None, entry_overrides=None, shards=None, compression=0):
    """A bundle written from raw parts, so tests can vary what `write` keeps fixed."""
    header = header or {}
    num_shards = header.get("num_shards", 1)
    big_endian = header.get("endianness", 0) == 1
    shards = shards or {}
    data = {s: bytearray() for s in range(num_shards)}
    entries = [(b"", checkpoint._header_proto(num_shards, 1 if big_endian else 0))]
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype_code = checkpoint.TF_DTYPE[array.dtype]
        if big_endian:
            array = array.astype(array.dtype.newbyteorder(">"))
        raw = array.tobytes()
        shard = shards.get(name, 0)
        offset = len(data[shard])
        data[shard] += raw
        fields = dict(dtype=dtype_code, shape=array.shape, offset=offset, size=len(raw))
        fields.update((entry_overrides or {}).get(name, {}))
        proto = checkpoint._entry_proto(
            fields["dtype"], fields["shape"], fields["offset"], fields["size"],
            checkpoint.crc32c(raw),
        )  # fmt: skip
        proto = checkpoint._field_varint(3, shard) + proto
        entries.append((name.encode(), proto + fields.get("extra", b"")))
    for shard, raw in data.items():
        checkpoint._shard_path(prefix, shard, num_shards).write_bytes(bytes(raw))
    Path(f"{prefix}.index").write_bytes(checkpoint._index_bytes(entries, compression))


def test_big_endian_bundle_is_byte_swapped(tmp_path):
    tensors = {"f": np.linspace(-1, 1, 7).astype(np.float32), "i": np.arange(5, dtype=np.int64)}
    build_bundle(tmp_path / "m.ckpt", tensors, header={"endianness": 1})
    got = checkpoint.read(tmp_path / "m.ckpt")
    assert_same_tensors(got, tensors)
    assert got["f"].dtype.isnative


def test_several_shards(tmp_path):
    tensors = {f"t{i}": np.full(i + 1, i, np.float32) for i in range(6)}
    shards = {f"t{i}": i % 3 for i in range(6)}
    build_bundle(tmp_path / "m.ckpt", tensors, header={"num_shards": 3}, shards=shards)
    assert_same_tensors(checkpoint.read(tmp_path / "m.ckpt"), tensors)
    checkpoint.verify(tmp_path / "m.ckpt")


def test_bfloat16_is_widened_to_float32():
    values = expected_values("dtypes")["bf16/vector"]
    got = checkpoint.read(FIXTURES / "dtypes")["bf16/vector"]
    assert got.dtype == np.float32 and np.array_equal(got, values)
    assert np.all(got.view(np.uint32) & 0xFFFF == 0)


# --- malformed input: CheckpointError with the file name, nothing else --------------------------


def corrupt(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0x40) if value is None else value
    path.write_bytes(bytes(data))


def test_missing_data_file(tiny):
    (tiny / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="data-00000-of-00001"):
        checkpoint.read(tiny)


def test_bad_magic(tiny):
    index = tiny / "model.ckpt.index"
    corrupt(index, index.stat().st_size - 1)
    with pytest.raises(CheckpointError, match="magic.*|model.ckpt.index"):
        checkpoint.read(tiny)


@pytest.mark.parametrize("keep", [0, 10, 47, 200])
def test_truncated_index(tiny, keep):
    index = tiny / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="model.ckpt.index"):
        checkpoint.read(tiny)


def test_truncated_data(tiny):
    data = tiny / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="outside"):
        checkpoint.read(tiny)


def test_block_crc_mismatch(tiny):
    corrupt(tiny / "model.ckpt.index", 30)
    with pytest.raises(CheckpointError, match="CRC32C"):
        checkpoint.read(tiny)


def test_corrupted_tensor_is_named(tiny):
    params = checkpoint._read_entries(tiny / "model.ckpt")[1]
    entry = params["model/h1/mlp/c_fc/w"]
    corrupt(tiny / "model.ckpt.data-00000-of-00001", entry["offset"] + 17)
    checkpoint.read(tiny)  # reading maps without checking: verify is the full check
    with pytest.raises(CheckpointError, match="model/h1/mlp/c_fc/w"):
        checkpoint.verify(tiny)


def test_compressed_block(tmp_path):
    build_bundle(tmp_path / "m.ckpt", {"a": np.zeros(2, np.float32)}, compression=1)
    with pytest.raises(CheckpointError, match="compressed"):
        checkpoint.read(tmp_path / "m.ckpt")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"dtype": 99}, "unknown dtype 99"),
        ({"dtype": 7}, "string dtype"),
        ({"offset": 10**6}, "outside"),
        ({"size": 12}, "does not match shape"),
        ({"shape": (3, 2**62)}, "does not match shape"),
        ({"extra": checkpoint._field_bytes(7, b"")}, "partitioned"),
    ],
)
def test_bad_entries(tmp_path, override, message):
    tensors = {"a": np.zeros((2, 4), np.float32), "b": np.ones(3, np.float32)}
    build_bundle(tmp_path / "m.ckpt", tensors, entry_overrides={"a": override})
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.read(tmp_path / "m.ckpt")
    assert "m.ckpt" in str(info.value)


def test_varint_running_off_the_end():
    with pytest.raises(CheckpointError, match="varint runs off the end"):
        list(checkpoint._proto_fields(b"\x08\xff\xff", "somefile.index"))


def test_shard_outside_the_header_count(tmp_path):
    build_bundle(tmp_path / "m.ckpt", {"a": np.zeros(2, np.float32)})
    entries = [
        (b"", checkpoint._header_proto(1)),
        (b"a", checkpoint._field_varint(3, 5) + checkpoint._entry_proto(1, (2,), 0, 8, 0)),
    ]
    Path(f"{tmp_path}/m.ckpt.index").write_bytes(checkpoint._index_bytes(entries))
    with pytest.raises(CheckpointError, match="shard 5"):
        checkpoint.read(tmp_path / "m.ckpt")


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def read_and_verify_or_checkpoint_error(folder, expected):
    """Either CheckpointError, or the checkpoint still holds exactly the expected tensors."""
    try:
        got = checkpoint.read(folder)
        checkpoint.verify(folder)
    except CheckpointError:
        return
    assert_same_tensors(got, expected)


@FUZZ
@given(data=st.data())
def test_fuzz_index_flips_and_truncations(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(FIXTURES / "gpt2-tiny", folder, dirs_exist_ok=True)
    index = folder / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        if raw:
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[at] = data.draw(st.integers(0, 255), label="byte")
    index.write_bytes(bytes(raw))
    read_and_verify_or_checkpoint_error(folder, expected_values("gpt2-tiny"))


@FUZZ
@given(data=st.data())
def test_fuzz_data_flips_and_truncations(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(FIXTURES / "gpt2-tiny", folder, dirs_exist_ok=True)
    shard = folder / "model.ckpt.data-00000-of-00001"
    raw = bytearray(shard.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        checkpoint.read(folder)
        checkpoint.verify(folder)


def test_write_then_read_many_tensors_in_several_blocks_keeps_them_all(tmp_path):
    # The order and overlap checks hold for what picogpt itself writes, across index blocks.
    tensors = {f"layer{i:03d}/w": np.full((i % 7) + 1, i, np.float32) for i in range(300)}
    tensors["empty"] = np.zeros((0, 4), np.float32)
    checkpoint.write(tmp_path / "model.ckpt", tensors)
    assert_same_tensors(checkpoint.read(tmp_path), tensors)
    checkpoint.verify(tmp_path)


def test_a_state_file_that_is_not_a_regular_file(tiny):
    (tiny / "checkpoint").unlink()
    (tiny / "checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.read(tiny)


@pytest.mark.parametrize("shape", [(0, 2**63 - 1, 2**63 - 1), (0, 2**62), (2**61, 0, 8)])
def test_a_shape_numpy_cannot_describe_is_a_checkpoint_error(tmp_path, shape):
    # No bytes, so the size (0) matches; NumPy still refuses to describe such an array.
    build_bundle(tmp_path / "m.ckpt", {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)},
                 entry_overrides={"a": {"shape": shape, "size": 0}})
    for check in (checkpoint.read, checkpoint.verify):
        with pytest.raises(CheckpointError, match=r"m\.ckpt\.index: tensor 'a'.*cannot exist"):
            check(tmp_path / "m.ckpt")
