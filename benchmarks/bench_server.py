"""What `picogpt serve` costs over the Python API: tokens/s through the server against
`Model.complete` in this process, and the time to the first streamed token.

    python benchmarks/bench_server.py [--size 124M] [--runs 5] [--tokens 64] [--dir DIR]

Speed does not depend on the weights' values: the model has GPT-2's real shapes and vocabulary
with random weights (written once to DIR, as bench_generate.py does). The server runs as users run
it, `picogpt serve` in its own process; this process is its client (http.client, one kept-alive
connection) and, alternately, runs the same model through the API. Every run sends the same
prompt, so both sides reuse the prompt's KV cache the same way; greedy, batch 1, float32. A
warm-up round is not counted; the table gives medians.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_generate import make_model  # noqa: E402
from machine import describe, stream_rate  # noqa: E402

PROMPT = "The history of the city begins with a small settlement on the river, where"


def start_server(folder):
    """`picogpt serve` on a free port; (process, port)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "picogpt", "serve", "--model", str(folder),
                          "--port", "0"], env=env, stderr=subprocess.PIPE, text=True)
    banner = p.stderr.readline()
    if " at http://" not in banner:
        p.kill()
        raise RuntimeError(f"picogpt serve did not start: {banner}{p.stderr.read()}")
    port = int(banner.split(" at http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return p, port


def body(tokens, stream):
    return json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "stream": stream}).encode()


def post(conn, data):
    conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
    return conn.getresponse()


def server_complete(conn, tokens):
    """(tokens/s, tokens) of one non-streaming request, timed at the client."""
    t = time.perf_counter()
    r = post(conn, body(tokens, False))
    out = json.loads(r.read())
    seconds = time.perf_counter() - t
    n = out["usage"]["completion_tokens"]
    return n / seconds, n


def server_stream(conn, tokens):
    """(tokens/s, seconds to the first token, tokens) of one streamed request."""
    t = time.perf_counter()
    r = post(conn, body(tokens, True))
    first, n = None, 0
    while True:
        line = r.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data: "):
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"]:
                first = first or time.perf_counter() - t
            n += 1 if choice["finish_reason"] is None else 0
    r.read()
    return n / (time.perf_counter() - t), first, n


def api_complete(model, tokens):
    t = time.perf_counter()
    out = model.complete(PROMPT, tokens, temperature=0)
    return len(out.tokens) / (time.perf_counter() - t), len(out.tokens)


def api_stream(model, tokens):
    t = time.perf_counter()
    first, n = None, 0
    for chunk in model.stream_completion(PROMPT, tokens, temperature=0):
        if chunk.text:
            first = first or time.perf_counter() - t
        n += len(chunk.tokens)
    return n / (time.perf_counter() - t), first, n


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="124M", choices=("124M", "355M", "774M", "1558M"),
                    help="GPT-2 size whose shapes the random model has")
    ap.add_argument("--runs", type=int, default=5, help="alternating runs of each way")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated a run")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "picogpt-bench",
                    help="where the random model lives (kept)")
    args = ap.parse_args()

    import picogpt

    folder = args.dir / f"random-{args.size}"
    make_model(folder, args.size, with_hf=False)
    print(describe())
    model = picogpt.load(folder)
    proc, port = start_server(folder)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    rows = {"API complete()": [], "API stream_completion()": [],
            "server /v1/completions": [], "server, stream: true": []}
    firsts = {"API stream_completion()": [], "server, stream: true": []}
    counts = set()
    try:
        for run in range(args.runs + 1):  # round 0 warms both up and is not counted
            results = {
                "API complete()": api_complete(model, args.tokens),
                "server /v1/completions": server_complete(conn, args.tokens),
                "API stream_completion()": api_stream(model, args.tokens),
                "server, stream: true": server_stream(conn, args.tokens),
            }
            if run == 0:
                continue
            for name, result in results.items():
                rows[name].append(result[0])
                counts.add(result[-1])
                if name in firsts:
                    firsts[name].append(result[1])
    finally:
        conn.close()
        proc.terminate()
        proc.wait(30)
    api = statistics.median(rows["API complete()"])
    print(f"\nGPT-2 {args.size} shapes, random weights; prompt {len(model.encode(PROMPT))} tokens, "
          f"{args.tokens} new (greedy), median of {args.runs} runs; tokens generated "
          f"{sorted(counts)}; memory stream rate now {stream_rate():.0f} GB/s\n")
    print(f"| {'path':<26} | tokens/s | vs API complete() | first token |")
    print(f"|{'-' * 28}|---------:|------------------:|------------:|")
    for name, rates in rows.items():
        rate = statistics.median(rates)
        first = f"{1000 * statistics.median(firsts[name]):.0f} ms" if name in firsts else "-"
        print(f"| {name:<26} | {rate:8.1f} | {rate / api:17.3f} | {first:>11} |")


if __name__ == "__main__":
    main()
