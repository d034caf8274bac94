"""How fast picogpt's pure-Python GPT-2 tokenizer is, next to tiktoken (Rust), on the same text.

    flock /tmp/picogpt-bench.lock python benchmarks/bench_bpe.py [TEXT] [--vocab DIR] [--repeat N]
    python benchmarks/bench_bpe.py [TEXT] --stream MB [--workers N]

TEXT defaults to ../shared/data/tinyshakespeare.txt (relative to the repo root); DIR to the
GPT-2 vocabulary picogpt ships. Every picogpt encode runs on a freshly
loaded tokenizer, so its piece cache starts empty ("cold"); the warm figure re-encodes with the
cache filled. Runs of the two tokenizers alternate, and the median is reported, so that load
from other processes hits both alike. The ids must be identical, or the benchmark fails.

--stream MB: a text too large to hold, as `picogpt train` tokenizes it (training/token_files.py:
one streaming pass over worker processes into a token file), against tiktoken's
encode_ordinary_batch over the same pieces on as many threads. The text is MB megabytes of TEXT's
lines shuffled with a seed, each copy in another order (one text repeated would flatter both
tokenizers' caches more). Each side runs in its own process; its peak memory is the largest sum
of its processes' resident sets, sampled every 20 ms. picogpt's time is its whole pass (the
text's sha256, reading, tokenizing, writing the token file); tiktoken's the
encode_ordinary_batch call alone (the text read and cut beforehand).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiktoken_encoding(folder):
    """tiktoken's GPT-2 encoding, built from the local files (tiktoken cannot download here)."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in printable]
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(shifted)})
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    special = {"<|endoftext|>": encoder.pop("<|endoftext|>")}
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in encoder.items()}
    return tiktoken.Encoding(
        name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=special
    )


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


# --- --stream: a text too large to hold ----------------------------------------------------------


def shuffled_text(source, path, megabytes, seed=1):
    """`megabytes` MB of `source`'s lines, each copy of them in another seeded order."""
    lines = Path(source).read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            rng.shuffle(lines)
            block = "".join(lines)
            f.write(block)
            written += len(block.encode("utf-8"))
    return written


def tree_rss(pid):
    """Resident bytes of process `pid` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                todo += map(int, Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (OSError, IndexError):
            continue
    return total


def run_sampled(command):
    """(seconds, peak resident bytes of the process tree, stdout) of `command`."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        sys.exit(f"{command[2:4]} failed ({proc.returncode})")
    return seconds, peak[0], out


def stream_child(side, path, vocab, workers, out):
    """One side of --stream, in its own process: the ids into `out` (raw uint16)."""
    import numpy as np

    if side == "picogpt":
        from picogpt.tokenizers.bpe import BPE
        from picogpt.training import token_files
        from picogpt.training.data import vocabulary_files

        bpe = BPE.load(vocab)
        start = time.perf_counter()
        ids = token_files.tokenize_file(path, bpe, Path(out).parent / "cache",
                                        vocabulary_files(bpe, vocab), None, workers)
        print(time.perf_counter() - start)
        np.asarray(ids).tofile(out)
        return
    from picogpt.training import data

    text = Path(path).read_text(encoding="utf-8")
    pieces = [text[a:b] for a, b in data._bpe_chunks(text)]
    del text
    encoding = tiktoken_encoding(Path(vocab))
    start = time.perf_counter()
    batch = encoding.encode_ordinary_batch(pieces, num_threads=workers)
    print(time.perf_counter() - start)
    np.concatenate([np.array(ids, np.uint16) for ids in batch]).tofile(out)


def stream(args, vocab):
    import numpy as np

    workers = args.workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        n_bytes = shuffled_text(args.text, path, args.stream)
        results = {}
        for side in ("picogpt", "tiktoken"):
            out = Path(tmp) / f"{side}.ids"
            command = [sys.executable, __file__, "--stream-child", side, str(path), "--vocab",
                       str(vocab), "--workers", str(workers), "--out", str(out)]
            _, peak, inner = run_sampled(command)
            results[side] = (float(inner), peak, np.fromfile(out, np.uint16))
        same = np.array_equal(results["picogpt"][2], results["tiktoken"][2])
    print(f"text: {n_bytes / 1e6:,.1f} MB of {args.text}'s lines shuffled (seed 1), "
          f"{len(results['picogpt'][2]):,} tokens, {workers} workers")
    for side, (seconds, peak, _) in results.items():
        print(f"{side:9} {n_bytes / seconds / 1e6:7.2f} MB/s  {seconds:7.1f} s  "
              f"peak RSS {peak / 1e6:8.1f} MB")
    print(f"ids identical to tiktoken: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default=REPO / "../shared/data/tinyshakespeare.txt",
                        help="the text to encode (default ../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--vocab", help="folder with encoder.json and vocab.bpe")
    parser.add_argument("--repeat", type=int, default=5, help="timed encodings; the best counts")
    parser.add_argument("--stream", type=float, metavar="MB",
                        help="tokenize MB megabytes of shuffled lines as a stream (see above)")
    parser.add_argument("--workers", type=int, help="--stream's processes (threads for "
                        "tiktoken); default: the usable cores")
    parser.add_argument("--stream-child", choices=("picogpt", "tiktoken"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vocab:
        vocab = Path(args.vocab)
    else:
        from picogpt.tokenizers import GPT2_VOCABULARY

        vocab = Path(GPT2_VOCABULARY)
    if args.stream_child:
        return stream_child(args.stream_child, args.text, vocab, args.workers, args.out)
    if not Path(args.text).is_file():
        sys.exit(f"text file not found: {args.text} (pass the path of a UTF-8 text file)")
    if args.stream:
        return stream(args, vocab)
    text = Path(args.text).read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))

    import_time, bpe = timed(lambda: __import__("picogpt.tokenizers.bpe", fromlist=["BPE"]))
    BPE = bpe.BPE
    load_times = [timed(BPE.load, vocab)[0] for _ in range(args.repeat)]
    reference = tiktoken_encoding(vocab)

    cold, warm, ref_times = [], [], []
    for _ in range(args.repeat):
        tokenizer = BPE.load(vocab)
        seconds, ids = timed(tokenizer.encode, text)
        cold.append(seconds)
        warm.append(timed(tokenizer.encode, text)[0])
        seconds, expected = timed(reference.encode_ordinary, text)
        ref_times.append(seconds)
        if ids != expected:
            first = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
            sys.exit(f"MISMATCH: picogpt and tiktoken ids differ (first at token {first})")
    decode_times = [timed(tokenizer.decode, ids)[0] for _ in range(args.repeat)]
    ref_decode_times = [timed(reference.decode, ids)[0] for _ in range(args.repeat)]
    assert tokenizer.decode(ids) == text

    def mb_s(times):
        return n_bytes / statistics.median(times) / 1e6

    print(f"text: {args.text} ({n_bytes:,} bytes, {len(ids):,} tokens); vocab: {vocab}")
    print(f"import tokenizers.bpe       {import_time * 1e3:7.1f} ms")
    print(f"BPE.load                    {statistics.median(load_times) * 1e3:7.1f} ms (median)")
    print(f"encode  picogpt, cold cache {mb_s(cold):7.2f} MB/s  {statistics.median(cold):.3f} s")
    print(f"encode  picogpt, warm cache {mb_s(warm):7.2f} MB/s  {statistics.median(warm):.3f} s")
    print(f"encode  tiktoken            {mb_s(ref_times):7.2f} MB/s  "
          f"{statistics.median(ref_times):.3f} s")
    print(f"ratio picogpt/tiktoken      {mb_s(cold) / mb_s(ref_times):7.2f} x (cold), "
          f"{mb_s(warm) / mb_s(ref_times):.2f} x (warm)")
    print(f"decode  picogpt             {mb_s(decode_times):7.1f} MB/s")
    print(f"decode  tiktoken            {mb_s(ref_decode_times):7.1f} MB/s")
    print("ids identical to tiktoken: yes")


if __name__ == "__main__":
    main()
