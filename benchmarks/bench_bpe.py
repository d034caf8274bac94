"""How fast picogpt's pure-Python GPT-2 tokenizer is, next to tiktoken (Rust), on the same text.

    flock /tmp/picogpt-bench.lock python benchmarks/bench_bpe.py [TEXT] [--vocab DIR] [--repeat N]

TEXT defaults to ../shared/data/tinyshakespeare.txt (relative to the repo root); DIR to the
GPT-2 vocabulary picogpt ships. Every picogpt encode runs on a freshly
loaded tokenizer, so its piece cache starts empty ("cold"); the warm figure re-encodes with the
cache filled. Runs of the two tokenizers alternate, and the median is reported, so that load
from other processes hits both alike. The ids must be identical, or the benchmark fails.
"""

import argparse
import json
import statistics
import sys
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", nargs="?", default=REPO / "../shared/data/tinyshakespeare.txt")
    parser.add_argument("--vocab", help="folder with encoder.json and vocab.bpe")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.vocab:
        vocab = Path(args.vocab)
    else:
        from picogpt.tokenizers import GPT2_VOCABULARY

        vocab = Path(GPT2_VOCABULARY)
    if not Path(args.text).is_file():
        sys.exit(f"text file not found: {args.text} (pass the path of a UTF-8 text file)")
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
