"""A real HTTP server on 127.0.0.1 that serves a model folder the way OpenAI's bucket does
(`/{size}/{file}`), with the faults downloads must survive: dropped connections, corrupted bytes,
error statuses, servers that ignore Range, slow links. It records every request it sees."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ModelServer:
    def __init__(self, folder, size="124M", extra_files=None):
        self.files = {f"/{size}/{p.name}": p.read_bytes() for p in Path(folder).iterdir()
                      if p.is_file()}
        for name, data in (extra_files or {}).items():
            self.files[f"/{size}/{name}"] = data
        self.size = size
        self.requests = []  # (path, Range header or None), in arrival order
        self.faults = {}  # file name -> list of one-shot faults, used in order
        self.always = {}  # file name -> a fault applied to every request
        self.ignore_range = False
        self.bytes_per_second = None  # throttle, to make transfers overlap in time
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    # Faults: ("status", 500) answers with that status; ("drop", n) sends the headers of the whole
    # answer but only n body bytes, then closes; ("corrupt", offset) flips a bit of that byte.
    def add_fault(self, name, *faults):
        with self._lock:
            self.faults.setdefault(name, []).extend(faults)

    def requests_for(self, name):
        return [r for r in self.requests if r[0] == f"/{self.size}/{name}"]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

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
                data = server.files.get(self.path)
                if data is None:
                    return self._empty(404)
                fault = server._next_fault(self.path.rsplit("/", 1)[1])
                if fault and fault[0] == "status":
                    return self._empty(fault[1])
                if fault and fault[0] == "corrupt":
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
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault and fault[0] == "drop":
                    self.wfile.write(body[: fault[1]])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
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

            def _empty(self, status):
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
