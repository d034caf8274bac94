"""Where GPT-2 models live on disk, and fetching them there from OpenAI or the HuggingFace hub.

A model lives in `<weights>/<size>/`, in OpenAI's layout (hparams.json, a TF checkpoint,
encoder.json, vocab.bpe) or HuggingFace's (config.json, model.safetensors, vocab.json,
merges.txt), depending on where it came from (`source`).

A download is safe to interrupt and to run twice at once: each file is streamed into
`<file>.part` and renamed only when complete (an interrupted file resumes with an HTTP Range
request), a lock file serialises processes fetching the same model, and the files are verified
once, the result recorded in `<model>/.picogpt-verified`: OpenAI's checkpoint by its CRC32C
checksums, the hub's weights by the sha256 the hub announces, GPT-2's tokenizer (the same two files
for every size and both sources) by pinned sha256 digests. A model folder is only handed out once
that record matches the files on disk.

A download always ends: every file has a size it cannot exceed, each file gets a bounded number of
attempts that bring nothing new and the whole download a bounded number of failed attempts, a
transfer that stalls is dropped, and the download has an overall deadline.

sources.py says what to fetch from where, transfer.py fetches one file; this module fetches a
model's files into its folder under a lock, and verifies them.
"""

import errno
import os
import sys
import time
from contextlib import contextmanager

from picogpt import files
from picogpt.errors import DownloadError, ModelNotFoundError, PicogptError
from picogpt.hub import verify
from picogpt.hub.sources import (
    ALIASES,
    GPT2_VOCAB,
    HF_FILES,
    HF_REPOS,
    LAYOUTS,
    MAX_BYTES,
    NEEDED,
    PINNED,
    SIZES,
    SOURCES,
    WEIGHTS,
    base_url,
    canonical_size,
    file_url,
    max_bytes,
    source_name,
    weights_dir,
)
from picogpt.hub.transfer import (
    ATTEMPTS,
    BACKOFF,
    DEADLINE,
    MAX_REDIRECTS,
    RETRIES,
    TIMEOUT,
    Limits,
    NotFound,
    Offline,
    fetch,
    file_digest,
    say,
)

VERIFIED = verify.STAMP  # what passed verification: each file's size, mtime and inode
LOCK = ".picogpt-lock"


def ensure_model(size, weights_dir_override=None, base_url_override=None, source=None,
                 progress=None):
    """Return the folder of GPT-2 `size` ('124M', 'gpt2-medium', ...), downloading it if needed
    from `source` ('openai' or 'huggingface'; default $PICOGPT_SOURCE, else 'openai').

    A verified model from either source is used as it is; files placed in the folder by hand are
    used as they are (verified once, not re-fetched). Raises ModelNotFoundError when the model is
    missing and cannot be fetched (no network, unknown size), DownloadError when a transfer fails
    or arrives corrupted."""
    name = size
    size = canonical_size(size)
    if size is None:
        raise ModelNotFoundError(
            f"unknown GPT-2 size {name!r}: expected one of {', '.join(SIZES)} "
            f"(or {', '.join(ALIASES)})"
        )
    folder = weights_dir(weights_dir_override) / size
    if verified_source(folder):
        return folder
    return download(size, weights_dir_override, base_url_override, source=source,
                    progress=progress, only_if_missing=True)


def download(size, weights_dir_override=None, base_url_override=None, *, source=None,
             progress=None, only_if_missing=False, retries=RETRIES, attempts=ATTEMPTS,
             backoff=BACKOFF, timeout=TIMEOUT, deadline=DEADLINE):
    """Fetch every file of GPT-2 `size` that is not on disk yet, verify, and return the folder.

    `source`: 'openai' or 'huggingface' (default $PICOGPT_SOURCE, else 'openai').
    `progress`: None shows a progress line when stderr is a terminal; True/False forces it.
    `only_if_missing`: when the files needed to load are all present (e.g. placed by hand), do not
    fetch the optional ones. `retries`, `attempts`, `backoff`, `timeout` (connect, stall window)
    and `deadline` bound the download (see the module's constants)."""
    chosen = bool(source or os.environ.get("PICOGPT_SOURCE"))
    source = source_name(source)
    size = canonical_size(size) or size
    if size not in SIZES:
        raise ModelNotFoundError(f"unknown GPT-2 size {size!r}: expected one of {', '.join(SIZES)}")
    folder = weights_dir(weights_dir_override) / size
    base = base_url(base_url_override, source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "a+b")  # noqa: SIM115 (held by _locked below)
    except OSError as e:
        return _read_only(folder, e)
    if progress is None:
        progress = sys.stderr.isatty()
    limits = Limits(retries, attempts, backoff, timeout, deadline, progress)
    with lock, _locked(lock, f"another picogpt is downloading {size} into {folder}; waiting"):
        try:
            return _download_locked(folder, size, source, base, chosen, only_if_missing, limits)
        except PicogptError:  # some are OSErrors too (ModelNotFoundError, FileReadError)
            raise
        except OSError as e:  # our own files (the network's errors are DownloadErrors by now)
            raise DownloadError(_local_error(e, folder)) from e


def _download_locked(folder, size, source, base, chosen, only_if_missing, limits):
    files.remove_stale_temporaries(folder, [VERIFIED])
    fetched, needed = LAYOUTS[source]
    # Another process may have finished the work while we waited for the lock.
    have = verified_source(folder)
    if have and have != source:
        say(f"GPT-2 {size} is already in {folder} ({_layout_name(have)}); not fetching "
             f"{_layout_name(source)}")
        return folder
    if have and (only_if_missing or _all_present(folder, fetched)):
        return folder
    complete = [s for s in SOURCES if _all_present(folder, LAYOUTS[s][1])]
    if complete and source not in complete:  # the other layout's model, e.g. placed by hand
        _verify(folder, complete[0], downloaded=())
        say(f"GPT-2 {size} is in {folder} ({_layout_name(complete[0])}); not fetching "
             f"{_layout_name(source)}")
        return folder
    other = [f for s in SOURCES if s != source for f in WEIGHTS[s] if (folder / f).is_file()]
    if other:
        raise DownloadError(
            f"{folder} already holds other files of a model ({', '.join(other)}) and a folder "
            f"holds one model: remove them, or choose another weights folder, to fetch "
            f"{_layout_name(source)} there")
    wanted = needed if only_if_missing and _all_present(folder, needed) else fetched
    missing = [f for f in wanted if not (folder / f).is_file()]
    digests = {}  # {name: sha256} each fetched file was checked against as it arrived
    if missing:
        import requests  # only when there is something to fetch: keeps `import picogpt` light

        where = f"{base}/{HF_REPOS[size]}" if source == "huggingface" else f"{base}/{size}"
        say(f"Downloading GPT-2 {size} from {where}/ into {folder}")
        with requests.Session() as session:
            session.max_redirects = MAX_REDIRECTS
            for name in missing:
                url = file_url(source, base, size, name)
                try:
                    digest = fetch(session, url, folder / name, max_bytes(size, name), source,
                                   limits)
                except Offline as e:
                    if name in needed or not _all_present(folder, needed):
                        raise _offline_error(e, folder, size, source, where, chosen) from None
                    say(f"{name} cannot be fetched ({e}); skipped (not needed to load)")
                    continue
                except NotFound:  # a mirror may leave out what loading does not need
                    if name in needed:
                        raise
                    say(f"{name} is not at {url}; skipped (not needed to load)")
                    continue
                if digest and digest[0] == "sha256":
                    digests[name] = digest[1]
    if set(missing) & set(needed) or not verified_source(folder):
        _verify(folder, source, downloaded=missing, digests=digests)
    return folder


def _offline_error(e, folder, size, source, where, chosen):
    if source == "huggingface":
        by_hand = f"the hub's files ({', '.join(HF_FILES)}) from {where}/"
    else:
        by_hand = f"OpenAI's files ({', '.join(NEEDED)}) from {where}/"
    msg = (f"GPT-2 {size} is not in {folder} and cannot be downloaded: {e}.\n"
           f"Check your connection, or place {by_hand} in {folder} by hand.")
    if source == "openai" and not chosen:
        msg += ("\nOr fetch it from the HuggingFace hub instead: --source huggingface "
                "(PICOGPT_SOURCE=huggingface, or source='huggingface' in Python).")
    return ModelNotFoundError(msg)


def _layout_name(source):
    return "OpenAI's files" if source == "openai" else "the HuggingFace hub's files"


def _local_error(e, folder):
    """One line for a failure of our own files: a full disk, a folder we may not write."""
    where = e.filename or folder
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device of {folder} (writing {where}): free some space or "
                "choose another weights folder, then run the same command again; the download "
                "resumes where it stopped")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write in {folder} ({e.strerror}): choose a weights folder you can "
                "write (--weights-dir or $PICOGPT_WEIGHTS)")
    return f"{where}: {e.strerror or e}"


def _read_only(folder, e):
    """A weights folder we cannot write in: usable when a whole model is already there (checked,
    the check recorded in the weights folder if that can be written: verify.stamp_path),
    otherwise nothing can be downloaded into it."""
    layout = next((s for s in SOURCES if _all_present(folder, LAYOUTS[s][1])), None)
    if layout is None or not isinstance(e, PermissionError) and e.errno != errno.EROFS:
        raise DownloadError(_local_error(e, folder)) from None
    if verified_source(folder):
        return folder
    _verify(folder, layout, downloaded=())
    if not _is_verified(folder):
        say(f"{folder} is read-only: its files passed verification, which cannot be recorded "
            "there (they will be checked again next time)")
    return folder


# --- verification ---------------------------------------------------------------------------------

def _all_present(folder, names):
    return all((folder / f).is_file() for f in names)


def verified_source(folder):
    """'openai' or 'huggingface' when the folder's stamp records every file that layout needs,
    each unchanged since it passed verification (verify.py), else None."""
    stamp = verify.read_stamp(folder)
    for source, (_, needed) in LAYOUTS.items():
        if all(verify.unchanged(folder, name, stamp.get(name)) for name in needed):
            return source
    return None


def _is_verified(folder):
    return verified_source(folder) is not None


def _verify(folder, source, downloaded, digests=None):
    """Check the folder's files as their layout allows: JSON files parse, GPT-2's tokenizer has
    its pinned digests, the weights pass verify.check (OpenAI's checkpoint its CRC32Cs, the hub's
    safetensors its structure, its bytes having been checked against the announced sha256 as
    they arrived: `digests`); record success in the stamp. Files that arrived in this download
    and fail are removed (never loaded); files placed by hand are left alone."""
    needed = LAYOUTS[source][1]
    if not _all_present(folder, needed):
        absent = [f for f in needed if not (folder / f).is_file()]
        raise ModelNotFoundError(f"{folder} is incomplete: {', '.join(absent)} missing")
    say(f"Verifying {folder} ...")
    before = {name: verify.identity(folder / name) for name in needed}
    tokenizer = ("encoder.json", "vocab.bpe") if source == "openai" else ("vocab.json",
                                                                          "merges.txt")
    try:
        config = "hparams.json" if source == "openai" else "config.json"
        n_vocab = _json_field(folder / config, "n_vocab" if source == "openai" else "vocab_size")
        files.load_json(folder / tokenizer[0], MAX_BYTES[tokenizer[0]])
        pinned = _check_pinned(folder, tokenizer, n_vocab)
        verify.check(folder, digests)  # the weights: records them in the stamp itself
    except (PicogptError, OSError, ValueError) as e:
        removed = [f for f in downloaded if (folder / f).exists()]
        for f in removed:
            (folder / f).unlink()
        msg = f"{folder} failed verification: {e}"
        if removed:
            msg += (f"\nRemoved the files just downloaded ({', '.join(removed)}); "
                    "run the same command again to fetch them anew.")
        raise DownloadError(msg) from None
    stamp = verify.read_stamp(folder)  # the weights' entries are in it; now the other files'
    verify.record(folder, {name: {**before[name], "check": "sha256" if name in pinned else "read"}
                           for name in needed if not verify.unchanged(folder, name,
                                                                      stamp.get(name))})


def _json_field(path, key):
    """`key` of the JSON object in `path` (None when absent)."""
    value = files.load_json(path, MAX_BYTES[path.name], path.name)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value.get(key)


def _check_pinned(folder, names, n_vocab):
    """GPT-2's vocabulary (n_vocab 50257, every size) is one pair of files: check their sha256.
    Files written anew hold the same tables in other bytes (picogpt's export, another program's
    JSON): those pass when their tables are GPT-2's. A model with another vocabulary is not one of
    OpenAI's, and carries its own tokenizer. Returns the names that matched their sha256."""
    if n_vocab != GPT2_VOCAB:
        return ()
    digests = {name: file_digest(folder / name, "sha256") for name in names}
    altered = [name for name in names if digests[name] != PINNED[name]]
    if altered and not _gpt2s_tables(folder, names):
        name = altered[0]
        raise ValueError(f"{folder / name} is not GPT-2's {name} (sha256 {digests[name]}, "
                         f"expected {PINNED[name]}) and its table is not GPT-2's either: "
                         "truncated or altered")
    return [name for name in names if name not in altered]


def _gpt2s_tables(folder, names):
    """Whether the token table and merge list in `names` are GPT-2's, whatever their bytes."""
    from picogpt.tokenizers import GPT2_VOCABULARY
    from picogpt.tokenizers.bpe import BPE

    try:
        theirs = BPE.load(folder, names)
    except (PicogptError, OSError, ValueError):
        return False
    gpt2 = BPE.load(GPT2_VOCABULARY)
    return theirs.encoder == gpt2.encoder and theirs.merges == gpt2.merges


# --- lock, messages, progress ---------------------------------------------------------------------

@contextmanager
def _locked(f, waiting_message):
    """An exclusive lock on the open file `f` held for the block: fcntl.flock on POSIX, msvcrt on
    Windows. The OS drops it when the process dies, so a killed download never leaves a stale
    lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        said = False
        while True:
            try:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                break
            except OSError:
                if not said:
                    say(waiting_message)
                    said = True
                time.sleep(0.2)
        try:
            yield
        finally:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        say(waiting_message)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
