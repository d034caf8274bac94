"""Where GPT-2 models live on disk, and fetching OpenAI's files into it.

A download is safe to interrupt and to run twice at once: each file is streamed into
`<file>.part` and renamed only when complete (an interrupted file resumes with an HTTP Range
request), a lock file serialises processes fetching the same model, and the checkpoint's CRC32C
checksums are verified once, the result recorded in `<model>/.picogpt-verified`. A model folder
is only handed out once that record matches the files on disk.
"""

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from picogpt.errors import DownloadError, ModelNotFoundError

# OpenAI's folder names, and the HuggingFace-style names people also use for them.
SIZES = ("124M", "355M", "774M", "1558M")
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# Everything OpenAI publishes per size. model.ckpt.meta (the TF graph) is not needed to load.
FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
NEEDED = tuple(f for f in FILES if f != "model.ckpt.meta")
VERIFIED = ".picogpt-verified"  # JSON {file: size} of the files that passed verification
LOCK = ".picogpt-lock"

RETRIES = 5  # attempts per file after the first that make no progress
BACKOFF = 0.5  # seconds before the first retry; doubles each time
TIMEOUT = (10, 60)  # seconds: connecting, and waiting for the next bytes
CHUNK = 1 << 16


def canonical_size(name):
    """'gpt2-medium' -> '355M'; '124M' -> '124M'; anything else -> None."""
    name = ALIASES.get(name, name)
    return name if name in SIZES else None


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


def base_url(override=None):
    """--base-url, else $PICOGPT_BASE_URL, else OpenAI's public bucket."""
    return (override or os.environ.get("PICOGPT_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


class _Retry(Exception):
    """A transient failure (5xx, dropped connection, short body): try again."""


def ensure_model(size, weights_dir_override=None, base_url_override=None, progress=None):
    """Return the folder of GPT-2 `size` ('124M', 'gpt2-medium', ...), downloading it if needed.

    Files placed in the folder by hand are used as they are (verified once, not re-fetched).
    Raises ModelNotFoundError when the model is missing and cannot be fetched (no network,
    unknown size), DownloadError when a transfer fails or arrives corrupted."""
    name = size
    size = canonical_size(size)
    if size is None:
        raise ModelNotFoundError(
            f"unknown GPT-2 size {name!r}: expected one of {', '.join(SIZES)} "
            f"(or {', '.join(ALIASES)})"
        )
    folder = weights_dir(weights_dir_override) / size
    if _is_verified(folder):
        return folder
    return download(size, weights_dir_override, base_url_override, progress=progress,
                    only_if_missing=True)


def download(size, weights_dir_override=None, base_url_override=None, *, progress=None,
             only_if_missing=False, retries=RETRIES, backoff=BACKOFF, timeout=TIMEOUT):
    """Fetch every file of GPT-2 `size` that is not on disk yet, verify, and return the folder.

    `progress`: None shows a progress line when stderr is a terminal; True/False forces it.
    `only_if_missing`: when the files needed to load are all present (e.g. placed by hand), do not
    fetch the optional ones."""
    size = canonical_size(size) or size
    if size not in SIZES:
        raise ModelNotFoundError(f"unknown GPT-2 size {size!r}: expected one of {', '.join(SIZES)}")
    folder = weights_dir(weights_dir_override) / size
    url = f"{base_url(base_url_override)}/{size}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the weights folder {folder}: {e}") from None
    if progress is None:
        progress = sys.stderr.isatty()

    with _locked(folder / LOCK, f"another picogpt is downloading {size} into {folder}; waiting"):
        # Another process may have finished the work while we waited for the lock.
        if _is_verified(folder) and (only_if_missing or _all_present(folder, FILES)):
            return folder
        wanted = NEEDED if only_if_missing and _all_present(folder, NEEDED) else FILES
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            import requests  # only when there is something to fetch: keeps `import picogpt` light

            _say(f"Downloading GPT-2 {size} from {url}/ into {folder}")
            fetched_any = False
            with requests.Session() as session:
                for name in missing:
                    try:
                        fetched_any |= _fetch(session, f"{url}/{name}", folder / name,
                                              retries, backoff, timeout, progress)
                    except _Offline as e:
                        if fetched_any:  # the network went away during the download
                            again = "run the same command again to resume"
                            raise DownloadError(f"{e}; {again}") from None
                        raise ModelNotFoundError(
                            f"GPT-2 {size} is not in {folder} and cannot be downloaded: {e}.\n"
                            f"Check your connection, or place OpenAI's files ({', '.join(NEEDED)})"
                            f" from {url}/ in {folder} by hand."
                        ) from None
        if set(missing) & set(NEEDED) or not _is_verified(folder):
            _verify(folder, downloaded=missing)
    return folder


# --- one file -------------------------------------------------------------------------------------

class _Offline(Exception):
    """Could not connect at all."""


def _fetch(session, url, dest, retries, backoff, timeout, progress):
    """Stream `url` into `dest` through `dest.part`, resuming and retrying. True once bytes came."""
    import requests

    part = dest.with_name(dest.name + ".part")
    if part.exists() and part.stat().st_size:
        _say(f"{dest.name}: resuming after the {_human(part.stat().st_size)} already fetched")
    failures = 0
    received_any = False
    while True:
        have = part.stat().st_size if part.exists() else 0
        got = 0
        try:
            got = _fetch_once(session, url, part, have, timeout, progress)
            received_any |= got > 0
            break
        except requests.ConnectionError as e:
            received_any |= getattr(e, "picogpt_got", 0) > 0
            # Refused/unresolvable before any byte: that is "offline", not a flaky transfer.
            if not received_any and _is_connect_error(e):
                raise _Offline(f"cannot connect to {url} ({_reason(e)})") from None
            error = f"connection lost ({_reason(e)})"
            got = getattr(e, "picogpt_got", 0)
        except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            error = f"connection lost ({_reason(e)})"
            got = getattr(e, "picogpt_got", 0)
            received_any |= got > 0
        except _Retry as e:
            error = str(e)
            got = getattr(e, "picogpt_got", 0)
            received_any |= got > 0
        # Progress resets the count: a connection that keeps dropping mid-file still finishes.
        failures = 0 if got > 0 else failures + 1
        if failures > retries:
            raise DownloadError(f"giving up on {url} after {retries + 1} attempts: {error}")
        delay = 0 if got > 0 else backoff * 2 ** (failures - 1)
        _say(f"{dest.name}: {error}; retrying" + (f" in {delay:g} s" if delay else ""))
        time.sleep(delay)
    os.replace(part, dest)
    return True


def _fetch_once(session, url, part, have, timeout, progress):
    """One GET of `url` into `part` (which already holds `have` bytes). Returns bytes written."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and have:  # asked past the end: the .part is suspicious, restart
            part.unlink(missing_ok=True)
            raise _Retry(f"server refused to resume at byte {have}")
        if r.status_code == 404:
            raise DownloadError(f"{url} does not exist (HTTP 404); is the base URL right?")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise _Retry(f"HTTP {r.status_code} from the server")
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("Content-Range", ""))
            if start != have:  # not the range we asked for: start over cleanly
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {have}")
        elif r.status_code == 200:
            have = 0  # the server ignored Range: it sends the whole file again
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {r.status_code} {r.reason}")
        if r.status_code == 206 and r.headers.get("Content-Length", "").isdigit():
            if total is not None and have + int(r.headers["Content-Length"]) != total:
                part.unlink(missing_ok=True)
                raise _Retry("server sent an inconsistent Content-Range")

        got = 0
        bar = _Progress(part.name[: -len(".part")], have, total) if progress else None
        with open(part, "ab" if have else "wb") as f:
            try:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    if bar:
                        bar.update(have + got)
            except Exception as e:
                e.picogpt_got = got
                raise
            finally:
                if bar:
                    bar.close(have + got)
        if total is not None and have + got != total:
            e = _Retry(f"got {have + got} of {total} bytes")
            e.picogpt_got = got
            if have + got > total:  # more than promised: the .part cannot be trusted
                part.unlink(missing_ok=True)
            raise e
        return got


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); unknown total -> None."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return -1, None


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


def _sizes(folder):
    return {f: (folder / f).stat().st_size for f in NEEDED}


def _is_verified(folder):
    """True when the verification record matches the files on disk (same names and sizes)."""
    try:
        record = json.loads((folder / VERIFIED).read_text())
        return record == _sizes(folder)
    except (OSError, ValueError):
        return False


def _verify(folder, downloaded):
    """Check the checkpoint's CRC32Cs and the JSON files; record success. Files that arrived in
    this download and fail are removed (never loaded); files placed by hand are left alone."""
    from picogpt.checkpoint import CheckpointError, verify

    if not _all_present(folder, NEEDED):
        absent = [f for f in NEEDED if not (folder / f).is_file()]
        raise ModelNotFoundError(f"{folder} is incomplete: {', '.join(absent)} missing")
    (folder / VERIFIED).unlink(missing_ok=True)
    _say(f"Verifying {folder} ...")
    try:
        for name in ("hparams.json", "encoder.json"):
            json.loads((folder / name).read_text(encoding="utf-8"))
        verify(folder)
    except (CheckpointError, ValueError, OSError) as e:
        removed = [f for f in downloaded if f in FILES and (folder / f).exists()]
        for f in removed:
            (folder / f).unlink()
        msg = f"{folder} failed verification: {e}"
        if removed:
            msg += (f"\nRemoved the files just downloaded ({', '.join(removed)}); "
                    "run the same command again to fetch them anew.")
        raise DownloadError(msg) from None
    tmp = folder / (VERIFIED + ".tmp")
    tmp.write_text(json.dumps(_sizes(folder)))
    os.replace(tmp, folder / VERIFIED)


# --- lock, messages, progress ---------------------------------------------------------------------

@contextmanager
def _locked(path, waiting_message):
    """An exclusive lock on `path` held for the block: fcntl.flock on POSIX, msvcrt on Windows.
    The OS drops it when the process dies, so a killed download never leaves a stale lock."""
    with open(path, "a+b") as f:
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
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


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
