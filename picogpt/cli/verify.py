"""`picogpt verify MODEL`: check a model's weights now (hub/verify.py does the work), one line per
weights file saying how it was checked; a file that fails is the error, naming it (and, for a
CRC32C, the tensor)."""

from picogpt.cli.arguments import UsageError, add_download_options, add_weights_dir
from picogpt.errors import UnknownModelError
from picogpt.hub import verify
from picogpt.hub.resolve import resolve


def add_parser(sub):
    v = sub.add_parser(
        "verify", prog="picogpt verify", help="check a model's weights against their checksums",
        description="Check MODEL's weights now: in OpenAI's layout every tensor's CRC32C, in "
                    "HuggingFace's the sha256 the hub announced where it is known (a download "
                    "from the hub, a hub cache's blob), and the file's structure otherwise. "
                    "Loading a model does this once, the first time; a file that changes is "
                    "checked again.",
        epilog="example: picogpt verify 124M")
    v.add_argument("model", metavar="MODEL",
                   help="GPT-2 size, bundled model name or model folder")
    add_weights_dir(v)
    add_download_options(v)


def run(args):
    try:
        folder = resolve(args.model, args.weights_dir, args.base_url, args.source)
    except UnknownModelError as e:
        raise UsageError(str(e)) from e
    for checked in verify.check(folder):
        print(f"{checked.path}: {checked.said}")
    print(f"{folder}: the weights are intact")
    return 0
