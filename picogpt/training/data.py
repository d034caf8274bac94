"""The training data: the text read within bounds, tokenized on every core (its ids cached by the
text's and the vocabulary's digests), the vocabulary files the run folder gets, the split into
training and validation ids, and random batches."""

import hashlib
import io
from pathlib import Path

import numpy as np

from picogpt import files
from picogpt.errors import TrainingError


def split_data(ids):
    """The first 90% for training, the last 10% for validation."""
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def get_batch(data, block_size, batch_size, rng):
    """batch_size random windows: inputs [B, T] and targets [B, T], the same shifted by one."""
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = data[starts[:, None] + np.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


# --- tokenizers and the text's ids ----------------------------------------------------------------

TEXT_LIMIT = 1 << 30  # bytes of training text read at most (the ids then take 2 bytes a token)
VOCAB_LIMIT = 16 << 20  # bytes of a tokenizer file copied into the folder
TOKENIZE_CHUNK = 1 << 20  # characters of text tokenized at a time (and per progress update)
_SAFE_CUT = None  # compiled on first use: where a text can be cut without changing GPT-2's pieces


def read_text(path):
    """The training text: a regular UTF-8 file of at most TEXT_LIMIT bytes, not empty; else a
    TrainingError naming it (bad input, exit 2)."""
    text = files.read_text(path, TEXT_LIMIT, "training text", error=TrainingError)
    if not text:
        raise TrainingError(f"{path}: the training text is empty")
    return text


def vocabulary_files(tokenizer, source=None):
    """The files that hold `tokenizer` in a model folder (name -> bytes): copied from the folder
    it came from when it has them (byte for byte, as OpenAI wrote them), else written out."""
    written = tokenizer.file_bytes()  # chars.json, or encoder.json + vocab.bpe
    if source is not None and all((Path(source) / n).is_file() for n in written):
        return {n: files.read_bytes(Path(source) / n, VOCAB_LIMIT, n) for n in written}
    return written


def encode(text, tokenizer, cache_dir=None, vocabulary=None, progress=None):
    """The ids of `text` as a 1-D uint16 (or int32) array. GPT-2's BPE runs in Python, far
    slower than reading the text, so its ids are cached in `cache_dir`, keyed by the text's and
    the vocabulary's sha256: --resume and runs on the same text skip it. `progress(done, total)`
    is told the characters done."""
    from picogpt.tokenizers.chars import CharTokenizer

    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.int32
    if isinstance(tokenizer, CharTokenizer):
        return _encode_chars(text, tokenizer, dtype)
    path = None
    if cache_dir is not None and vocabulary is not None:
        text_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        path = Path(cache_dir) / f"{text_hash[:32]}-{vocabulary_digest(vocabulary)[:16]}.npy"
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


def vocabulary_digest(vocabulary):
    """The sha256 (hex) of a tokenizer's files (name -> bytes), half of a token cache's key."""
    return hashlib.sha256(b"".join(vocabulary[n] for n in sorted(vocabulary))).hexdigest()


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
    cut = safe_cut()
    start = 0
    while start < len(text):
        match = cut.search(text, start + TOKENIZE_CHUNK)
        stop = match.end() if match else len(text)
        yield start, stop
        start = stop


def safe_cut():
    """The places a text can be cut without changing GPT-2's pieces: just after a non-whitespace
    character that whitespace follows (no pre-token runs from one into the other)."""
    global _SAFE_CUT
    if _SAFE_CUT is None:
        import regex

        _SAFE_CUT = regex.compile(r"\S(?=\s)")
    return _SAFE_CUT


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
