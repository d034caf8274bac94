"""Real HTTP servers on 127.0.0.1 that serve a model folder the way OpenAI's bucket does
(`/{size}/{file}`, `ModelServer`) or the way the HuggingFace hub does (`HubServer`:
`/{repo}/resolve/main/{file}`, large files redirected to a CDN on another host with the hub's
X-Linked-Etag / X-Linked-Size headers), with the faults downloads must survive or refuse: dropped
connections, answers cut short, corrupted bytes, error statuses, servers that ignore Range, lie
about sizes, compress, trickle, fall silent or redirect in circles. They record every request."""

import gzip
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Faults, each applied to one answer (add_fault) or to every answer (always[name] = fault):
#   ("status", 500)      answer with that status and no body
#   ("drop", n)          the headers of the whole answer, only n body bytes, then close
#   ("half",)            the headers of the whole answer, half its body, then close
#   ("corrupt", offset)  flip a bit of that byte of the file
#   ("length", n)        announce Content-Length n, send the body, close
#   ("dup-length",)      two Content-Length headers that disagree
#   ("no-length",)       no Content-Length: the body ends when the connection closes
#   ("gzip",)            the body gzip-compressed, Content-Encoding: gzip (its compressed length)
#   ("bad-gzip",)        Content-Encoding: gzip on bytes that are not gzip
#   ("encoding", name)   Content-Encoding: name on the plain bytes
#   ("trickle", s)       the body one byte every s seconds
#   ("silent",)          the headers, then nothing until the server stops
#   ("loop",)            302 back to the same URL
#   ("redirect", url)    302 to url


class FaultyServer:
    """A threaded HTTP/1.0 server of `files` (path -> bytes) with faults by file name."""

    def __init__(self):
        self.files = {}
        self.requests = []  # (path, Range header or None), in arrival order
        self.headers_seen = []  # each request's headers, in arrival order
        self.faults = {}  # file name -> list of one-shot faults, used in order
        self.always = {}  # file name -> a fault applied to every request
        self.ignore_range = False
        self.bytes_per_second = None  # throttle, to make transfers overlap in time
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    def add_fault(self, name, *faults):
        with self._lock:
            self.faults.setdefault(name, []).extend(faults)

    def name_of(self, path):
        """The file name a request path serves (faults are looked up by it)."""
        return path.rsplit("/", 1)[-1]

    def route(self, path):
        """("file", bytes, headers) or ("redirect", url, headers) for `path`, or None (404)."""
        data = self.files.get(path)
        return None if data is None else ("file", data, {})

    def requests_for(self, name):
        return [r for r in self.requests if self.name_of(r[0]) == name]

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _next_fault(self, name):
        with self._lock:
            queue = self.faults.get(name)
            if queue:
                return queue.pop(0)
            return self.always.get(name)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                with server._lock:
                    server.requests.append((self.path, rng))
                    server.headers_seen.append(dict(self.headers))
                route = server.route(self.path)
                if route is None:
                    return self._empty(404)
                kind, target, headers = route
                if kind == "redirect":
                    return self._redirect(target, headers)
                fault = server._next_fault(server.name_of(self.path)) or ("none",)
                if fault[0] == "status":
                    return self._empty(fault[1])
                if fault[0] == "loop":
                    return self._redirect(f"http://{self.headers['Host']}{self.path}", {})
                if fault[0] == "redirect":
                    return self._redirect(fault[1], {})
                self._serve(target, headers, rng, fault)

            def _serve(self, data, headers, rng, fault):
                if fault[0] == "corrupt":
                    data = bytearray(data)
                    data[fault[1]] ^= 0x01
                    data = bytes(data)
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                body = data[start:]
                if fault[0] == "gzip":
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                elif fault[0] == "bad-gzip":
                    self.send_header("Content-Encoding", "gzip")
                elif fault[0] == "encoding":
                    self.send_header("Content-Encoding", fault[1])
                if fault[0] == "length":
                    self.send_header("Content-Length", str(fault[1]))
                elif fault[0] == "dup-length":
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Content-Length", str(len(body) + 1))
                elif fault[0] != "no-length":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault[0] in ("drop", "half"):
                    n = fault[1] if fault[0] == "drop" else len(body) // 2
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fault[0] == "trickle":
                    for i in range(len(body)):
                        if server.closing.wait(fault[1]):
                            break
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                elif fault[0] == "silent":
                    self.wfile.flush()
                    server.closing.wait()
                else:
                    self._send(body)

            def _send(self, body):
                if not server.bytes_per_second:
                    self.wfile.write(body)
                    return
                step = max(1, server.bytes_per_second // 20)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(0.05)

            def _redirect(self, location, headers):
                self.send_response(302)
                self.send_header("Location", location)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _empty(self, status):
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


class ModelServer(FaultyServer):
    """A model folder served as OpenAI's bucket serves a size: `/{size}/{file}`."""

    def __init__(self, folder, size="124M", extra_files=None):
        super().__init__()
        self.files = {f"/{size}/{p.name}": p.read_bytes() for p in Path(folder).iterdir()
                      if p.is_file()}
        for name, data in (extra_files or {}).items():
            self.files[f"/{size}/{name}"] = data
        self.size = size


def git_blob_id(data):
    """The id git gives a file's bytes: sha1 of 'blob <size>\\0' + the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(FaultyServer):
    """Files served as the HuggingFace hub serves a repository: `/{repo}/resolve/main/{file}`.

    Small files come from the hub itself with their git blob id as ETag; large (LFS) files are
    a 302 to a CDN on another host (another server and port), the redirect carrying the file's
    sha256 in X-Linked-Etag and ETag and its size in X-Linked-Size; the CDN serves
    `/blobs/{sha256}` with Range and an ETag of its own. Faults by file name apply where the
    body is served (the CDN for large files); `redirect_faults[name]` changes the hub's redirect:
    ("digest", hex) announces another sha256, ("no-digest",) neither sha256 nor size (no
    X-Linked-Etag, ETag, X-Linked-Size), ("loop",) a redirect loop."""

    LFS = ("model.safetensors",)

    def __init__(self, repos, renamed=None):
        """`repos`: {repo: {file name: bytes}}; `renamed`: {old repo: repo}, redirected there
        as the hub redirects a renamed repository."""
        super().__init__()
        self.renamed = renamed or {}
        self.cdn = FaultyServer()
        self.cdn.faults, self.cdn.always, self.cdn._lock = self.faults, self.always, self._lock
        self.cdn.requests, self.cdn.headers_seen = self.requests, self.headers_seen
        self.redirect_faults = {}
        self._names = {}  # path (hub's or CDN's) -> file name
        self._ids = {}  # path -> ETag (git blob id, CDN's md5) or sha256 of a large file
        for repo, repo_files in repos.items():
            for name, data in repo_files.items():
                path = f"/{repo}/resolve/main/{name}"
                self.files[path] = data
                self._names[path] = name
                if name in self.LFS:
                    sha = hashlib.sha256(data).hexdigest()
                    self.cdn.files[f"/blobs/{sha}"] = data
                    self._names[f"/blobs/{sha}"] = name
                    self._ids[path], self._ids[f"/blobs/{sha}"] = sha, hashlib.md5(data).hexdigest()
        self.cdn.name_of = self.name_of
        self.cdn.route = self._cdn_route

    def name_of(self, path):
        return self._names.get(path, path.rsplit("/", 1)[-1])

    def route(self, path):
        for old, new in self.renamed.items():
            if path.startswith(f"/{old}/"):
                return "redirect", f"/{new}/{path[len(old) + 2:]}", {}
        data = self.files.get(path)
        if data is None:
            return None
        name = self.name_of(path)
        if name not in self.LFS:
            return "file", data, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": "0" * 40}
        sha = self._ids[path]
        fault = self.redirect_faults.get(name, ("none",))
        announced = fault[1] if fault[0] == "digest" else sha
        headers = {"X-Repo-Commit": "0" * 40}
        if fault[0] != "no-digest":
            headers.update({"X-Linked-Etag": f'"{announced}"', "ETag": f'"{announced}"',
                            "X-Linked-Size": str(len(data))})
        if fault[0] == "loop":
            return "redirect", f"{self.url}{path}", headers
        return "redirect", f"{self.cdn.url}/blobs/{sha}", headers

    def _cdn_route(self, path):
        data = self.cdn.files.get(path)
        if data is None:
            return None
        return "file", data, {"ETag": f'"{self._ids[path]}"'}

    def start(self):
        self.cdn.start()
        return super().start()

    def stop(self):
        super().stop()
        self.cdn.stop()


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
