"""Model folders whose files are intact (every CRC32C matches) but whose weights are not: the
tiny TF-written fixture with a NaN in one tensor, or with its index saying big-endian over its
little-endian data, and the tiny float16 one (transformers') with an infinity or a NaN in one
weight matrix. All load; their logits are not finite numbers."""

import shutil
from pathlib import Path

import numpy as np

from picogpt.formats import safetensors, tf_checkpoint

TINY = Path(__file__).parent / "fixtures" / "gpt2-tiny"
TINY_HF16 = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf16"


def copy_of_tiny(folder):
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns(".picogpt-verified"))
    return Path(folder)


def with_a_nan(folder, tensor="model/h1/mlp/c_fc/b"):
    """The fixture with one NaN in `tensor`, written with its checksums (so it verifies)."""
    folder = copy_of_tiny(folder)
    params = {name: np.array(value) for name, value in tf_checkpoint.read(folder).items()}
    params[tensor].reshape(-1)[3] = np.nan
    tf_checkpoint.write(folder / "model.ckpt", params)
    return folder


def big_endian_over_little(folder):
    """The fixture with its index rewritten to say big-endian: the data's bytes and their
    CRC32Cs are untouched, and every value is read byte-swapped."""
    folder = copy_of_tiny(folder)
    prefix = folder / "model.ckpt"
    _, entries = tf_checkpoint._read_entries(prefix)
    rows = [(b"", tf_checkpoint._header_proto(1, endianness=1))]
    for name in sorted(entries, key=str.encode):
        e = entries[name]
        rows.append((name.encode(), tf_checkpoint._entry_proto(
            e["dtype"], e["shape"], e["offset"], e["size"], tf_checkpoint.unmask_crc(e["crc32c"]))))
    Path(f"{prefix}.index").write_bytes(tf_checkpoint._index_bytes(rows))
    return folder


def half_weights_with(folder, value, tensor="transformer.h.0.mlp.c_fc.weight"):
    """The float16 fixture with `value` (inf, NaN) as one weight of a block's matrix."""
    shutil.copytree(TINY_HF16, folder, ignore=shutil.ignore_patterns(".picogpt-verified"))
    path = Path(folder) / "model.safetensors"
    tensors = {name: np.array(array) for name, array in dict(safetensors.read(path)).items()}
    tensors[tensor][1, 2] = value
    path.unlink()
    safetensors.write(path, tensors, metadata={"format": "pt"})
    return Path(folder)
