"""One file over HTTP, safely: streamed into `<file>.part`, resumed with a Range request after
an interruption, retried within bounds, dropped when it stalls, checked against its announced
size and digest, and renamed into place only when complete; with the progress line a person
watching sees."""

import hashlib
import os
import re
import shutil
import sys
import time
import zlib
from urllib.parse import urlsplit

from picogpt.errors import DownloadError
from picogpt.hub.sources import KB, MB

RETRIES = 5  # attempts per file, after the first, that bring no byte beyond what we had
ATTEMPTS = 50  # failed attempts in one download, all files together
BACKOFF = 0.5  # seconds before the first retry; doubles each time, up to BACKOFF_MAX
BACKOFF_MAX = 30
TIMEOUT = (10, 30)  # seconds: connecting; and the stall window (see STALL_BYTES)
STALL_BYTES = 16 * KB  # a transfer that brings fewer bytes than this in a stall window stalled
DEADLINE = 6 * 3600  # seconds for the whole download; a rerun resumes where it stopped
MAX_REDIRECTS = 10
CHUNK = 1 << 16


# --- one file -------------------------------------------------------------------------------------

class _Retry(Exception):
    """A transient failure (5xx, dropped connection, short body, stall): try again. A stalled
    attempt brings too little to count as progress, whatever it brought."""

    def __init__(self, message, stalled=False):
        super().__init__(message)
        self.stalled = stalled


class Offline(Exception):
    """Could not connect at all."""


class NotFound(DownloadError):
    """The server has no such file (HTTP 404)."""


class Limits:
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


def fetch(session, url, dest, limit, source, limits):
    """Stream `url` into `dest` through `dest.part`, resuming and retrying within `limits`, and
    check it against the digest the server announces (hub downloads) before it takes its name.
    Returns that digest, (algorithm, hex), or None when none was announced."""
    part = dest.with_name(dest.name + ".part")
    best = part.stat().st_size if part.exists() else 0  # the furthest the .part has reached
    if best:
        say(f"{dest.name}: resuming after the {_human(best)} already fetched")
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
        say(f"{dest.name}: {error}; retrying" + (f" in {delay:g} s" if delay else ""))
        time.sleep(delay)
    if digest:
        _check_digest(part, dest.name, url, *digest)
    elif source == "huggingface" and dest.name == "model.safetensors":
        say(f"{dest.name}: the server announced no sha256 (X-Linked-Etag); only its size "
             "was checked")
    os.replace(part, dest)
    return digest


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
            raise Offline(f"cannot connect to {failed} ({_reason(e)})") from None
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
        raise NotFound(f"{url} does not exist (HTTP 404); is the base URL right?")
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
                    break  # fetch reports the deadline
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
    got = file_digest(path, algorithm)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{name} from {url} is not the file the server announced: its {algorithm} is "
            f"{got}, expected {expected}; removed it, run the same command again to fetch it anew")


def file_digest(path, algorithm):
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


# --- messages, progress ---------------------------------------------------------------------------

def say(message):
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
