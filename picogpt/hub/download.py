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
"""

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from picogpt import files
from picogpt.errors import DownloadError, ModelNotFoundError, PicogptError

# OpenAI's folder names, and the HuggingFace-style names people also use for them.
SIZES = ("124M", "355M", "774M", "1558M")
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}

SOURCES = ("openai", "huggingface")
BASE_URLS = {
    "openai": "https://openaipublic.blob.core.windows.net/gpt-2/models",  # {base}/{size}/{file}
    "huggingface": "https://huggingface.co",  # {base}/{repo}/resolve/main/{file}
}
DEFAULT_BASE_URL = BASE_URLS["openai"]
HF_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
            "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}

DATA = "model.ckpt.data-00000-of-00001"
# Everything OpenAI publishes per size. model.ckpt.meta (the TF graph) is not needed to load.
FILES = ("checkpoint", "encoder.json", "hparams.json", DATA, "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")
NEEDED = tuple(f for f in FILES if f != "model.ckpt.meta")
HF_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
LAYOUTS = {"openai": (FILES, NEEDED), "huggingface": (HF_FILES, HF_FILES)}  # fetched, needed
# The files that make a folder one layout's model: a folder holds one model, never two.
WEIGHTS = {"openai": ("hparams.json", "model.ckpt.index", DATA),
           "huggingface": ("config.json", "model.safetensors")}

# GPT-2's tokenizer is one pair of files for every size; the hub's vocab.json and merges.txt are
# the same bytes as OpenAI's encoder.json and vocab.bpe (sha256 as tiktoken pins them).
GPT2_VOCAB = 50257
PINNED = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
PINNED["vocab.json"] = PINNED["encoder.json"]
PINNED["merges.txt"] = PINNED["vocab.bpe"]

KB, MB = 1 << 10, 1 << 20
# The most bytes each file can be (GPT-2's real files are well inside these).
MAX_BYTES = {"checkpoint": 64 * KB, "hparams.json": 64 * KB, "config.json": MB,
             "encoder.json": 4 * MB, "vocab.json": 4 * MB, "vocab.bpe": 2 * MB,
             "merges.txt": 2 * MB, "model.ckpt.index": 16 * MB, "model.ckpt.meta": 64 * MB}

VERIFIED = ".picogpt-verified"  # JSON {file: size} of the files that passed verification
LOCK = ".picogpt-lock"

RETRIES = 5  # attempts per file, after the first, that bring no byte beyond what we had
ATTEMPTS = 50  # failed attempts in one download, all files together
BACKOFF = 0.5  # seconds before the first retry; doubles each time, up to BACKOFF_MAX
BACKOFF_MAX = 30
TIMEOUT = (10, 30)  # seconds: connecting; and the stall window (see STALL_BYTES)
STALL_BYTES = 16 * KB  # a transfer that brings fewer bytes than this in a stall window stalled
DEADLINE = 6 * 3600  # seconds for the whole download; a rerun resumes where it stopped
MAX_REDIRECTS = 10
CHUNK = 1 << 16


def canonical_size(name):
    """'gpt2-medium' -> '355M'; '124M' -> '124M'; anything else -> None."""
    name = ALIASES.get(name, name)
    return name if name in SIZES else None


def max_bytes(size, name):
    """The most bytes file `name` of GPT-2 `size` can be: the weights are 4 bytes a parameter
    (the size names the millions of parameters), with a quarter to spare (the hub's file also
    holds each layer's attention mask)."""
    return MAX_BYTES.get(name, int(size[:-1]) * 5_000_000)


def weights_dir(override=None):
    """The folder that holds downloaded models: an explicit override, else $PICOGPT_WEIGHTS,
    else ./weights when it exists (a clone of this repository), else ~/.cache/picogpt."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("PICOGPT_WEIGHTS")
    if env:
        return Path(env).expanduser()
    if Path("weights").is_dir():
        return Path("weights")
    return Path.home() / ".cache" / "picogpt"


def source_name(override=None):
    """--source, else $PICOGPT_SOURCE, else 'openai'."""
    source = override or os.environ.get("PICOGPT_SOURCE") or "openai"
    if source not in SOURCES:
        raise DownloadError(f"unknown download source {source!r}: expected one of "
                            f"{', '.join(SOURCES)} (--source or $PICOGPT_SOURCE)")
    return source


def check_base_url(url):
    """`url` without its trailing slash, when it is an http(s) URL with a host and a valid port;
    otherwise a DownloadError saying what is wrong."""
    text = str(url)

    def bad(reason):
        return DownloadError(f"not an http(s) URL: {text!r} ({reason})")

    if any(c.isspace() or not c.isprintable() for c in text):
        raise bad("it contains spaces or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port  # a ValueError when it is not a number in 0-65535
    except ValueError as e:
        raise bad(str(e)) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("it must start with http:// or https://")
    if not parts.hostname:
        raise bad("no host name")
    if port == 0:
        raise bad("port 0")
    if parts.query or parts.fragment:
        raise bad("a base URL has no ?query or #fragment")
    return text.rstrip("/")


def base_url(override=None, source="openai"):
    """--base-url, else $PICOGPT_BASE_URL, else the source's own address; checked."""
    return check_base_url(override or os.environ.get("PICOGPT_BASE_URL") or BASE_URLS[source])


def file_url(source, base, size, name):
    """Where file `name` of GPT-2 `size` is under `base`, in the source's URL layout."""
    if source == "huggingface":
        return f"{base}/{HF_REPOS[size]}/resolve/main/{name}"
    return f"{base}/{size}/{name}"


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
    limits = _Limits(retries, attempts, backoff, timeout, deadline, progress)
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
        _say(f"GPT-2 {size} is already in {folder} ({_layout_name(have)}); not fetching "
             f"{_layout_name(source)}")
        return folder
    if have and (only_if_missing or _all_present(folder, fetched)):
        return folder
    complete = [s for s in SOURCES if _all_present(folder, LAYOUTS[s][1])]
    if complete and source not in complete:  # the other layout's model, e.g. placed by hand
        _verify(folder, complete[0], downloaded=())
        _say(f"GPT-2 {size} is in {folder} ({_layout_name(complete[0])}); not fetching "
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
    if missing:
        import requests  # only when there is something to fetch: keeps `import picogpt` light

        where = f"{base}/{HF_REPOS[size]}" if source == "huggingface" else f"{base}/{size}"
        _say(f"Downloading GPT-2 {size} from {where}/ into {folder}")
        with requests.Session() as session:
            session.max_redirects = MAX_REDIRECTS
            for name in missing:
                url = file_url(source, base, size, name)
                try:
                    _fetch(session, url, folder / name, max_bytes(size, name), source, limits)
                except _Offline as e:
                    raise _offline_error(e, folder, size, source, where, chosen) from None
    if set(missing) & set(needed) or not verified_source(folder):
        _verify(folder, source, downloaded=missing)
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
    but the check cannot be recorded), otherwise nothing can be downloaded into it."""
    layout = next((s for s in SOURCES if _all_present(folder, LAYOUTS[s][1])), None)
    if layout is None or not isinstance(e, PermissionError) and e.errno != errno.EROFS:
        raise DownloadError(_local_error(e, folder)) from None
    if verified_source(folder):
        return folder
    _verify(folder, layout, downloaded=(), record=False)
    _say(f"{folder} is read-only: its files passed verification, which cannot be recorded there "
         "(they will be checked again next time)")
    return folder


# --- one file -------------------------------------------------------------------------------------

class _Retry(Exception):
    """A transient failure (5xx, dropped connection, short body, stall): try again. A stalled
    attempt brings too little to count as progress, whatever it brought."""

    def __init__(self, message, stalled=False):
        super().__init__(message)
        self.stalled = stalled


class _Offline(Exception):
    """Could not connect at all."""


class _Limits:
    """The bounds of one download: retries per file, failed attempts in all, the deadline."""

    def __init__(self, retries, attempts, backoff, timeout, deadline, progress):
        self.retries, self.attempts, self.backoff = retries, attempts, backoff
        self.connect_timeout, self.stall = timeout
        self.deadline = deadline
        self.end = time.monotonic() + deadline
        self.progress = progress
        self.failures = 0  # failed attempts so far, all files together
        self.answered = False  # a server has answered: failures now are not "offline"

    def left(self):
        return self.end - time.monotonic()

    def check_deadline(self, name, part):
        if self.left() <= 0:
            kept = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"the download did not finish within {_duration(self.deadline)} (at {name}, "
                f"{_human(kept)} of it fetched); run the same command again to resume")


def _fetch(session, url, dest, limit, source, limits):
    """Stream `url` into `dest` through `dest.part`, resuming and retrying within `limits`, and
    check it against the digest the server announces (hub downloads) before it takes its name."""
    part = dest.with_name(dest.name + ".part")
    best = part.stat().st_size if part.exists() else 0  # the furthest the .part has reached
    if best:
        _say(f"{dest.name}: resuming after the {_human(best)} already fetched")
    stuck = 0  # attempts in a row that brought nothing beyond `best`
    while True:
        limits.check_deadline(dest.name, part)
        try:
            digest = _fetch_once(session, url, part, limit, source, limits)
            break
        except _Retry as e:
            error, stalled = str(e), e.stalled
        limits.check_deadline(dest.name, part)
        now = part.stat().st_size if part.exists() else 0
        if now > best and not stalled:
            best, stuck = now, 0
        else:
            best, stuck = max(best, now), stuck + 1
        limits.failures += 1
        if stuck > limits.retries:
            raise DownloadError(f"giving up on {url} after {stuck} attempts in a row that "
                                f"brought nothing new: {error}")
        if limits.failures >= limits.attempts:
            raise DownloadError(
                f"giving up on {url} after {limits.failures} failed attempts in this download "
                f"(last: {error}); run the same command again to resume")
        delay = 0 if stuck == 0 else min(limits.backoff * 2 ** (stuck - 1), BACKOFF_MAX)
        delay = max(0, min(delay, limits.left()))
        _say(f"{dest.name}: {error}; retrying" + (f" in {delay:g} s" if delay else ""))
        time.sleep(delay)
    if digest:
        _check_digest(part, dest.name, url, *digest)
    elif source == "huggingface" and dest.name == "model.safetensors":
        _say(f"{dest.name}: the server announced no sha256 (X-Linked-Etag); only its size "
             "was checked")
    os.replace(part, dest)


def _fetch_once(session, url, part, limit, source, limits):
    """One GET of `url` appended to `part` (or replacing it). Returns the digest the server
    announced, as (algorithm, hex), or None."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # the file's own bytes, whose size we know
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with session.get(url, headers=headers, stream=True,
                         timeout=(limits.connect_timeout, limits.stall)) as r:
            limits.answered = True
            hub = _hub_answers(r, url) if source == "huggingface" else []
            digest = _announced_digest(hub, r)
            start, total, decode = _check_answer(r, url, part, have, limit, _linked_size(hub))
            _stream(r, part, start, total, limit, decode, limits)
            return digest
    except requests.TooManyRedirects:
        raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)") \
            from None
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as e:
        raise DownloadError(f"{url}: the server's answer is unusable ({_reason(e)})") from None
    except requests.ConnectionError as e:
        if not limits.answered and _is_connect_error(e):  # where it failed: maybe a redirect's
            failed = getattr(e.request, "url", None) or url
            raise _Offline(f"cannot connect to {failed} ({_reason(e)})") from None
        raise _Retry(f"connection lost ({_reason(e)})") from None
    except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise _Retry(f"connection lost ({_reason(e)})") from None
    except requests.RequestException as e:
        raise DownloadError(f"{url}: {_reason(e)}") from None


def _check_answer(r, url, part, have, limit, linked=None):
    """The status and headers of an answer: (offset the body starts at, the file's total size
    or None, a decoder for an encoded body or None). Raises _Retry or DownloadError."""
    status = r.status_code
    if status == 416 and have:  # asked past the end: the .part is suspicious, restart
        part.unlink(missing_ok=True)
        raise _Retry(f"server refused to resume at byte {have}")
    if status == 404:
        raise DownloadError(f"{url} does not exist (HTTP 404); is the base URL right?")
    if status in (401, 403):
        raise DownloadError(f"{url}: access denied (HTTP {status})")
    if status >= 500 or status in (408, 429):
        raise _Retry(f"HTTP {status} from the server")
    if status not in (200, 206):
        raise DownloadError(f"{url}: unexpected HTTP {status} {r.reason}")
    length = _content_length(r, url)
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    decode = None
    if encoding not in ("", "identity"):
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise DownloadError(f"{url}: the server sent the file {encoding}-encoded, which "
                                "picogpt cannot decode")
        if status == 206:  # a range of the compressed bytes: useless to append; start over
            part.unlink(missing_ok=True)
            raise _Retry("server compressed a partial answer; starting the file over")
        decode = _Decoder(encoding)
        length = None  # the compressed size, not the file's
    if status == 206:
        start, end, total = _content_range(r.headers.get("Content-Range", ""))
        if start != have or (total is not None and end != total - 1) \
                or (length is not None and total is not None and length != total - have):
            part.unlink(missing_ok=True)
            raise _Retry(f"server sent an unusable Content-Range "
                         f"({r.headers.get('Content-Range')!r} for bytes={have}-)")
    else:
        start, total = 0, length  # a whole file: the server ignored Range, or we sent none
    if total is None:
        total = linked
    elif linked is not None and linked != total:
        raise DownloadError(f"{url}: the hub announced {linked} bytes (X-Linked-Size), the "
                            f"server sends {total}")
    if total is not None and total > limit:
        raise DownloadError(f"{url}: the server says the file is {_human(total)}; such a file "
                            f"is at most {_human(limit)}")
    if total is not None:  # a whole answer replaces what the .part holds
        free = shutil.disk_usage(part.parent).free + (have if start == 0 else 0)
        if total - start > free:
            raise DownloadError(f"{part.parent}: {part.name[:-5]} needs {_human(total - start)} "
                                f"more, the device has {_human(free)} free; free some space or "
                                "choose another weights folder")
    return start, total, decode


def _stream(r, part, start, total, limit, decode, limits):
    """Write the body into `part` from offset `start`, bounded by `limit`; a stall (fewer than
    STALL_BYTES in a stall window) or the deadline ends the attempt."""
    import urllib3

    bar = _Progress(part.name[:-5], start, total) if limits.progress else None
    done = start
    window_start, window_bytes = time.monotonic(), 0
    with open(part, "r+b" if start and part.exists() else "wb") as f:
        f.seek(start)
        f.truncate()
        try:
            while True:
                try:
                    raw = r.raw.read1(CHUNK, decode_content=False)
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    raise _Retry(f"connection lost ({_reason(e)})") from None
                data = decode(raw, limit - done + 1) if decode else raw
                if done + len(data) > limit:
                    raise DownloadError(f"{r.url}: the server sends more than the "
                                        f"{_human(limit)} such a file can be")
                if total is not None and done + len(data) > total:
                    raise _Retry(f"the server sent more than the {total} bytes it announced")
                f.write(data)
                done += len(data)
                if bar:
                    bar.update(done)
                if not raw:
                    break
                now = time.monotonic()
                window_bytes += len(raw)
                if window_bytes >= STALL_BYTES:
                    window_start, window_bytes = now, 0
                elif now - window_start > limits.stall:
                    raise _Retry(f"stalled ({window_bytes} bytes in {limits.stall:g} s)",
                                 stalled=True)
                if now > limits.end:
                    break  # _fetch reports the deadline
        finally:
            if bar:
                bar.close(done)
    if decode:
        decode.finish()
    if total is not None and done != total:
        raise _Retry(f"got {done} of {total} bytes")
    if limits.left() <= 0 and (total is None or done != total):
        raise _Retry("out of time")


def _content_length(r, url):
    """The Content-Length header as an int (None when absent). Duplicates must agree."""
    value = r.headers.get("Content-Length")
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not all(v.isdigit() for v in values):
        raise DownloadError(f"{url}: the server sent conflicting or malformed Content-Length "
                            f"headers ({value!r})")
    return int(values.pop())


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 199, 1000); unknown total -> None; malformed -> -1s."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start, end = (int(x) for x in span.split("-", 1))
        return start, end, (None if total.strip() == "*" else int(total))
    except ValueError:
        return -1, -1, None


def _hub_answers(r, url):
    """The answers, redirects included, that came from the host `url` names (the hub's own,
    not its CDN's)."""
    host = urlsplit(url).netloc
    return [a for a in (*r.history, r) if urlsplit(a.url).netloc == host]


def _linked_size(hub):
    """The size the hub announces on its redirect of a large file (X-Linked-Size), or None."""
    for answer in hub:
        value = answer.headers.get("X-Linked-Size", "").strip()
        if value.isdigit():
            return int(value)
    return None


def _announced_digest(hub, r):
    """The digest the hub announces for a file, from its own answers `hub` (a CDN's ETag is the
    CDN's business): ('sha256', hex) for a 64-hex X-Linked-Etag or ETag (a large file's
    sha256, on the redirect to the CDN), or ('git-sha1', hex) for the 40-hex ETag of a small
    file the hub serves itself (its git blob id). None when it announces neither."""
    for answer in hub:
        for header in ("X-Linked-Etag", "ETag"):
            tag = _etag(answer.headers.get(header))
            if re.fullmatch(r"[0-9a-f]{64}", tag):
                return "sha256", tag
    if hub and hub[-1] is r:  # the hub itself sent the body
        tag = _etag(r.headers.get("ETag"))
        if re.fullmatch(r"[0-9a-f]{40}", tag):
            return "git-sha1", tag
    return None


def _etag(value):
    """'W/"abc"' or '"abc"' -> 'abc'."""
    tag = (value or "").strip()
    tag = tag[2:] if tag.startswith("W/") else tag
    return tag.strip('"').lower()


def _check_digest(path, name, url, algorithm, expected):
    """Refuse (and remove) a fetched file whose digest is not the one announced for it."""
    got = _file_digest(path, algorithm)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{name} from {url} is not the file the server announced: its {algorithm} is "
            f"{got}, expected {expected}; removed it, run the same command again to fetch it anew")


def _file_digest(path, algorithm):
    """sha256 of a file, or its git blob id (sha1 of 'blob <size>\\0' + its bytes)."""
    if algorithm == "sha256":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MB), b""):
            h.update(block)
    return h.hexdigest()


class _Decoder:
    """A gzip- or deflate-encoded body decoded as it arrives, at most CHUNK bytes of output per
    step so that a small bomb cannot allocate much (the caller bounds the total)."""

    def __init__(self, encoding):
        self.z = zlib.decompressobj(32 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)

    def __call__(self, data, most):
        """The bytes `data` decodes to, stopping once there are more than `most`."""
        out, n = [], 0
        try:
            while n <= most:  # until zlib has neither input left nor output pending
                piece = self.z.decompress(data, CHUNK)
                data = self.z.unconsumed_tail
                if not piece and not data:
                    break
                out.append(piece)
                n += len(piece)
        except zlib.error as e:
            raise _Retry(f"the server's compressed data is corrupt ({e})") from None
        return b"".join(out)

    def finish(self):
        if not self.z.eof:
            raise _Retry("the server's compressed data ends early")


def _is_connect_error(e):
    """True when the connection was never established (refused, no route, DNS, connect timeout)."""
    import requests
    import urllib3

    if isinstance(e, requests.ConnectTimeout):
        return True
    cause = e.args[0] if e.args else None
    reason = getattr(cause, "reason", cause)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError,
                               urllib3.exceptions.ConnectTimeoutError))


def _reason(e):
    """A short reason instead of requests' long nested exception text."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name",
                   "timed out", "IncompleteRead", "Connection reset", "Connection broken",
                   "Network is unreachable", "nodename nor servname"):
        if marker in text:
            return marker
    return text if len(text) < 120 else text[:117] + "..."


# --- verification ---------------------------------------------------------------------------------

def _all_present(folder, names):
    return all((folder / f).is_file() for f in names)


def _sizes(folder, names):
    return {f: (folder / f).stat().st_size for f in names}


def verified_source(folder):
    """'openai' or 'huggingface' when the folder's verification record matches its files on disk
    (same names and sizes as that layout needs), else None."""
    try:
        record = files.load_json(Path(folder) / VERIFIED, 64 * KB)
    except (PicogptError, OSError):
        return None
    if not isinstance(record, dict):
        return None
    for source, (_, needed) in LAYOUTS.items():
        if set(record) == set(needed):
            try:
                return source if record == _sizes(Path(folder), needed) else None
            except OSError:
                return None
    return None


def _is_verified(folder):
    return verified_source(folder) is not None


def _verify(folder, source, downloaded, record=True):
    """Check the folder's files as their layout allows: JSON files parse, GPT-2's tokenizer has
    its pinned digests, OpenAI's checkpoint its CRC32Cs, the hub's safetensors header describes
    the file (its bytes were checked against the announced sha256 as they arrived); record
    success. Files that arrived in this download and
    fail are removed (never loaded); files placed by hand are left alone."""
    needed = LAYOUTS[source][1]
    if not _all_present(folder, needed):
        absent = [f for f in needed if not (folder / f).is_file()]
        raise ModelNotFoundError(f"{folder} is incomplete: {', '.join(absent)} missing")
    if record:
        (folder / VERIFIED).unlink(missing_ok=True)
    _say(f"Verifying {folder} ...")
    try:
        if source == "openai":
            from picogpt.formats.tf_checkpoint import verify

            n_vocab = _json_field(folder / "hparams.json", "n_vocab")
            files.load_json(folder / "encoder.json", MAX_BYTES["encoder.json"])
            _check_pinned(folder, ("encoder.json", "vocab.bpe"), n_vocab)
            verify(folder)
        else:
            from picogpt.formats.safetensors import read_header

            n_vocab = _json_field(folder / "config.json", "vocab_size")
            files.load_json(folder / "vocab.json", MAX_BYTES["vocab.json"])
            _check_pinned(folder, ("vocab.json", "merges.txt"), n_vocab)
            read_header(folder / "model.safetensors")  # every tensor inside the file
    except (PicogptError, OSError, ValueError) as e:
        removed = [f for f in downloaded if (folder / f).exists()]
        for f in removed:
            (folder / f).unlink()
        msg = f"{folder} failed verification: {e}"
        if removed:
            msg += (f"\nRemoved the files just downloaded ({', '.join(removed)}); "
                    "run the same command again to fetch them anew.")
        raise DownloadError(msg) from None
    if record:
        files.atomic_write(folder / VERIFIED, json.dumps(_sizes(folder, needed)))


def _json_field(path, key):
    """`key` of the JSON object in `path` (None when absent)."""
    value = files.load_json(path, MAX_BYTES[path.name], path.name)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value.get(key)


def _check_pinned(folder, names, n_vocab):
    """GPT-2's vocabulary (n_vocab 50257, every size) is one pair of files: check their sha256.
    A model with another vocabulary is not one of OpenAI's, and carries its own tokenizer."""
    if n_vocab != GPT2_VOCAB:
        return
    for name in names:
        got = _file_digest(folder / name, "sha256")
        if got != PINNED[name]:
            raise ValueError(f"{folder / name} is not GPT-2's {name} (sha256 {got}, expected "
                             f"{PINNED[name]}): truncated or altered")


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
                    _say(waiting_message)
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
        _say(waiting_message)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _say(message):
    print(message, file=sys.stderr, flush=True)


def _human(n):
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _duration(seconds):
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


class _Progress:
    """`model.ckpt.data-...  123.4 MB / 497.8 MB   25%  24.1 MB/s  ETA 0:15`, redrawn in place."""

    def __init__(self, name, start, total):
        self.name, self.start, self.total = name, start, total
        self.t0 = self.last = time.monotonic()

    def update(self, done, final=False):
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-6)
        rate = (done - self.start) / elapsed
        line = f"{self.name:<30}  {_human(done)}"
        if self.total:
            line += f" / {_human(self.total)}  {100 * done / self.total:3.0f}%"
        line += f"  {_human(rate)}/s"
        if final:
            line += f"  in {elapsed:.1f} s"
        elif self.total and rate > 0:
            eta = int((self.total - done) / rate)
            line += f"  ETA {eta // 60}:{eta % 60:02d}"
        sys.stderr.write("\r" + line + "\x1b[K")
        sys.stderr.flush()

    def close(self, done):
        self.update(done, final=True)
        sys.stderr.write("\n")
        sys.stderr.flush()
