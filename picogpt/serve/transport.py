"""`picogpt serve`: OpenAI's HTTP API for one model, standard library only, and the page at `/`
that shows each generated token shaded by its probability, with the alternatives the model weighed.

    GET  /                       the page (picogpt/serve/page/index.html)
    GET  /v1/models              the one model served
    POST /v1/completions         prompt -> text, OpenAI's request and response shapes
    POST /v1/chat/completions    messages -> the assistant's reply, as `picogpt chat` would say it

How it behaves:
- One generation runs at a time (a Model has one KV cache); the others wait in arrival order
  (`FifoLock`). `n` > 1 runs as one batch. A request that extends the previous context (the next
  chat turn) reuses the KV cache: `Model` keeps the longest common prefix.
- Streams are server-sent events, `data: {json}\\n\\n` per chunk, ending with `data: [DONE]`. When a
  client leaves mid-stream (a write fails, or its socket reads as closed) the generation is closed
  before the next token and the next request in line starts; so too when a client that waits
  for a whole answer leaves (its socket is checked between tokens).
- A request must arrive whole (line, headers, body) within 30 s of its first byte, however
  slowly it trickles in (else a 408, and the connection is closed); an idle connection is closed
  after 60 s.
- Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a body
  that is not a JSON object, a field of the wrong type or out of range; 413 for a body over 1 MB
  (refused from Content-Length, before any of it is read; chunked bodies are counted as they come);
  401 for a missing or wrong key when the server has one; 404 for an unknown path. Never a traceback
  to the client; an unexpected failure is a 500 and the server goes on.
- Safety: it binds 127.0.0.1 unless told otherwise; it serves files only from the package's page
  folder, by their listed names (no path ever reaches the file system); no CORS headers unless
  asked for; POST bodies must say `Content-Type: application/json`, so another site's page cannot
  post to it without a CORS preflight; on a loopback address it answers only requests whose Host
  is a loopback name (a rebinding DNS name cannot reach it from a browser).
- One log line per request: time, client, method, path, status, tokens generated, seconds.

This module is the HTTP transport (the handler, the server, the page's files); OpenAI's semantics,
requests to Model calls to response shapes, are openai_api.py's, and each request field's check
is fields.py's. It is about 600 lines because HTTP/1.1's details belong together: bodies by length
or chunked, a deadline on each request, server-sent events and clients that leave, the Host and
key checks, a bound on connections, errors in OpenAI's shape.
"""

import contextlib
import hmac
import io
import json
import re
import select
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from picogpt import files
from picogpt.serve.fields import APIError
from picogpt.serve.openai_api import ClientGone, Service, Stats

PAGE = Path(__file__).parent / "page"
BODY_LIMIT = files.MB  # bytes of a request body
PAGE_FILE_LIMIT = 4 * files.MB
IDLE_TIMEOUT = 60.0  # seconds a connection may sit idle, or a read or a write may wait
REQUEST_TIMEOUT = 30.0  # seconds from a request's first byte to its last
MAX_CONNECTIONS = 64  # open at once (each a thread, most waiting their turn at the model)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"  # a header name (RFC 9110's token)
_HEADER_LIST = re.compile(rf"{_TOKEN}([ \t]*,[ \t]*{_TOKEN})*")  # a preflight's list of them
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".png": "image/png",
                 ".svg": "image/svg+xml", ".ico": "image/x-icon"}


def parse_json(data):
    """A request body as a JSON object; anything else is a 400."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8 (byte offset {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply") from None
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


# --- HTTP -----------------------------------------------------------------------------------------

class RequestTimeout(Exception):
    """A request did not arrive whole within the server's request_timeout. Not a TimeoutError:
    http.server would take it for an idle connection and close it without an answer."""


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, for the handler's rfile. Each read waits at most `idle` seconds;
    once `deadline` (a time.monotonic()) is set, none waits past it, however often bytes come:
    a read that would is a RequestTimeout."""

    def __init__(self, sock, idle):
        self.sock, self.idle, self.deadline = sock, idle, None

    def readable(self):
        return True

    def readinto(self, buffer):
        wait = self.idle
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise RequestTimeout
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        except socket.timeout:
            if self.deadline is not None:  # mid-request: no part of one may stall
                raise RequestTimeout from None
            raise
        finally:
            with contextlib.suppress(OSError):  # writes wait as long as ever
                self.sock.settimeout(self.idle)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams
    server_version = "picogpt"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket's own file: the one below reads under a deadline
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """http.server's, with the whole request (line, headers, body) due within the server's
        request_timeout of its first byte; else a 408, and the connection closes. Waiting for
        that first byte (an idle keep-alive connection) is bounded by IDLE_TIMEOUT."""
        self._reader.deadline = None
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client closed the connection
                return
        except socket.timeout:  # idle for too long
            self.close_connection = True
            return
        self._started = time.monotonic()  # for the log line of an error before _handle
        self._reader.deadline = self._started + self.server.request_timeout
        self.command, self.requestline, self.path = None, "", None  # what send_error reads
        try:
            super().handle_one_request()
        except RequestTimeout:  # in the request line or the headers
            self.send_error(408, self._timeout_message())

    def _timeout_message(self):
        return (f"the request did not arrive within {self.server.request_timeout:g} s of its "
                "first byte")

    # --- routing

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def _handle(self, method):
        self._started, self._status, self._stats = time.monotonic(), None, Stats()
        self._in_request, self._body_read = True, False
        try:
            self._route(method, urlsplit(self.path).path)
        except APIError as e:
            if not self._body_read and self._has_body():
                self.close_connection = True  # its unread body would be read as a request
            self._send_error(e)
        except RequestTimeout:  # in the body
            self.close_connection = True
            self._send_error(APIError(408, self._timeout_message(), code="request_timeout"))
        except (ConnectionError, TimeoutError):  # a failed write, ClientGone
            self.close_connection = True
            self._status = self._status or 499  # the client left
        except Exception:  # a bug of ours: the client gets a 500, the operator the traceback
            self.app.log(f"internal error on {method} {self.path}:\n{traceback.format_exc()}")
            self.close_connection = True
            self._send_error(APIError(500, "internal server error", code="internal_error"))
        finally:
            self._in_request = False
            self._log_line()

    def _route(self, method, path):
        app = self.app
        if not self._host_allowed():
            raise APIError(403, f"Host {self.headers.get('Host')!r} is not allowed: this server "
                                "answers loopback names only", code="host_not_allowed")
        if method == "OPTIONS":
            if not app.cors:
                raise APIError(405, "OPTIONS is only answered with --cors",
                               code="method_not_allowed")
            return self._send(204, b"", None)
        if path.startswith("/v1/"):
            self._authorize()
        routes = {"/v1/models": ("GET",), "/v1/completions": ("POST",),
                  "/v1/chat/completions": ("POST",)}
        if method not in ("GET", "POST"):
            raise APIError(405, f"{method} is not allowed here", code="method_not_allowed")
        if path.startswith("/v1/models/") and method == "GET":
            return self._send_json(200, app.service.get_model(path[len("/v1/models/"):]))
        if path in routes and method not in routes[path]:
            raise APIError(405, f"{method} is not allowed on {path} (use {routes[path][0]})",
                           code="method_not_allowed")
        if path == "/v1/models":
            return self._send_json(200, app.service.models())
        if path == "/v1/completions":
            request = app.service.completion_request(self._json_body())
            if request["stream"]:
                return self._send_events(app.service.stream_completions(request, self._stats))
            return self._send_json(200, app.service.completions(request, self._stats,
                                                                 self._client_gone))
        if path == "/v1/chat/completions":
            request = app.service.chat_request(self._json_body())
            if request["stream"]:
                return self._send_events(app.service.stream_chat_completions(request,
                                                                             self._stats))
            return self._send_json(200, app.service.chat_completions(request, self._stats,
                                                                      self._client_gone))
        if method == "GET" and path in app.page_files:
            return self._send_file(app.page_files[path])
        raise APIError(404, f"Invalid URL ({method} {path})", code="not_found")

    # --- checks

    def _host_allowed(self):
        if not self.app.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in LOOPBACK_NAMES

    def _authorize(self):
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key",
                           kind="authentication_error")

    def _json_body(self):
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self._read_body()  # read first: the connection stays usable after the error
        if kind != "application/json":
            raise APIError(415, "the body must be JSON, sent with Content-Type: "
                                "application/json", code="unsupported_media_type")
        return parse_json(body)

    def _has_body(self):
        length = (self.headers.get("Content-Length") or "0").strip()
        return length != "0" or "Transfer-Encoding" in self.headers

    def _read_body(self):
        """The request body, at most BODY_LIMIT bytes: refused from Content-Length before any of
        it is read, and counted chunk by chunk for a chunked body."""
        self._body_read = True  # from here on, any error closes the connection or reads it all
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            self.close_connection = True
            raise APIError(411, "a body needs a Content-Length (or chunked encoding)",
                           code="length_required")
        length = lengths.pop().strip()
        if lengths or not length.isdigit():
            self.close_connection = True
            raise APIError(400, "the Content-Length header is malformed")
        size = int(length)
        if size > BODY_LIMIT:
            self.close_connection = True  # the body is never read: this connection is done
            raise APIError(413, f"the body is {size:,} bytes, more than the {BODY_LIMIT:,} "
                                "a request can be", code="request_too_large")
        data = self.rfile.read(size)
        if len(data) < size:
            self.close_connection = True
            raise APIError(400, "the body is shorter than its Content-Length")
        return data

    def _read_chunked(self):
        self.close_connection = True  # errors leave the stream mid-chunk: never reuse it
        data = bytearray()
        while True:
            line = self.rfile.readline(64)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise APIError(400, "malformed chunked body") from None
            if size < 0:
                raise APIError(400, "malformed chunked body")
            if len(data) + size > BODY_LIMIT:
                raise APIError(413, f"the body is more than the {BODY_LIMIT:,} bytes a request "
                                    "can be", code="request_too_large")
            if size == 0:
                break
            chunk = self.rfile.read(size + 2)
            if len(chunk) < size + 2 or chunk[-2:] != b"\r\n":
                raise APIError(400, "malformed chunked body")
            data += chunk[:-2]
        for _ in range(100):  # trailers, up to the blank line
            if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                self.close_connection = False
                return bytes(data)
        raise APIError(400, "malformed chunked body (too many trailers)")

    # --- answers

    def _common_headers(self):
        if self.app.cors:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", self._allowed_headers())
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        if self.close_connection:
            self.send_header("Connection", "close")

    def _allowed_headers(self):
        """The request headers a browser may send: those its preflight asks for when each is a
        header name (OpenAI's JavaScript SDK adds its own X-Stainless-* headers to every call),
        else Authorization and Content-Type."""
        asked = (self.headers.get("Access-Control-Request-Headers") or "").strip()
        if len(asked) <= 1024 and _HEADER_LIST.fullmatch(asked):
            return asked
        return "Authorization, Content-Type"

    def _send(self, status, data, content_type, headers=()):
        self._status = status
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, data, "application/json", headers)

    def _send_error(self, error):
        headers = [("WWW-Authenticate", "Bearer")] if error.status == 401 else []
        try:
            self._send_json(error.status, error.body(), headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, an unknown
        method), in OpenAI's shape instead of an HTML page."""
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # a garbled request line: still answer with headers
        if not getattr(self, "_in_request", False):
            self._stats = Stats()
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_error(APIError(code, message or phrase, code=phrase.lower().replace(" ", "_")))
        if not getattr(self, "_in_request", False):
            self._log_line()

    def _send_file(self, path):
        data = files.read_bytes(path, PAGE_FILE_LIMIT, "page file")
        self._send(200, data, CONTENT_TYPES.get(path.suffix, "application/octet-stream"), [
            ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                        "style-src 'self' 'unsafe-inline'; img-src 'self' data:"),
        ])

    def _send_events(self, events):
        """Server-sent events, one `data: {json}` per chunk, then `data: [DONE]`. Before each
        chunk is computed the client's socket is checked; a client that left (or a failed
        write) closes `events`, which ends the generation and frees the model."""
        self._status = 200
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self._common_headers()
        self.end_headers()
        self.wfile.flush()

        def write(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        try:
            while True:
                if self._client_gone():
                    raise ClientGone("the client left")
                try:
                    event = next(events)
                except StopIteration:
                    break
                except APIError as e:  # mid-stream, the status is sent: an error event
                    write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
                    break
                except Exception:  # a bug of ours, after the 200: an error event, then the end
                    self.app.log(f"internal error streaming {self.path}:\n"
                                 f"{traceback.format_exc()}")
                    error = APIError(500, "internal server error", code="internal_error")
                    write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
                    break
                write(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8")
                      + b"\n\n")
            write(b"data: [DONE]\n\n")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, TimeoutError):  # ClientGone too
            self.close_connection = True
            self._status = 499  # nginx's "client closed request", for the log line
        finally:
            events.close()

    def _client_gone(self):
        """True when the client closed its end: its socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- logging

    def _log_line(self):
        seconds = time.monotonic() - getattr(self, "_started", time.monotonic())
        command = self.command or "-"
        path = urlsplit(self.path).path if getattr(self, "path", None) else "-"
        tokens = self._stats.tokens if getattr(self, "_stats", None) else 0
        self.app.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {command} "
                     f"{path} {self._status or '-'} {tokens} tokens {seconds:.3f} s")

    def log_message(self, format, *args):  # http.server's own lines: ours are above
        pass

    @property
    def app(self):
        return self.server.app


class _HTTPServer(ThreadingHTTPServer):
    """The standard library's threading server, one thread per connection, at most
    `max_connections` of them: beyond, a connection is answered 503 at once and closed."""

    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def server_activate(self):
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.app.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client_address[0]} - - 503 "
                         f"(more than {self.max_connections} connections)")
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """An exception that escaped a handler (a client that reset its connection): one line,
        not a traceback."""
        kind, error, _ = sys.exc_info()
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.app.log(f"error serving {client_address[0]}: {kind.__name__}: {error}")


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _busy_response():
    body = json.dumps(APIError(503, "the server has too many connections; try again",
                               code="too_many_connections").body()).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


_BUSY = _busy_response()


class Server:
    """`picogpt serve`'s server for one Model: `serve_forever()` from the command line, or
    `with Server(model, port=0) as s:` (a background thread) from tests and benchmarks; `s.url`
    is where it listens."""

    def __init__(self, model, name="model", host="127.0.0.1", port=8080, api_key=None,
                 cors=False, log=None, max_connections=MAX_CONNECTIONS,
                 request_timeout=REQUEST_TIMEOUT):
        self.service = Service(model, name)
        self.api_key = api_key or None
        self.cors = cors
        self.log = log or _stderr_line
        self.page_files = page_files()
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self.httpd = server_class((host, port), _Handler, bind_and_activate=False)
        self.httpd.app, self.httpd.max_connections = self, max_connections
        self.httpd.request_timeout = request_timeout
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except BaseException:
            self.httpd.server_close()
            raise
        self.host, self.port = host, self.httpd.server_address[1]
        self.loopback = is_loopback(host)
        self._thread = None

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self):
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="picogpt-serve")
        self._thread.start()
        return self

    def close(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def page_files():
    """URL path -> file for the page folder's own files (by name, listed once): the only files
    the server reads, so no request path ever reaches the file system."""
    out = {}
    if PAGE.is_dir():
        for p in sorted(PAGE.iterdir()):
            if p.is_file() and p.suffix in CONTENT_TYPES:
                out[f"/{p.name}"] = p
    if "/index.html" in out:
        out["/"] = out["/index.html"]
    return out


def is_loopback(host):
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stderr_line(line):
    print(line, file=sys.stderr, flush=True)
