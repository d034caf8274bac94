"""Train a GPT-2 in NumPy: AdamW, the data, the training loop and the model folder it saves to.
The network's forward and backward are in picogpt/gpt2/ (network.py composes the layers); the
command (`picogpt train`, its options and messages) is in picogpt/cli.py.

    picogpt train input.txt --out weights/my-model          # see `picogpt train --help`
"""

import hashlib
import io
import json
import math
import shlex
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from picogpt import checkpoint, files
from picogpt.errors import ModelError, PicogptError, TrainingError
from picogpt.gpt2 import layers, network, parallel
from picogpt.gpt2.memory import keep_freed_memory, physical_memory

# nanoGPT's CPU recipe for Tiny Shakespeare: trains in about a minute here.
DEFAULTS = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
    "max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
    "lr_decay_iters": None,  # None: max_iters
    "dropout": 0.0, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "eval_interval": 250, "eval_iters": 20, "log_interval": 10, "seed": 1337, "grad_accum": 1,
}  # fmt: skip
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


# --- parameters and the optimizer ---------------------------------------------------------------


ADAM_BLOCK = 1 << 15  # elements updated at a time: the update's temporaries stay in cache
ADAM_GRAIN = 8  # blocks a thread takes at least: fewer cost more to hand out than to update


class AdamW:
    """Adam with decoupled weight decay over one flat parameter buffer (as torch.optim.AdamW):

        p *= 1 - lr * weight_decay            (matrices only: the first n_decay elements)
        m = beta1 m + (1 - beta1) g
        v = beta2 v + (1 - beta2) g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    done ADAM_BLOCK elements at a time: GPT-2 124M's buffers are 500 MB each, and whole-buffer
    expressions would stream them from memory a dozen times and allocate as many temporaries.
    The blocks are split over the cores (inside parallel.passes)."""

    def __init__(self, flat_params, n_decay, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8):
        self.params, self.n_decay = flat_params, n_decay
        self.beta1, self.beta2, self.weight_decay, self.eps = beta1, beta2, weight_decay, eps
        self.m = np.zeros_like(flat_params)
        self.v = np.zeros_like(flat_params)
        self.step = 0

    def update(self, grad, lr):
        self.step += 1
        b1, b2 = self.beta1, self.beta2
        decay = 1.0 - lr * self.weight_decay
        rescale = 1.0 / math.sqrt(1.0 - b2**self.step)
        step_size = lr / (1.0 - b1**self.step)

        def blocks(first, last):  # blocks first..last-1, with a temporary of this thread's
            t = np.empty(min(ADAM_BLOCK, self.params.size), self.params.dtype)
            for start in range(first * ADAM_BLOCK, min(last * ADAM_BLOCK, self.params.size),
                               ADAM_BLOCK):  # fmt: skip
                stop = min(start + ADAM_BLOCK, self.params.size)
                p, g, m, v = (a[start:stop] for a in (self.params, grad, self.m, self.v))
                tmp = t[: stop - start]
                if self.weight_decay and start < self.n_decay:
                    p[: self.n_decay - start] *= decay
                m *= b1
                np.multiply(g, 1.0 - b1, out=tmp)
                m += tmp
                v *= b2
                np.multiply(g, g, out=tmp)
                tmp *= 1.0 - b2
                v += tmp
                np.sqrt(v, out=tmp)
                tmp *= rescale
                tmp += self.eps
                np.divide(m, tmp, out=tmp)
                tmp *= step_size
                p -= tmp

        parallel.run(blocks, -(-self.params.size // ADAM_BLOCK), ADAM_GRAIN)


def clip_grad_norm(grad, max_norm):
    """Scale grad in place so its L2 norm is at most max_norm; the norm before clipping. The sum
    of squares is split over the cores (inside parallel.passes)."""
    squares = parallel.run(lambda i, j: float(np.dot(grad[i:j], grad[i:j])), len(grad), 1 << 16)
    norm = math.sqrt(sum(squares))
    if max_norm and norm > max_norm:
        grad *= max_norm / (norm + 1e-6)
    return norm


def learning_rate(it, lr, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# --- data ----------------------------------------------------------------------------------------


def split_data(ids):
    """The first 90% for training, the last 10% for validation."""
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def get_batch(data, block_size, batch_size, rng):
    """batch_size random windows: inputs [B, T] and targets [B, T], the same shifted by one."""
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = data[starts[:, None] + np.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


# --- the training folder: picogpt replaces or deletes only files it wrote ----------------------

MANIFEST = "train_files.json"  # the files picogpt wrote into a training folder, by relative path
STATE_DIR = "resume"
# The names picogpt writes into a training folder (besides the checkpoints it records).
OWN_NAMES = ("hparams.json", "train_config.json", "train_log.jsonl", "chars.json", "encoder.json",
             "vocab.bpe", "checkpoint", MANIFEST)  # fmt: skip
CHECKPOINT_SUFFIXES = (".index", ".data-00000-of-00001")


class RunFolder:
    """A training folder and the record (train_files.json) of the files picogpt wrote into it.

    picogpt trains only into a new or empty folder, or one that this record (or an older
    picogpt's layout, see `open`) marks as a training folder; there it replaces and deletes only
    files it recorded. A checkpoint's names are recorded before its files are written, so the
    files of a write cut short by a kill are recorded too and removed by a later run."""

    def __init__(self, path, written):
        self.path, self.written = Path(path), set(written)

    @classmethod
    def for_new_run(cls, path):
        """The folder a new run at `path` would train into (nothing is written yet: see begin).
        It must not exist, or be empty, or be a folder of ours with no model and no state (a
        first save that never finished)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise TrainingError(f"--out {path} is a file, not a folder")
        if not (path.is_dir() and any(path.iterdir())):
            return cls(path, [MANIFEST])
        folder = cls.open(path)
        if folder.has_model() or folder.has_state():
            raise TrainingError(f"{path} already holds a model: --resume continues it, or "
                                "choose another --out")
        return folder

    def begin(self):
        """Make the folder ours: create it, write the record, clear what killed runs left."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--out {self.path}: cannot create the folder: {e}") from e
        self.save_record()
        self.remove_leftovers()

    @classmethod
    def open(cls, path):
        """The training folder at `path`. A folder picogpt did not write is refused, never
        touched: its files are not ours to replace."""
        path = Path(path)
        record = path / MANIFEST
        if record.is_file():
            data = files.load_json(record, 1 << 20, MANIFEST, error=TrainingError)
            written = data.get("files") if isinstance(data, dict) else None
            if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
                raise TrainingError(f"{record}: not a record of picogpt's files")
            if any(Path(n).is_absolute() or ".." in Path(n).parts for n in written):
                raise TrainingError(f"{record}: names a file outside the folder")
            return cls(path, written)
        legacy = cls._legacy_files(path)
        if legacy is None:
            raise TrainingError(
                f"--out {path} is not empty and is not a picogpt training folder: picogpt "
                "writes only into a new or empty folder, or one it trained into")
        return cls(path, legacy + [MANIFEST])

    @staticmethod
    def _legacy_files(path):
        """A folder written by picogpt before the record existed (resume/ state, hparams.json and
        a train_config.json whose command is picogpt's): its files by the names picogpt used,
        the current checkpoints only. None when the folder is not one."""
        config_path = path / "train_config.json"
        if not ((path / STATE_DIR / "checkpoint").is_file() and config_path.is_file()
                and (path / "hparams.json").is_file()):  # fmt: skip
            return None
        try:
            config = files.load_json(config_path, 1 << 20, "train_config.json")
        except files.FileReadError:
            return None
        if not (isinstance(config, dict) and str(config.get("command", "")).startswith(
                "picogpt train ")):  # fmt: skip
            return None
        names = [n for n in OWN_NAMES if (path / n).is_file()]
        names.append(f"{STATE_DIR}/checkpoint")
        for where, stem in (("", "model.ckpt-"), (STATE_DIR + "/", "state.ckpt-")):
            current = _current_checkpoint(path / where)
            if current and current.startswith(stem):
                names += [where + current + suffix for suffix in CHECKPOINT_SUFFIXES]
        return names

    def has_model(self):
        return "checkpoint" in self.written and (self.path / "checkpoint").is_file()

    def has_state(self):
        return f"{STATE_DIR}/checkpoint" in self.written and (
            self.path / STATE_DIR / "checkpoint").is_file()  # fmt: skip

    def save_record(self):
        files.write_json(self.path / MANIFEST, {"written_by": "picogpt train",
                                                "files": sorted(self.written)})  # fmt: skip

    def record(self, *names):
        """Note `names` as ours before writing them."""
        if not set(names) <= self.written:
            self.written.update(names)
            self.save_record()

    def write_json(self, name, obj):
        self.record(name)
        files.write_json(self.path / name, obj)

    def write_bytes(self, name, data):
        self.record(name)
        files.atomic_write(self.path / name, data)

    def write_checkpoint(self, where, stem, iteration, tensors):
        """Write `tensors` as checkpoint `<where>/<stem><iteration>` and make it the current one
        (the `checkpoint` file, replaced last, names it); then delete the recorded checkpoints
        it replaces. A kill at any moment leaves the previous checkpoint whole."""
        base = f"{where}/{stem}" if where else stem
        own = [f"{base}{iteration}{suffix}" for suffix in CHECKPOINT_SUFFIXES]
        self.record(*own, f"{where}/checkpoint" if where else "checkpoint")
        (self.path / where).mkdir(exist_ok=True)
        checkpoint.write(self.path / f"{base}{iteration}", tensors)
        self._delete([n for n in self.written if n.startswith(base) and n not in own])

    def _delete(self, names):
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        if names:
            self.written.difference_update(names)
            self.save_record()

    def remove_leftovers(self):
        """Delete the temporary files (`<name>.tmp<pid>`) a killed picogpt left behind, for the
        names it writes here; and recorded checkpoint files that no `checkpoint` file names
        (a write cut short)."""
        for where, stem in (("", "model.ckpt-"), (STATE_DIR, "state.ckpt-")):
            prefix = f"{where}/" if where else ""
            names = [n[len(prefix):] for n in self.written
                     if n.startswith(prefix) and "/" not in n[len(prefix):]]  # fmt: skip
            if (self.path / where).is_dir():
                files.remove_stale_temporaries(self.path / where, names)
            current = _current_checkpoint(self.path / where)
            self._delete([prefix + n for n in names if n.startswith(stem)
                          and not (current and n.startswith(current + "."))])  # fmt: skip


def _current_checkpoint(folder):
    """The checkpoint name a TensorFlow `checkpoint` file in `folder` names, or None."""
    try:
        text = files.read_text(Path(folder) / "checkpoint", 1 << 16, "checkpoint")
    except files.FileReadError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            name = value.strip().strip('"')
            return name if name and "/" not in name and "\\" not in name else None
    return None


# --- tokenizers and the text's ids ----------------------------------------------------------------

TEXT_LIMIT = 1 << 30  # bytes of training text read at most (the ids then take 2 bytes a token)
VOCAB_LIMIT = 16 << 20  # bytes of a tokenizer file copied into the folder
TOKENIZE_CHUNK = 1 << 20  # characters of text tokenized at a time (and per progress update)
_SAFE_CUT = None  # compiled on first use: where a text can be cut without changing GPT-2's pieces


def read_text(path):
    """The training text: a regular UTF-8 file of at most TEXT_LIMIT bytes, not empty. A file
    that cannot be read is a FileReadError (exit 1); an empty one a TrainingError."""
    text = files.read_text(path, TEXT_LIMIT, "training text")
    if not text:
        raise TrainingError(f"{path}: the training text is empty")
    return text


def vocabulary_files(tokenizer, source=None):
    """The files that hold `tokenizer` in a model folder (name -> bytes): copied from the folder
    it came from when it has them (byte for byte, as OpenAI wrote them), else written out."""
    from picogpt.chars import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        names = ("chars.json",)
    else:
        names = ("encoder.json", "vocab.bpe")
    if source is not None and all((Path(source) / n).is_file() for n in names):
        return {n: files.read_bytes(Path(source) / n, VOCAB_LIMIT, n) for n in names}
    if isinstance(tokenizer, CharTokenizer):
        return {"chars.json": (json.dumps(tokenizer.chars, ensure_ascii=False) + "\n").encode()}
    merges = "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    return {"encoder.json": json.dumps(tokenizer.encoder, ensure_ascii=False).encode(),
            "vocab.bpe": f"#version: 0.2\n{merges}".encode()}  # fmt: skip


def encode(text, tokenizer, cache_dir=None, vocabulary=None, progress=None):
    """The ids of `text` as a 1-D uint16 (or int32) array. GPT-2's BPE runs in Python, far
    slower than reading the text, so its ids are cached in `cache_dir`, keyed by the text's and
    the vocabulary's sha256: --resume and runs on the same text skip it. `progress(done, total)`
    is told the characters done."""
    from picogpt.chars import CharTokenizer

    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.int32
    if isinstance(tokenizer, CharTokenizer):
        return _encode_chars(text, tokenizer, dtype)
    path = None
    if cache_dir is not None and vocabulary is not None:
        text_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        vocab_hash = hashlib.sha256(b"".join(vocabulary[n] for n in sorted(vocabulary)))
        path = Path(cache_dir) / f"{text_hash[:32]}-{vocab_hash.hexdigest()[:16]}.npy"
        ids = _cached_ids(path, len(text), tokenizer.n_vocab, dtype)
        if ids is not None:
            return ids
    pieces = []
    for start, stop in _bpe_chunks(text):
        pieces.append(np.array(tokenizer.encode(text[start:stop]), dtype))
        if progress is not None:
            progress(stop, len(text))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    del pieces
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, ids, allow_pickle=False)
            files.atomic_write(path, buffer.getvalue())
        except OSError:
            pass  # a cache that cannot be written only costs the next run the same wait
    return ids


def _encode_chars(text, tokenizer, dtype):
    """Character ids without a Python loop: each character's code point looked up in the
    sorted vocabulary."""
    codes = np.array([ord(c) for c in tokenizer.chars])
    order = np.argsort(codes)
    sorted_codes = codes[order]
    ids = np.empty(len(text), dtype)
    for start in range(0, len(text), TOKENIZE_CHUNK):
        chunk = text[start : start + TOKENIZE_CHUNK]
        points = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), np.uint32)
        where = np.minimum(np.searchsorted(sorted_codes, points), len(codes) - 1)
        unknown = sorted_codes[where] != points
        if unknown.any():
            tokenizer.encode("".join(sorted(set(map(chr, points[unknown])))))  # raises, naming them
        ids[start : start + len(chunk)] = order[where]
    return ids


def _bpe_chunks(text):
    """(start, stop) pieces of about TOKENIZE_CHUNK characters, cut just before whitespace that
    follows a non-whitespace character: no GPT-2 pre-token spans that point, so the pieces
    tokenize to exactly the ids of the whole text."""
    global _SAFE_CUT
    if _SAFE_CUT is None:
        import regex

        _SAFE_CUT = regex.compile(r"\S(?=\s)")
    start = 0
    while start < len(text):
        match = _SAFE_CUT.search(text, start + TOKENIZE_CHUNK)
        stop = match.end() if match else len(text)
        yield start, stop
        start = stop


def _cached_ids(path, n_chars, n_vocab, dtype):
    """The ids cached at `path`, or None when there are none or they do not fit the text."""
    try:
        files.check_regular(path, 128 + 4 * n_chars * np.dtype(dtype).itemsize)  # <= 4 bytes a char
        ids = np.load(path, allow_pickle=False)
    except (files.FileReadError, OSError, ValueError):
        return None
    if ids.dtype != dtype or ids.ndim != 1 or not ids.size or int(ids.max()) >= n_vocab:
        return None
    return ids


# --- configuration ----------------------------------------------------------------------------

# nanoGPT's fine-tuning recipe (config/finetune_shakespeare.py over its train.py's defaults):
# the defaults of a run with --init for what the user does not give; a constant learning rate
# (min_lr follows lr), the block size of the model.
FINETUNE_DEFAULTS = {
    "batch_size": 1, "grad_accum": 32, "max_iters": 20, "lr": 3e-5, "min_lr": None,
    "warmup_iters": 0, "dropout": 0.0, "beta2": 0.95, "eval_interval": 5, "eval_iters": 40,
}  # fmt: skip
ARCHITECTURE = ("n_layer", "n_head", "n_embd")


def make_config(options, saved=None, init_hparams=None):
    """The training configuration: `options` (key -> value, None where not given), else the
    saved run's values, else the defaults (nanoGPT's fine-tuning recipe with --init's model,
    whose architecture it takes, DEFAULTS otherwise)."""
    config = dict(DEFAULTS)
    if init_hparams is not None:
        config.update(FINETUNE_DEFAULTS)
        config.update({k: init_hparams[k] for k in ARCHITECTURE})
        config["block_size"] = init_hparams["n_ctx"]
        for key in ARCHITECTURE:
            if options.get(key) is not None and options[key] != init_hparams[key]:
                raise TrainingError(f"--{key.replace('_', '-')} {options[key]}: the model of "
                                    f"--init has {init_hparams[key]}; its architecture is kept")
        if (options.get("block_size") or 0) > init_hparams["n_ctx"]:
            raise TrainingError(f"--block-size {options['block_size']} is more than the "
                                f"context of the model of --init ({init_hparams['n_ctx']})")
    if saved:
        config.update({k: v for k, v in saved.items() if k in DEFAULTS})
    for key in DEFAULTS:
        value = options.get(key)
        if value is None:
            continue
        if saved and key in SHAPE_KEYS and value != saved.get(key):
            raise TrainingError(f"--{key.replace('_', '-')} {value}: the model being resumed "
                                f"has {saved.get(key)}; its shape cannot change")
        config[key] = value
    if config["min_lr"] is None:  # --init: a constant learning rate unless told otherwise
        config["min_lr"] = config["lr"]
    if config["n_embd"] % config["n_head"]:
        raise TrainingError(f"--n-embd {config['n_embd']} is not divisible by "
                            f"--n-head {config['n_head']}")
    if config["min_lr"] > config["lr"]:
        raise TrainingError(f"--min-lr {config['min_lr']} is above --lr {config['lr']}")
    return config


def command_line(text, out, config):
    """The `picogpt train` command that trains this configuration from the start."""
    flags = [f"--{key.replace('_', '-')} {config[key]}" for key in DEFAULTS
             if config[key] is not None and key != "log_interval"]  # fmt: skip
    for key in ("init", "tokenizer"):
        if config.get(key) not in (None, "chars"):
            flags.insert(0, f"--{key} {shlex.quote(str(config[key]))}")
    where = f"{shlex.quote(str(text))} --out {shlex.quote(str(out))}"
    return f"picogpt train {where} " + " ".join(flags)


# --- preparing a run: everything checked before anything is written ---------------------------


class Plan(NamedTuple):
    """A run ready to start: what `prepare` found and checked."""

    config: dict
    hparams: dict
    tokenizer: object
    vocabulary: dict  # the tokenizer's files for the folder: name -> bytes
    data: tuple  # (training ids, validation ids)
    folder: RunFolder
    resume: bool  # continue from the folder's saved state
    init: Optional[dict]  # the parameters of --init's model, or None for a random start
    notice: Optional[str]  # something to tell the user before training (starting over, ...)
    memory: int  # bytes the run is estimated to need at its peak


def prepare(text_path, out, options, *, resume=False, init=None, tokenizer="chars",
            weights_dir=None, base_url=None, check_saved=None, progress=None,
            download_source=None):
    """Check everything that can be wrong before any training: the text, the options, --out,
    the memory it needs. `init` and `tokenizer` are model names as --model takes them
    (loading.resolve; a GPT-2 size is downloaded from `download_source`); `check_saved(config,
    path)` validates a resumed run's saved configuration; `progress(done, total)` hears how
    tokenizing goes. Nothing is written until all is checked."""
    from picogpt import download, hf, loading

    text = read_text(text_path)
    out = Path(out)
    notice, saved, init_params, source = None, None, None, None
    if resume:
        if not out.is_dir():
            raise TrainingError(f"{out}: nothing to resume (no such folder)")
        folder = RunFolder.open(out)
        if folder.has_state():
            config_path = out / "train_config.json"
            saved = files.load_json(config_path, 1 << 20, "train_config.json",
                                    error=TrainingError)  # fmt: skip
            if check_saved is not None:
                check_saved(saved, config_path)
            try:
                hparams = loading.read_hparams(out)
                tok = loading.read_tokenizer(out)
            except (PicogptError, OSError, ValueError) as e:
                raise TrainingError(f"{out}: cannot resume: {e}") from e
            source = out
            config = make_config(options, saved)
            config.update({k: saved.get(k) for k in ("init", "tokenizer")})
        else:
            notice = (f"{out} holds no complete training state to resume (its first save never "
                      "finished): starting over")
            resume = False
    else:
        folder = RunFolder.for_new_run(out)
    if not resume:
        if init is not None:
            source = loading.resolve(init, weights_dir, base_url, download_source)
            hparams, tok, init_params = loading.read_folder(source)
            config = make_config(options, init_hparams=hparams)
            hparams = dict(hparams)
        else:
            if tokenizer == "chars":
                from picogpt.chars import CharTokenizer

                tok = CharTokenizer.from_text(text)
            else:
                source = loading.resolve(tokenizer, weights_dir, base_url, download_source)
                try:  # a model folder in either layout, or one holding just a tokenizer
                    tok = (loading.read_folder(source)[1] if hf.is_hf_folder(source)
                           else loading.read_tokenizer(source))  # fmt: skip
                except (OSError, ValueError) as e:  # a folder without (or with a bad) tokenizer
                    raise ModelError(f"--tokenizer {tokenizer}: {e}") from e
            config = make_config(options)
            hparams = {"n_vocab": tok.n_vocab, "n_ctx": config["block_size"],
                       **{k: config[k] for k in ARCHITECTURE}}  # fmt: skip
        config.update(init=None if init is None else str(init),
                      tokenizer=None if init is not None else str(tokenizer))
    vocabulary = vocabulary_files(tok, source)
    cache_dir = download.weights_dir(weights_dir) / "tokens"
    try:
        ids = encode(text, tok, cache_dir, vocabulary, progress)
    except ValueError as e:  # characters a character-level vocabulary does not have
        raise TrainingError(f"{text_path}: {e}") from None
    train_data, val_data = split_data(ids)
    need = config["block_size"] + 1
    unit = "characters" if "chars.json" in vocabulary else "tokens"
    for name, split in (("first 90%", train_data), ("last 10%", val_data)):
        if len(split) < need:
            raise TrainingError(
                f"{text_path} is too short for --block-size {config['block_size']}: its {name} "
                f"({len(split):,} {unit}) must hold a window of {need}")
    memory = estimate_memory(hparams, config)
    ram = physical_memory()
    if ram is not None and memory > ram:
        raise TrainingError(
            f"this run needs about {memory / 1e9:.1f} GB of memory, more than this machine's "
            f"{ram / 1e9:.1f} GB: try a smaller --batch-size or --block-size")
    folder.begin()
    return Plan(config, hparams, tok, vocabulary, (train_data, val_data), folder, resume,
                init_params, notice, memory)  # fmt: skip


def estimate_memory(hparams, config):
    """Bytes a training step needs at its peak, about: the parameters, their gradient and AdamW's
    two moments (and a gradient sum with --grad-accum), plus what one micro-batch's forward keeps
    for its backward (see BlockCache) and the largest temporaries of the backward."""
    C, L, H = hparams["n_embd"], hparams["n_layer"], hparams["n_head"]
    B, T = config["batch_size"], config["block_size"]
    n_params = (hparams["n_vocab"] + hparams["n_ctx"]) * C + L * (12 * C * C + 13 * C) + 2 * C
    buffers = 4 + (config["grad_accum"] > 1)
    N = B * T
    dropout = config["dropout"] > 0
    # Attention keeps its row blocks' probabilities: each block's rows against the keys up to
    # its last row, about half of [T, T].
    R = min(T, layers.ATTN_ROWS)
    scores = B * H * sum((min(T, s + R) - s) * min(T, s + R) for s in range(0, T, R))
    per_block = 4 * (N * C * (14 + 2 * dropout) + scores * (1 + 2 * dropout))
    backward = 4 * (3 * N * 4 * C + 3 * B * H * R * T)  # the MLP's and attention's temporaries
    rows = min(N, layers.LOSS_ROWS)  # of logits
    head = 4 * (rows * hparams["n_vocab"] + parallel.threads() * layers.VOCAB_ROWS * C + 3 * N * C)
    return 4 * n_params * buffers + L * per_block + backward + head + (200 << 20)  # + Python, NumPy


# --- training ----------------------------------------------------------------------------------


class Trainer:
    """A model being trained, its optimizer, and the folder it is saved to."""

    def __init__(self, config, hparams, tokenizer, folder, vocabulary):
        self.config, self.hparams, self.tokenizer = config, dict(hparams), tokenizer
        self.folder, self.vocabulary = folder, vocabulary
        self.out = folder.path
        shapes = network.param_shapes(self.hparams)
        self.flat, self.params = network.flat_views(shapes)
        self.flat_grad, self.grads = network.flat_views(shapes)
        # With --grad-accum, the micro-batches' gradients are summed here.
        self.grad_sum = np.zeros_like(self.flat) if config["grad_accum"] > 1 else None
        self.optimizer = AdamW(self.flat, network.n_decayed(shapes), config["beta1"],
                               config["beta2"], config["weight_decay"])  # fmt: skip
        self.iter = 0
        self.best_val_loss = math.inf
        self.saved_iter = None  # the iteration of the resume state on disk
        self.saved_model = None  # (iteration, val loss) of the model on disk

    def initialize(self, params=None):
        """GPT-2's random initialisation, or a copy of `params` (--init's model)."""
        if params is None:
            rng = np.random.default_rng(self.config["seed"])
            network.init_params(self.params, self.hparams, rng)
            return
        for name, array in self.params.items():  # (loading.read_folder checked the shapes)
            array[...] = params[name]
            checkpoint.release(params[name])  # the copy is what is used: unmap the file's pages

    def step(self, x, y, lr, rng):
        """One optimizer step on a batch of grad_accum micro-batches: their mean gradient, as
        one step over the whole batch. The batch's mean loss before the step. Every pass of it
        is split over the cores (parallel.passes)."""
        c = self.config
        n = c["grad_accum"]
        losses = []
        with parallel.passes():
            for i, (xi, yi) in enumerate(zip(np.split(x, n), np.split(y, n))):
                losses.append(self.loss(xi, yi, rng, backward=True))
                if self.grad_sum is not None:
                    if i == 0:
                        self.grad_sum[...] = self.flat_grad
                    else:
                        self.grad_sum += self.flat_grad
            grad = self.flat_grad
            if self.grad_sum is not None:
                grad = self.grad_sum
                grad *= 1.0 / n
            clip_grad_norm(grad, c["grad_clip"])
            self.optimizer.update(grad, lr)
        return float(np.mean(losses))

    def loss(self, x, y, rng=None, backward=False):
        """The mean loss of predicting y [B, T] from x [B, T]; with `backward`, with dropout and
        its gradient in self.flat_grad."""
        with parallel.passes():
            if not backward:
                return network.gpt_forward(self.params, self.hparams, x, y)[0]
            loss, cache = network.gpt_forward(self.params, self.hparams, x, y,
                                              self.config["dropout"], rng, grads=self.grads)
            network.gpt_backward(cache, self.params, self.hparams, self.grads)
            return loss

    def estimate_loss(self, data, rng):
        """Mean loss over eval_iters random batches, without dropout."""
        c = self.config
        losses = [self.loss(*get_batch(data, c["block_size"], c["batch_size"], rng))
                  for _ in range(c["eval_iters"])]  # fmt: skip
        return float(np.mean(losses))

    # --- the model folder: hparams.json, the tokenizer, train_config.json, the checkpoint, and
    # resume/ (parameters + optimizer state). Checkpoints get a new name each time and the
    # `checkpoint` file, replaced last, is what names the current one: a kill at any moment
    # leaves the previous model (and the previous resume state) whole.

    def save_model(self, val_loss):
        self.folder.write_json("hparams.json", self.hparams)
        self.folder.write_json("train_config.json", self.config)
        for name, data in self.vocabulary.items():
            if not (self.out / name).is_file() or name not in self.folder.written:
                self.folder.write_bytes(name, data)
        self.folder.write_checkpoint("", "model.ckpt-", self.iter, self.params)
        self.saved_model = (self.iter, val_loss)

    def save_state(self):
        tensors = dict(self.params)
        tensors.update({
            "adam/m": self.optimizer.m, "adam/v": self.optimizer.v,
            "train/iter": np.array(self.iter, np.int64),
            "train/best_val_loss": np.array(self.best_val_loss, np.float64),
        })  # fmt: skip
        self.folder.write_checkpoint(STATE_DIR, "state.ckpt-", self.iter, tensors)
        self.saved_iter = self.iter

    def load_state(self):
        state_dir = self.out / STATE_DIR
        try:
            checkpoint.verify(state_dir)  # every CRC: never continue from damaged numbers
            tensors = checkpoint.read(state_dir)
            for name, array in self.params.items():
                array[...] = _stored(tensors, name, array.shape)
            self.optimizer.m[...] = _stored(tensors, "adam/m", self.flat.shape)
            self.optimizer.v[...] = _stored(tensors, "adam/v", self.flat.shape)
            self.iter = int(_stored(tensors, "train/iter", ()))
            self.best_val_loss = float(_stored(tensors, "train/best_val_loss", ()))
        except PicogptError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        self.optimizer.step = self.saved_iter = self.iter
        if math.isfinite(self.best_val_loss):
            self.saved_model = (None, self.best_val_loss)

    def log(self, record):
        self.folder.record("train_log.jsonl")
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")


def _stored(tensors, name, shape):
    if name not in tensors:
        raise checkpoint.CheckpointError(f"the resume state has no {name!r}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise checkpoint.CheckpointError(
            f"the resume state's {name!r} is {tensors[name].shape}, expected {shape}")
    return tensors[name]


def train(trainer, data, report=print, status=None, resumed=False):
    """Train until max_iters: evaluate every eval_interval iterations (and at the end), save the
    model when the validation loss improves and the resume state every time. A resumed run
    starts where its state was saved, just after an evaluation, so it does not repeat it."""
    c = trainer.config
    train_data, val_data = data
    max_iters = c["max_iters"]
    decay_iters = c["lr_decay_iters"] if c["lr_decay_iters"] is not None else max_iters
    step_ms = []
    first = trainer.iter
    keep_freed_memory()
    while True:
        it = trainer.iter
        due = it % c["eval_interval"] == 0 or it == max_iters
        if due and not (resumed and it == first):
            eval_rng = np.random.default_rng([c["seed"], 1, it])
            train_loss = trainer.estimate_loss(train_data, eval_rng)
            val_loss = trainer.estimate_loss(val_data, eval_rng)
            ms = float(np.median(step_ms)) if step_ms else None
            improved = val_loss < trainer.best_val_loss
            if improved:
                trainer.best_val_loss = val_loss
                trainer.save_model(val_loss)
            trainer.save_state()
            trainer.log({"iter": it, "train_loss": round(train_loss, 4),
                         "val_loss": round(val_loss, 4),
                         "ms_per_iter": None if ms is None else round(ms, 2)})  # fmt: skip
            report(f"iter {it:>{len(str(max_iters))}}: train loss {train_loss:.4f}, "
                   f"val loss {val_loss:.4f}" + (" (best, saved)" if improved else "")
                   + ("" if ms is None else f", {ms:.1f} ms/iter"))  # fmt: skip
            step_ms.clear()
        if it >= max_iters:
            return
        rng = np.random.default_rng([c["seed"], 0, it])  # batch and dropout of this iteration
        x, y = get_batch(train_data, c["block_size"], c["batch_size"] * c["grad_accum"], rng)
        lr = learning_rate(it, c["lr"], c["min_lr"], c["warmup_iters"], decay_iters)
        t0 = time.perf_counter()
        loss = trainer.step(x, y, lr, rng)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        trainer.iter = it + 1
        if status is not None:
            status(trainer.iter, max_iters, loss, float(np.median(step_ms[-50:])))
