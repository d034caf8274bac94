"""`picogpt download SIZE`: fetch a GPT-2 size ahead of time (hub/download.py does the work)."""

import sys

from picogpt.cli.arguments import UsageError, add_download_options, add_weights_dir
from picogpt.hub import download, sources


def add_parser(sub):
    d = sub.add_parser("download", prog="picogpt download", help="fetch a GPT-2 size ahead of time",
                       description="Download a GPT-2 size (resumable) from OpenAI, or with "
                                   "--source huggingface from the HuggingFace hub, verify it and "
                                   "keep it in the weights folder.",
                       epilog="example: picogpt download 355M --weights-dir ~/models")
    d.add_argument("size", metavar="SIZE", help="124M, 355M, 774M, 1558M (or gpt2, gpt2-medium, "
                                                "gpt2-large, gpt2-xl)")
    add_weights_dir(d, "download into DIR/SIZE")
    add_download_options(d)


def run(args):
    size = sources.canonical_size(args.size)
    if size is None:
        raise UsageError(f"unknown GPT-2 size {args.size!r}: expected one of "
                         f"{', '.join(download.SIZES)} (or {', '.join(sources.ALIASES)})")
    folder = download.download(size, args.weights_dir, args.base_url, source=args.source)
    print(f"GPT-2 {size} is ready in {folder}", file=sys.stderr)
    return 0
