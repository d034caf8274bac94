"""Token files: nanoGPT's `train.bin` and `val.bin` (raw little-endian uint16 token ids, no
header, as its prepare.py writes them) memory-mapped and checked in bounded chunks, and a text
over the in-memory limit tokenized into such a file in one streaming pass, on every core through
processes (GPT-2's BPE runs in Python and holds the GIL: threads would take turns)."""

import codecs
import collections
import contextlib
import hashlib
import signal
from pathlib import Path

import numpy as np

from picogpt import files
from picogpt.errors import PicogptError, TrainingError
from picogpt.training import data

ID_DTYPE = np.dtype("<u2")  # nanoGPT's np.uint16 on the little-endian machines it runs on
CHECK_CHUNK = 1 << 22  # ids read at a time when checking a file (8 MB)
READ_BLOCK = 1 << 22  # bytes of text read at a time
LONGEST_PIECE = 64  # TOKENIZE_CHUNKs of text without a place to cut it: too long to tokenize
SIZE_LIMIT = 1 << 48  # a token file is mapped, never read whole: any real size will do


def open_split(folder, n_vocab, progress=None):
    """(training ids, validation ids): `folder`/train.bin and `folder`/val.bin, mapped."""
    return tuple(open_ids(Path(folder) / name, n_vocab, progress)
                 for name in ("train.bin", "val.bin"))  # fmt: skip


def open_ids(path, n_vocab, progress=None):
    """The ids of a token file, memory-mapped (nothing is read until used), after checking that
    every id is below `n_vocab`. A file that is not there or not regular is a TrainingError."""
    size = files.check_regular(path, SIZE_LIMIT, "token file", error=TrainingError)
    if size % ID_DTYPE.itemsize:
        raise TrainingError(f"{path}: {size:,} bytes is not a whole number of 2-byte token ids")
    if size == 0:
        return np.zeros(0, ID_DTYPE)
    check_ids(path, size // ID_DTYPE.itemsize, n_vocab, progress)
    return np.memmap(path, ID_DTYPE, mode="r")


def check_ids(path, count, n_vocab, progress=None):
    """Every id of the token file below `n_vocab`, read CHECK_CHUNK ids at a time into one
    buffer (a mapped file would keep every page it read resident). An id outside the vocabulary
    is a TrainingError naming the file and its byte offset."""
    buffer = np.empty(min(count, CHECK_CHUNK), ID_DTYPE)
    try:
        with open(path, "rb") as f:
            for start in range(0, count, CHECK_CHUNK):
                chunk = buffer[: min(CHECK_CHUNK, count - start)]
                if f.readinto(chunk) != chunk.nbytes:
                    raise TrainingError(f"{path}: shorter than it was ({count:,} ids)")
                if int(chunk.max()) >= n_vocab:
                    at = start + int(np.argmax(chunk >= n_vocab))
                    raise TrainingError(
                        f"{path}: token id {int(buffer[at - start])} at byte offset "
                        f"{at * ID_DTYPE.itemsize:,} is outside the vocabulary of {n_vocab:,}")
                if progress is not None:
                    progress(start + len(chunk), count, f"checking {path}", "tokens")
    except OSError as e:
        raise files.FileReadError(f"{path}: cannot read token file: {e.strerror or e}") from e


def tokenize_file(path, tokenizer, cache_dir, vocabulary, progress=None, workers=1):
    """The ids of the UTF-8 text file at `path`, too large to hold as text, as a mapped token
    file in `cache_dir` keyed by the text's and the vocabulary's sha256 (as `data.encode`'s
    cache): written once by a streaming pass over `workers` processes, with at most two pieces
    per worker in flight, and reused by later runs."""
    if tokenizer.n_vocab > 1 << 16:
        raise TrainingError(f"{path}: a token file holds ids below 65,536; this vocabulary has "
                            f"{tokenizer.n_vocab:,}")  # fmt: skip
    size = files.check_regular(path, SIZE_LIMIT, "training text", error=TrainingError)
    digest = _file_digest(path, size, progress)
    target = Path(cache_dir) / f"{digest[:32]}-{data.vocabulary_digest(vocabulary)[:16]}.bin"
    if target.is_file():
        try:
            return open_ids(target, tokenizer.n_vocab)
        except PicogptError:
            pass  # a damaged cache: tokenized again
    pieces = _text_pieces(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_file(target) as out:
            what = f"tokenizing {path}"
            for ids, done in _encode_pieces(pieces, tokenizer, workers):
                out.write(ids.astype(ID_DTYPE).tobytes())
                if progress is not None:  # (bytes read ahead of the pieces: 100% once, at the end)
                    progress(min(done, size - 1), size, what, "bytes")
            if progress is not None:
                progress(size, size, what, "bytes")
    except PicogptError:
        raise
    except OSError as e:  # (reading errors are FileReadErrors, PicogptErrors)
        raise PicogptError(f"cannot write the tokenized text to {target}: "
                           f"{e.strerror or e}") from e  # fmt: skip
    return open_ids(target, tokenizer.n_vocab)


def _file_digest(path, size, progress=None):
    """The sha256 (hex) of the file, read a block at a time (a large text takes a while)."""
    digest, done = hashlib.sha256(), 0
    with _reading(path) as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(min(done, size), size, f"reading {path}", "bytes")
    return digest.hexdigest()


@contextlib.contextmanager
def _reading(path):
    """The open file, its read errors FileReadErrors naming it."""
    try:
        with open(path, "rb") as f:
            yield f
    except PicogptError:
        raise
    except OSError as e:
        raise files.FileReadError(f"{path}: cannot read training text: {e.strerror or e}") from e


def _text_pieces(path):
    """(text, bytes read) pieces of the file of about TOKENIZE_CHUNK characters, each cut where
    no GPT-2 pre-token spans (data.safe_cut), decoded as UTF-8 as they are read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    cut, chunk = data.safe_cut(), data.TOKENIZE_CHUNK
    buffer, done = "", 0
    with _reading(path) as f:
        while True:
            block = f.read(READ_BLOCK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                buffer += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise TrainingError(f"{path}: training text is not UTF-8 text (byte offset "
                                    f"{done - pending + e.start})") from e  # fmt: skip
            done += len(block)
            while len(buffer) > chunk and (match := cut.search(buffer, chunk)):
                yield buffer[: match.end()], done
                buffer = buffer[match.end() :]
            if not block:
                break
            if len(buffer) > LONGEST_PIECE * chunk:
                raise TrainingError(f"{path}: {len(buffer):,} characters before byte offset "
                                    f"{done:,} without whitespace to cut them at")  # fmt: skip
    if buffer:
        yield buffer, done


# --- the processes ----------------------------------------------------------------------------

_tokenizer = None  # a worker's tokenizer, set once by _start_worker


def _start_worker(tokenizer):
    global _tokenizer
    _tokenizer = tokenizer
    # Ctrl-C reaches every process of the terminal's group: the main process stops the pass
    # (after the pieces in flight), and the workers print no traceback of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_piece(text, tokenizer=None):
    return np.array((tokenizer or _tokenizer).encode(text), ID_DTYPE)


def _encode_pieces(pieces, tokenizer, workers):
    """(ids, bytes read) of each piece in order, encoded in this process (workers 1) or in a
    pool of processes with at most 2 * workers pieces submitted and not yet taken."""
    if workers <= 1:
        for text, done in pieces:
            yield _encode_piece(text, tokenizer), done
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        pending = collections.deque()
        for text, done in pieces:
            pending.append((pool.submit(_encode_piece, text), done))
            if len(pending) >= 2 * workers:
                future, at = pending.popleft()
                yield future.result(), at
        while pending:
            future, at = pending.popleft()
            yield future.result(), at
