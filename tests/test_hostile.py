"""Hostile and clumsy input (issue 11, findings 4-9): every case is built here, in the test
(crafted indexes, FIFOs, sparse files, /dev/zero links, JSON bombs, hparams that lie), and each
must end with one clear error (the API: the named exception, the file in its message, the cause
chained; the command line: one line on stderr, no traceback, the documented exit status), at once
and without a large allocation; or with the right result."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import picogpt
from picogpt.errors import CheckpointError, ModelError, VocabularyError
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.gpt2 import engine
from picogpt.gpt2.params import param_shapes
from picogpt.tokenizers.chars import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "gpt2-tiny"  # GPT-2 layout, 2 layers, BPE of 513 tokens
SHAKESPEARE = ROOT / "picogpt" / "models" / "shakespeare-char"  # 65 characters
INDEX = "model.ckpt.index"
SPARSE_SIZE = 3 << 30


# --- helpers --------------------------------------------------------------------------------------

@contextmanager
def deadline(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(signum, frame):
        raise AssertionError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def bounded(seconds=5, megabytes=64):
    """The block must end within `seconds` and allocate at most `megabytes` at its peak."""
    tracemalloc.start()
    try:
        with deadline(seconds):
            yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < megabytes << 20, f"peak allocation {peak >> 20} MB"


def copy_model(tmp_path, source=TINY, name="model"):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    return folder


def load_error(folder, seconds=5, megabytes=64):
    """The ModelError that loading `folder` raises, within the time and memory bounds."""
    with bounded(seconds, megabytes), pytest.raises(ModelError) as info:
        picogpt.load(folder)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
    return info.value


def write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")


def set_hparams(folder, **changes):
    path = folder / "hparams.json"
    hparams = json.loads(path.read_text())
    hparams.update(changes)
    write_json(path, hparams)


def make_char_model(folder, chars, n_ctx, n_layer=1, n_embd=8, n_head=2, seed=0):
    """A model folder of random weights with a character vocabulary."""
    hparams = dict(n_vocab=len(chars), n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(0, 0.5, shape).astype(np.float32)
              for name, shape in param_shapes(hparams).items()}
    folder.mkdir(parents=True)
    write_json(folder / "hparams.json", hparams)
    checkpoint.write(folder / "model.ckpt", params)
    CharTokenizer(chars).save(folder)
    return folder


def make_fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def make_dev_zero_link(path):
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def make_sparse(path):
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)


HOSTILE_FILES = {"fifo": make_fifo, "dev-zero": make_dev_zero_link, "sparse-3GB": make_sparse}
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(),
                                reason="needs FIFOs and /dev/zero")


def picogpt_cmd(*args, input=None, cwd=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8",
               PICOGPT_WEIGHTS=str(cwd or "/nonexistent"), PICOGPT_BASE_URL="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "picogpt", *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def assert_one_line_error(out, status):
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr.strip()


# --- crafted SSTables -----------------------------------------------------------------------------

def raw_block(entries, shared=None):
    """An SSTable block body of (key, value) entries; `shared[i]` bytes of entry i's key are
    taken from the previous key (prefix compression), as TensorFlow's writer does."""
    body, previous = bytearray(), b""
    for i, (key, value) in enumerate(entries):
        n = (shared or {}).get(i, 0)
        assert key[:n] == previous[:n]
        body += checkpoint._varint(n) + checkpoint._varint(len(key) - n)
        body += checkpoint._varint(len(value)) + key[n:] + value
        previous = key
    return bytes(body) + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")


def sstable(data_blocks, index_entries=None):
    """Index bytes: the data blocks in order, then an index block of (key, handle) entries (by
    default one per data block), an empty metaindex block and the footer."""
    out, handles = bytearray(), []
    for body in data_blocks:
        handles.append(checkpoint._varint(len(out)) + checkpoint._varint(len(body)))
        out += checkpoint._with_trailer(body)
    if index_entries is None:
        index_entries = [(b"\xff" * (i + 1), h) for i, h in enumerate(handles)]
    blocks = {}
    for name, body in (("meta", raw_block([])), ("index", raw_block(index_entries))):
        blocks[name] = checkpoint._varint(len(out)) + checkpoint._varint(len(body))
        out += checkpoint._with_trailer(body)
    footer = (blocks["meta"] + blocks["index"]).ljust(40, b"\x00")
    return bytes(out + footer + checkpoint.TABLE_MAGIC.to_bytes(8, "little"))


def header_entry():
    return (b"", checkpoint._header_proto())


def tensor_entry(name, offset=0, n=2):
    proto = checkpoint._entry_proto(1, (n,), offset, 4 * n, checkpoint.crc32c(bytes(4 * n)))
    return (name, proto)


def write_index(folder, index, data=bytes(64)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).write_bytes(index)
    (folder / "model.ckpt.data-00000-of-00001").write_bytes(data)
    return folder


def test_the_crafted_sstable_helpers_make_a_readable_index(tmp_path):
    """So that the errors below come from what each case changes, not from the helpers."""
    entries = [header_entry(), tensor_entry(b"model/a"), tensor_entry(b"model/b", offset=8)]
    folder = write_index(tmp_path / "ok", sstable([raw_block(entries, shared={2: 6})]))
    got = checkpoint.read(folder)
    assert sorted(got) == ["model/a", "model/b"] and got["model/b"].shape == (2,)
    checkpoint.verify(folder)


# --- finding 4: an index cannot make the reader work or allocate beyond its size ------------------

def test_index_naming_one_block_40000_times_is_rejected_at_once(tmp_path):
    block = raw_block([header_entry(), tensor_entry(b"model/a")])
    handle = checkpoint._varint(0) + checkpoint._varint(len(block))
    index = sstable([block], [(b"k%05d" % i, handle) for i in range(40_000)])
    assert len(index) > 400_000  # about the size of the 785 KB case
    folder = write_index(tmp_path / "m", index)
    with deadline(5), pytest.raises(CheckpointError, match="overlaps") as info:
        checkpoint.read(folder)
    assert INDEX in str(info.value)


def test_overlapping_data_blocks_are_rejected(tmp_path):
    first = raw_block([header_entry(), tensor_entry(b"model/a")])
    second = raw_block([tensor_entry(b"model/b", offset=8)])
    index = sstable([first, second])
    handle = checkpoint._varint(0) + checkpoint._varint(len(first))
    # the second index entry points back into the first block
    index = sstable([first, second], [(b"a", handle), (b"b", handle)])
    with pytest.raises(CheckpointError, match="overlaps"):
        checkpoint.read(write_index(tmp_path / "m", index))


def test_keys_that_grow_by_prefix_compression_are_bounded(tmp_path):
    # Each entry keeps the whole previous key and adds one byte: 100,000 entries in 500 KB
    # would rebuild 5 GB of keys.
    body = bytearray(checkpoint._varint(0) + checkpoint._varint(0))
    body += checkpoint._varint(len(header_entry()[1])) + header_entry()[1]
    for shared in range(100_000):
        body += checkpoint._varint(shared) + b"\x01\x00k"  # 1 new byte, an empty value
    body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    index = sstable([bytes(body)])
    assert len(index) < 1 << 20
    folder = write_index(tmp_path / "m", index)
    with bounded(seconds=5, megabytes=32), pytest.raises(CheckpointError, match="keys rebuild"):
        checkpoint.read(folder)


def test_one_huge_key_is_rejected(tmp_path):
    index = sstable([raw_block([header_entry(), (b"k" * (checkpoint.MAX_KEY_BYTES + 1), b"")])])
    with pytest.raises(CheckpointError, match="key of"):
        checkpoint.read(write_index(tmp_path / "m", index))


def test_more_entries_than_any_checkpoint_has_are_rejected(tmp_path):
    n = checkpoint.MAX_ENTRIES + 1
    blocks, names = [], [b"%06d" % i for i in range(n)]
    blocks.append(raw_block([header_entry()]))
    for start in range(0, n, 4000):
        blocks.append(raw_block([(name, b"") for name in names[start : start + 4000]]))
    folder = write_index(tmp_path / "m", sstable(blocks))
    with deadline(10), pytest.raises(CheckpointError, match="entries"):
        checkpoint.read(folder)


def test_a_tensor_named_twice_is_an_error_not_last_one_wins(tmp_path):
    entries = [header_entry(), tensor_entry(b"model/a"), tensor_entry(b"model/a", offset=8)]
    folder = write_index(tmp_path / "m", sstable([raw_block(entries)]))
    with pytest.raises(CheckpointError, match="'model/a' is in the index twice"):
        checkpoint.read(folder)
    out_of_order = [header_entry(), tensor_entry(b"model/b"), tensor_entry(b"model/a", offset=8)]
    folder = write_index(tmp_path / "m2", sstable([raw_block(out_of_order)]))
    with pytest.raises(CheckpointError, match="out of order"):
        checkpoint.read(folder)


def test_tensors_that_share_bytes_are_rejected_before_any_crc_is_computed(tmp_path):
    # 10,000 tensors over the same 4 MB would make verify checksum 40 GB (many minutes).
    n, size = 10_000, 1 << 20
    entries = [header_entry()] + [
        (b"t%05d" % i, checkpoint._entry_proto(1, (size,), 0, 4 * size, 0)) for i in range(n)
    ]
    blocks = [raw_block(entries[i : i + 500]) for i in range(0, len(entries), 500)]
    folder = write_index(tmp_path / "m", sstable(blocks), data=bytes(4 * size))
    for call in (checkpoint.read, checkpoint.verify):
        with deadline(10), pytest.raises(CheckpointError, match="overlap"):
            call(folder)


def test_a_data_shard_that_is_not_a_regular_file(tmp_path):
    folder = copy_model(tmp_path)
    make_fifo(folder / "model.ckpt.data-00000-of-00001")
    with deadline(5), pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.read(folder)


# --- finding 5: model files that are FIFOs, /dev/zero or 3 GB of nothing --------------------------

MODEL_FILES = {  # file -> the folder it is planted in
    INDEX: TINY, "checkpoint": TINY, "hparams.json": TINY, "encoder.json": TINY,
    "vocab.bpe": TINY, "chars.json": SHAKESPEARE,
}  # fmt: skip


@needs_fifo
@pytest.mark.parametrize("kind", HOSTILE_FILES)
@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_are_checked_and_bounded_before_reading(tmp_path, name, kind):
    folder = copy_model(tmp_path, MODEL_FILES[name])
    target = folder / name
    if name == INDEX and MODEL_FILES[name] is SHAKESPEARE:
        target = next(folder.glob("*.index"))
    HOSTILE_FILES[kind](target)
    error = load_error(folder, seconds=5, megabytes=64)
    assert name in str(error)
    assert ("not a regular file" if kind != "sparse-3GB" else "3,072.0 MB") in str(error)
    assert error.__cause__ is not None  # the error of the file, chained


@needs_fifo
@pytest.mark.parametrize("kind", HOSTILE_FILES)
def test_prompt_file_is_bounded(tmp_path, kind):
    HOSTILE_FILES[kind](tmp_path / "prompt.txt")
    with deadline(30):
        out = picogpt_cmd("-f", tmp_path / "prompt.txt", "--model", TINY, "--n", "2")
    assert "prompt.txt" in assert_one_line_error(out, 2)


@needs_fifo
@pytest.mark.parametrize("kind", HOSTILE_FILES)
def test_eval_file_is_bounded(tmp_path, kind):
    HOSTILE_FILES[kind](tmp_path / "essay.txt")
    with deadline(30):
        out = picogpt_cmd("eval", tmp_path / "essay.txt", "--model", TINY)
    assert "essay.txt" in assert_one_line_error(out, 2)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("args", [["-"], ["chat"]])
def test_stdin_that_never_ends_is_bounded(args):
    with open("/dev/zero", "rb") as zero, deadline(60):
        out = subprocess.run([sys.executable, "-m", "picogpt", *args, "--model", str(TINY)],
                             stdin=zero, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "stdin" in assert_one_line_error(out, 2)


def test_chars_json_via_the_tokenizer_itself_is_bounded(tmp_path):
    make_sparse(tmp_path / "chars.json")
    with bounded(), pytest.raises(VocabularyError, match="chars.json"):
        CharTokenizer.load(tmp_path)


# --- finding 6: JSON bombs -----------------------------------------------------------------------

DEPTH = 100_000


def array_bomb(depth=DEPTH):
    return "[" * depth + "]" * depth


def object_bomb(depth=DEPTH):
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("bomb", [array_bomb, object_bomb])
@pytest.mark.parametrize("name, source", [("encoder.json", TINY), ("chars.json", SHAKESPEARE),
                                          ("hparams.json", TINY)])
def test_json_bombs_are_one_error(tmp_path, name, source, bomb):
    folder = copy_model(tmp_path, source)
    (folder / name).write_text(bomb())
    error = load_error(folder)
    assert name in str(error) and error.__cause__ is not None
    if name != "hparams.json":  # hparams.json is rejected by its size alone (at most 64 KB)
        assert "nested too deeply" in str(error)


@pytest.mark.parametrize("bomb", [array_bomb, object_bomb])
def test_a_json_bomb_small_enough_for_hparams_json(tmp_path, bomb):
    folder = copy_model(tmp_path)
    (folder / "hparams.json").write_text(bomb(10_000))
    assert (folder / "hparams.json").stat().st_size < 64 << 10
    assert "nested too deeply" in str(load_error(folder))


# --- finding 7: hparams are checked against the checkpoint's own tensors first --------------------

@pytest.mark.parametrize("n_layer", [10**6, 10**8, 10**18])
def test_huge_n_layer_is_rejected_at_once_without_allocating(tmp_path, n_layer):
    folder = copy_model(tmp_path)
    set_hparams(folder, n_layer=n_layer)
    error = load_error(folder, seconds=2, megabytes=16)
    assert f"n_layer is {n_layer}" in str(error) and "2 layer(s)" in str(error)


def test_hparams_with_fewer_layers_than_the_checkpoint_is_an_error(tmp_path):
    folder = copy_model(tmp_path)
    set_hparams(folder, n_layer=1)  # silently dropped layer 1 before
    error = load_error(folder)
    assert "hparams.json" in str(error) and "n_layer is 1" in str(error)
    assert isinstance(error.__cause__, ValueError)


def test_tensors_the_hparams_do_not_explain_are_an_error(tmp_path):
    folder = copy_model(tmp_path)
    params = dict(checkpoint.read(folder))
    params["model/extra"] = np.zeros(3, np.float32)
    checkpoint.write(folder / "model.ckpt", params)
    assert "'model/extra'" in str(load_error(folder))


@pytest.mark.parametrize("changes, message", [
    ({"n_embd": "32"}, "n_embd must be a positive integer, got '32'"),
    ({"n_embd": 32.0}, "n_embd must be a positive integer"),
    ({"n_head": True}, "n_head must be a positive integer"),
    ({"n_ctx": -64}, "n_ctx must be a positive integer"),
    ({"n_vocab": 0}, "n_vocab must be a positive integer"),
    ({"n_layer": None}, "n_layer must be a positive integer"),
    ({"n_head": 5}, "not divisible by n_head 5"),
    ({"n_head": 64}, "not divisible by n_head 64"),
    ({"n_vocab": 514}, "model/wte"),
    ({"n_ctx": 10**12}, "model/wpe"),
    ({"n_embd": 40, "n_head": 4}, "these hparams need"),
])
def test_bad_hparams_are_named(tmp_path, changes, message):
    folder = copy_model(tmp_path)
    set_hparams(folder, **changes)
    error = load_error(folder, seconds=2, megabytes=16)
    assert message in str(error) and "hparams.json" in str(error)
    assert error.__cause__ is not None


def test_missing_hparam_and_hparams_that_are_not_an_object(tmp_path):
    folder = copy_model(tmp_path)
    hparams = json.loads((folder / "hparams.json").read_text())
    del hparams["n_head"]
    write_json(folder / "hparams.json", hparams)
    assert "n_head is missing" in str(load_error(folder))
    write_json(folder / "hparams.json", [1, 2, 3])
    assert "expected a JSON object" in str(load_error(folder))


def test_a_duplicate_tensor_in_a_real_model_folder(tmp_path):
    folder = copy_model(tmp_path)
    params = checkpoint.read(folder)
    entries = [(b"", checkpoint._header_proto())]
    offset, data = 0, bytearray()
    for name in sorted(params):
        raw = np.ascontiguousarray(params[name]).tobytes()
        entries.append((name.encode(), checkpoint._entry_proto(
            1, params[name].shape, offset, len(raw), checkpoint.crc32c(raw))))
        if name == "model/wte":  # a second, different model/wte after the first
            entries.append(entries[-1])
        data += raw
        offset += len(raw)
    (folder / INDEX).write_bytes(checkpoint._index_bytes(entries))
    (folder / "model.ckpt.data-00000-of-00001").write_bytes(bytes(data))
    error = load_error(folder)
    assert isinstance(error.__cause__, CheckpointError) and "twice" in str(error)


HF_FOLDER = ROOT / "tests" / "fixtures" / "gpt2-tiny-hf16"  # HuggingFace's layout, 2 layers


@pytest.mark.skipif(not HF_FOLDER.is_dir(), reason="needs the HF fixture")
@pytest.mark.parametrize("n_layer", [10**7, 10**18])
def test_an_hf_config_with_another_n_layer_is_rejected_at_once(tmp_path, n_layer):
    folder = copy_model(tmp_path, HF_FOLDER)
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", dict(config, n_layer=n_layer))
    error = load_error(folder, seconds=2, megabytes=16)
    assert "config.json" in str(error) and f"n_layer is {n_layer}" in str(error)


def test_the_engine_itself_checks_before_it_builds():
    params = checkpoint.read(TINY)
    hparams = json.loads((TINY / "hparams.json").read_text())
    with bounded(seconds=2, megabytes=16), pytest.raises(ValueError, match="n_layer"):
        engine.GPT(params, dict(hparams, n_layer=10**8))


# --- finding 8: the command line's edges ----------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["chat", "--seed", "-1"],
    ["chat", "--temperature", "inf"],
    ["chat", "--temperature", "nan"],
    ["chat", "--temperature", "-1"],
    ["Hi", "--temperature", "inf"],
    ["Hi", "--seed", "-1"],
    ["Hi", "--top-p", "nan"],
])
def test_bad_sampling_options_are_usage_errors(args):
    out = picogpt_cmd(*args, "--model", TINY)
    assert "picogpt: error:" in assert_one_line_error(out, 2)


def test_a_subnormal_temperature_samples_the_likeliest_token():
    greedy = picogpt_cmd("Hello", "--model", TINY, "--n", "8", "--temperature", "0")
    tiny = picogpt_cmd("Hello", "--model", TINY, "--n", "8", "--temperature", "1e-310",
                       "--seed", "1")
    assert greedy.returncode == 0 and tiny.returncode == 0, tiny.stderr
    assert tiny.stderr == ""  # no traceback, and no NumPy overflow warning either
    assert tiny.stdout == greedy.stdout
    out = picogpt_cmd("chat", "--model", TINY, "--n", "5", "--temperature", "1e-310",
                      input="Hi\n")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@needs_dev_full
@pytest.mark.parametrize("args, stdin", [
    (["Hello", "--n", "20"], None),
    (["chat", "--n", "5"], "Hi\nHow are you?\n"),
    (["eval", TINY / "hparams.json"], None),
    (["--help"], None),
])
def test_output_to_a_full_device_is_one_line_and_exit_1(args, stdin):
    with open("/dev/full", "w") as full:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        model_args = [] if args == ["--help"] else ["--model", TINY]
        out = subprocess.run([sys.executable, "-m", "picogpt", *map(str, args), *model_args],
                             stdout=full, stderr=subprocess.PIPE, text=True, input=stdin,
                             env=env, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
    assert out.stderr.strip() == "picogpt: error: cannot write the output: No space left on device"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_ctrl_c_while_numpy_imports_exits_130():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "picogpt", "Hi", "--model", TINY, "--n", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # NumPy's core extension mapped: the process is inside `import numpy`.
        start = time.monotonic()
        while time.monotonic() - start < 20:
            try:
                if "_multiarray_umath" in Path(f"/proc/{p.pid}/maps").read_text():
                    break
            except OSError:
                break
            time.sleep(0.0005)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 130, (p.returncode, stderr)
        assert "Traceback" not in stderr and stderr.strip() == "interrupted"


# Runs picogpt as `python -m picogpt` does (runpy._run_module_as_main) or as the console script
# does (import main, call it), with an audit hook that sends this process SIGINT at the k-th
# module imported once picogpt's own code has begun (its __init__.py).
INTERRUPT_AT_IMPORT = r"""
import os, runpy, sys
entry, moment = sys.argv.pop(1), int(sys.argv.pop(1))
imports = []

def hook(event, args):
    if event == "exec" and not imports:
        if getattr(args[0], "co_filename", "").endswith(os.path.join("picogpt", "__init__.py")):
            imports.append(None)
    elif event == "import" and imports:
        imports.append(args[0])
        if len(imports) == moment + 1:
            sys.stderr.write(f"SIGINT at the import of {args[0]}\n")
            os.kill(os.getpid(), 2)

sys.addaudithook(hook)
if entry == "-m":
    runpy._run_module_as_main("picogpt")
else:
    from picogpt.__main__ import main
    sys.exit(main())
"""


@pytest.mark.parametrize("entry", ["-m", "script"])
def test_ctrl_c_at_any_import_of_picogpt_s_exits_130(entry):
    """From picogpt's first line on, a Ctrl-C while it imports (here at its 1st, 2nd, 4th, ...
    import) is "interrupted" and 130, never a traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for moment in (1, 2, 4, 16, 64):
        out = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, entry, str(moment),
                              "Hi", "--model", str(TINY), "--n", "3"],
                             capture_output=True, text=True, env=env, timeout=60)
        sent, *rest = out.stderr.splitlines() or [""]
        assert sent.startswith("SIGINT at the import of "), (moment, out.stderr)
        assert "Traceback" not in out.stderr, (moment, out.stderr)
        assert out.returncode == 130 and rest == ["", "interrupted"], (moment, out.stderr)
        assert out.stdout == ""


# --- finding 9: results that were silently wrong --------------------------------------------------

@pytest.mark.parametrize("spelling", ["./shakespeare-char", "shakespeare-char/",
                                      "shakespeare-char"])
def test_a_folder_named_like_the_bundled_model_is_the_users(tmp_path, monkeypatch, spelling):
    copy_model(tmp_path, TINY, name="shakespeare-char")  # a GPT-2-layout model, 513 tokens
    monkeypatch.chdir(tmp_path)
    assert picogpt.resolve(spelling).resolve() == (tmp_path / "shakespeare-char").resolve()
    assert picogpt.load(spelling).hparams["n_vocab"] == 513  # not the bundled 65


def test_cli_model_flag_takes_the_users_folder_of_the_bundled_name(tmp_path):
    copy_model(tmp_path, TINY, name="shakespeare-char")
    mine = picogpt_cmd("Hello", "--model", "./shakespeare-char", "--n", "6", "--temperature",
                       "0", cwd=tmp_path)
    direct = picogpt_cmd("Hello", "--model", TINY, "--n", "6", "--temperature", "0")
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == direct.stdout


def direct_nll(m, ids):
    """Each of ids[1:] scored from the single token before it: what a context of 1 allows."""
    nll = 0.0
    for previous, target in zip(ids, ids[1:]):
        logits = m.logits([previous])[0].astype(np.float64)
        nll += math.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target]
    return nll


def test_block_size_1_scores_every_token(tmp_path):
    chars = sorted(set("to be or not to be\n"))
    m = picogpt.load(make_char_model(tmp_path / "m", chars, n_ctx=1))
    text = "to be or not to be\nor not"
    ll = m.log_likelihood(text)
    ids = m.encode(text)
    assert ll.tokens == len(ids) - 1 and ll.window == 1
    assert ll.nll > 0 and ll.cross_entropy > 0.1
    assert ll.nll == pytest.approx(direct_nll(m, ids), rel=1e-6)


def test_block_size_1_bpe_model_scores_every_token_after_endoftext(tmp_path):
    folder = copy_model(tmp_path)
    hparams = json.loads((folder / "hparams.json").read_text())
    params = dict(checkpoint.read(folder))
    params["model/wpe"] = params["model/wpe"][:1]
    checkpoint.write(folder / "model.ckpt", params)
    set_hparams(folder, n_ctx=1)
    m = picogpt.load(folder)
    assert m.hparams == dict(hparams, n_ctx=1)
    text = "Hello, world. This is a test."
    ll = m.log_likelihood(text)
    ids = [m.tokenizer.eot_id, *m.encode(text)]
    assert ll.tokens == len(ids) - 1
    assert ll.nll == pytest.approx(direct_nll(m, ids), rel=1e-6)


def test_eval_of_a_block_size_1_model_on_the_command_line(tmp_path):
    chars = sorted(set("abc \n"))
    folder = make_char_model(tmp_path / "m", chars, n_ctx=1)
    (tmp_path / "t.txt").write_text("abc cab\nbca a")
    out = picogpt_cmd("eval", tmp_path / "t.txt", "--model", folder)
    assert out.returncode == 0, out.stderr
    m = picogpt.load(folder)
    ids = m.encode("abc cab\nbca a")
    expected = direct_nll(m, ids) / (len(ids) - 1)
    reported = float(out.stdout.split("cross-entropy:")[1].split()[0])
    assert reported == pytest.approx(expected, abs=1e-4) and reported > 0.1


@pytest.mark.parametrize("keep", [0, 128])  # an empty vocab.bpe, and half of it
def test_a_vocab_bpe_missing_merges_fails_at_load(tmp_path, keep):
    folder = copy_model(tmp_path)
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    (folder / "vocab.bpe").write_text("\n".join(lines[: 1 + keep]) + "\n", encoding="utf-8")
    error = load_error(folder)
    assert "vocab.bpe" in str(error) and f"of the {keep} merges" in str(error)
    assert isinstance(error.__cause__, VocabularyError)


def test_an_encoder_without_endoftext_fails_at_load(tmp_path):
    folder = copy_model(tmp_path)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    del encoder["<|endoftext|>"]
    write_json(folder / "encoder.json", encoder)
    error = str(load_error(folder))
    assert "encoder.json" in error and "<|endoftext|>" in error and "513" in error


def test_an_encoder_with_a_gap_in_its_ids_fails_at_load(tmp_path):
    folder = copy_model(tmp_path)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    encoder["<|endoftext|>"] = 600
    write_json(folder / "encoder.json", encoder)
    assert "no token for id 512" in str(load_error(folder))


HUGE_ID = 10**10  # once: 17 s and 4.5 GB (a set of every id up to it), then a MemoryError


def set_encoder_id(folder, name, old_id, new_id):
    """Give the token of `old_id` in `folder`'s vocabulary file `name` the id `new_id`."""
    doc = json.loads((folder / name).read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"] if name == "tokenizer.json" else doc
    token = next(t for t, i in vocab.items() if i == old_id)
    vocab[token] = new_id
    write_json(folder / name, doc)
    return token


@pytest.mark.parametrize("bad", [HUGE_ID, -1, 1.5, "7", True, None])
def test_an_encoder_id_out_of_bounds_is_one_error_at_once(tmp_path, bad):
    """Ids are checked against the number of tokens before anything is built from them."""
    folder = copy_model(tmp_path)
    set_encoder_id(folder, "encoder.json", 512, bad)
    error = load_error(folder, seconds=2)
    assert isinstance(error.__cause__, VocabularyError)
    assert str(folder / "encoder.json") in str(error)
    assert f"'<|endoftext|>' has id {bad!r}" in str(error)
    if bad == HUGE_ID:
        assert "ids must run from 0 to 512 without gaps" in str(error)


@pytest.mark.parametrize("layout, name", [("gpt2-tiny-hf-shards", "vocab.json"),
                                          ("gpt2-tiny-hf16", "tokenizer.json")])
def test_an_hf_vocabulary_id_of_ten_billion_is_one_error_at_once(tmp_path, layout, name):
    source = ROOT / "tests" / "fixtures" / layout
    if not source.is_dir():
        pytest.skip(f"needs the fixture {layout}")
    folder = copy_model(tmp_path, source)
    token = set_encoder_id(folder, name, 300, HUGE_ID)
    error = str(load_error(folder, seconds=2))
    assert name in error and f"{token!r} has id {HUGE_ID}" in error
    assert "no token for id 300" in error


def test_an_encoder_id_of_ten_billion_on_the_command_line(tmp_path):
    folder = copy_model(tmp_path)
    set_encoder_id(folder, "encoder.json", 512, HUGE_ID)
    started = time.monotonic()
    out = picogpt_cmd("hello", "--model", folder, "--n", "1", timeout=120)
    took = time.monotonic() - started
    message = assert_one_line_error(out, 1)
    assert "encoder.json" in message and f"has id {HUGE_ID}" in message
    assert took < 5, f"took {took:.1f} s"  # Python and NumPy starting included


@pytest.mark.parametrize("n_chars", [40, 64, 66])
def test_a_char_vocabulary_of_another_size_fails_at_load(tmp_path, n_chars):
    folder = copy_model(tmp_path, SHAKESPEARE)
    chars = json.loads((folder / "chars.json").read_text(encoding="utf-8"))
    chars = chars[:n_chars] + [chr(0x4E00 + i) for i in range(n_chars - len(chars))]
    write_json(folder / "chars.json", chars)
    error = str(load_error(folder))
    assert "chars.json" in error and f"{n_chars} tokens" in error and "has 65" in error


# --- every failure of load on a bad folder is a ModelError ------------------------------------

def truncate(name, keep):
    def damage(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:keep])
    return damage


def replace(name, text):
    def damage(folder):
        (folder / name).write_text(text)
    return damage


def remove(name):
    def damage(folder):
        (folder / name).unlink()
    return damage


BAD_FOLDERS = {
    "no hparams": remove("hparams.json"),
    "hparams not JSON": replace("hparams.json", "{n_layer: 2"),
    "hparams not UTF-8": replace("hparams.json", "\udcff"),
    "no encoder": remove("encoder.json"),
    "encoder not JSON": replace("encoder.json", '{"a": 1,'),
    "encoder a list": replace("encoder.json", "[1, 2]"),
    "vocab.bpe bad line": replace("vocab.bpe", "#version: 0.2\nĠ t h\n"),
    "no index": remove(INDEX),
    "index cut": truncate(INDEX, 100),
    "data cut": truncate("model.ckpt.data-00000-of-00001", 1000),
    "checkpoint names another": replace("checkpoint", 'model_checkpoint_path: "other"\n'),
    "hparams a directory": lambda f: ((f / "hparams.json").unlink(), (f / "hparams.json").mkdir()),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_every_load_failure_is_a_model_error_with_its_cause(tmp_path, case):
    folder = copy_model(tmp_path)
    try:
        BAD_FOLDERS[case](folder)
    except UnicodeEncodeError:  # "\udcff" cannot be written as text: write the raw byte
        (folder / "hparams.json").write_bytes(b"\xff")
    error = load_error(folder)
    assert str(folder) in str(error)
    if case != "no hparams":
        assert error.__cause__ is not None, case


@pytest.mark.parametrize("args, help_page", [
    (["verify", "x", "--bogus"], "picogpt verify --help"),
    (["chat", "--bogus", "1"], "picogpt chat --help"),
    (["eval", "f", "--bogus"], "picogpt eval --help"),
    (["Hello", "--bogus"], "picogpt --help"),  # generate's options are on the first page
])
def test_an_unknown_option_points_to_its_commands_help(args, help_page):
    error = assert_one_line_error(picogpt_cmd(*args), 2)
    unknown = " ".join(args[args.index("--bogus"):])
    assert error == f"picogpt: error: unrecognized arguments: {unknown} (see {help_page})"
