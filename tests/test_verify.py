"""Verify on first load: every tensor's CRC32C (or a safetensors file's known sha256, or its
structure) checked the first time a folder is loaded, a stamp of size, mtime and inode that lets
later loads skip the check until a file changes, and `picogpt verify MODEL`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _damaged import copy_of_tiny

import picogpt
from picogpt.errors import ModelError
from picogpt.formats import tf_checkpoint
from picogpt.hub import resolve, verify

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DATA = "model.ckpt.data-00000-of-00001"
TENSOR = "model/h1/mlp/c_fc/w"


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """The weights folder, where the stamps of folders picogpt does not write into go."""
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def flip_a_byte_of(folder, tensor=TENSOR, keep_mtime=False):
    """Flip one byte inside `tensor`'s bytes, in place (the same inode and size)."""
    entry = tf_checkpoint._read_entries(folder / "model.ckpt")[1][tensor]
    path = folder / DATA
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + 17)
        byte = f.read(1)[0]
        f.seek(entry["offset"] + 17)
        f.write(bytes([byte ^ 0x40]))
    if keep_mtime:  # what a stamp cannot tell from the file it checked
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_flipped_byte_is_refused_at_the_first_load_with_the_tensor_s_name(tmp_path):
    folder = copy_of_tiny(tmp_path / "tiny")
    flip_a_byte_of(folder)
    with pytest.raises(ModelError, match=f"tensor '{TENSOR}' fails its CRC32C check"):
        picogpt.load(folder)
    assert not verify.read_stamp(folder)


def test_the_first_load_stamps_and_later_loads_skip_until_a_file_changes(tmp_path):
    folder = copy_of_tiny(tmp_path / "tiny")
    picogpt.load(folder)
    stamp = json.loads((folder / verify.STAMP).read_text())["files"]
    assert stamp[DATA]["check"] == "crc32c"
    assert stamp[DATA]["size"] == (folder / DATA).stat().st_size
    assert stamp["model.ckpt.index"]["shards"] == [DATA]
    assert verify.verify_once(folder) is False  # stamped: nothing checked
    flip_a_byte_of(folder, keep_mtime=True)
    picogpt.load(folder)  # the same size, mtime and inode: the stamp vouches for it
    os.utime(folder / DATA)  # a file that changes (here only its mtime) is checked again
    with pytest.raises(ModelError, match=TENSOR):
        picogpt.load(folder)
    with pytest.raises(ModelError, match=TENSOR):  # and not stamped by the failure
        picogpt.load(folder)


def test_a_copy_is_checked_again(tmp_path):
    folder = copy_of_tiny(tmp_path / "tiny")
    assert verify.verify_once(folder) is True
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # the stamp comes along; the inodes do not
    assert verify.verify_once(copy) is True and verify.verify_once(copy) is False


def test_a_folder_inside_the_package_keeps_its_stamp_in_the_weights_folder(weights_dir):
    bundled = resolve.BUNDLED / "shakespeare-char"
    before = sorted(p.name for p in bundled.iterdir())
    assert verify.stamp_path(bundled).parent == weights_dir / verify.STAMPS
    picogpt.load("shakespeare-char")
    assert sorted(p.name for p in bundled.iterdir()) == before  # nothing written into it
    assert verify.verify_once(bundled) is False  # the stamp in the weights folder vouches


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_picogpt_may_not_write_keeps_its_stamp_in_the_weights_folder(tmp_path,
                                                                               weights_dir):
    folder = copy_of_tiny(tmp_path / "tiny")
    folder.chmod(0o555)
    try:
        picogpt.load(folder)
        assert not (folder / verify.STAMP).exists()
        assert verify.verify_once(folder) is False
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("weights", ["absent", "a-file/weights"])
def test_no_weights_folder_is_made_for_a_stamp_and_one_that_cannot_be_is_no_error(tmp_path,
                                                                                  monkeypatch,
                                                                                  weights):
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path / weights))
    (tmp_path / "a-file").write_text("not a folder")
    bundled = resolve.BUNDLED / "shakespeare-char"
    assert verify.verify_once(bundled) is True
    assert verify.verify_once(bundled) is True  # checked again: nothing could be recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# --- HuggingFace's layout ---------------------------------------------------------------------


def test_hf_folders_are_checked_by_structure_or_by_the_sha256_of_a_hub_cache_s_blob(tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(FIXTURES / "gpt2-tiny-hf16", plain)
    [checked] = verify.check(plain)
    assert checked.how == "structure" and "no sha256 is known" in checked.said
    # A hub cache: the snapshot's file links to a blob named by its sha256.
    cache = tmp_path / "models--x" / "snapshots" / "abc"
    shutil.copytree(plain, cache, ignore=shutil.ignore_patterns(verify.STAMP))
    weights = (cache / "model.safetensors").read_bytes()
    import hashlib

    blob = tmp_path / "models--x" / "blobs" / hashlib.sha256(weights).hexdigest()
    blob.parent.mkdir()
    (cache / "model.safetensors").rename(blob)
    (cache / "model.safetensors").symlink_to(blob)
    [checked] = verify.check(cache)
    assert checked.how == "sha256" and "blob" in checked.said
    picogpt.load(cache)
    data = bytearray(weights)
    data[-3] ^= 1  # a value, not the header: the structure still holds
    blob.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        picogpt.load(cache)


# --- picogpt verify ---------------------------------------------------------------------------


def picogpt_verify(*args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"))
    return subprocess.run([sys.executable, "-m", "picogpt", "verify", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_picogpt_verify_says_how_each_file_was_checked_or_names_the_tensor(tmp_path):
    folder = copy_of_tiny(tmp_path / "tiny")
    shards = FIXTURES / "gpt2-tiny-hf-shards"
    out = picogpt_verify(str(folder), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"{folder / DATA}: {len(tf_checkpoint.read(folder))} tensors, each matches its CRC32C",
        f"{folder}: the weights are intact"]
    out = picogpt_verify(str(shards), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 4 and "no sha256 is known" in out.stdout
    flip_a_byte_of(folder, keep_mtime=True)  # `verify` checks whatever the stamp says
    out = picogpt_verify(str(folder), tmp_path=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr == (f"picogpt: {folder / 'model.ckpt'}: tensor '{TENSOR}' fails its "
                          "CRC32C check (corrupted)\n")
    out = picogpt_verify("no-such-model", tmp_path=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
