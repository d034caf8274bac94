"""`picogpt export MODEL OUT`: write any model in HuggingFace's or OpenAI's layout (hub/export.py
does the work)."""

import sys
from pathlib import Path

from picogpt.cli.arguments import UsageError, add_download_options, add_weights_dir
from picogpt.errors import OutputExistsError, UnknownModelError


def add_parser(sub):
    from picogpt.hub import export

    x = sub.add_parser(
        "export", prog="picogpt export", help="write a model in HuggingFace's or OpenAI's layout",
        description="Write MODEL (anything --model takes) to OUT, a new folder: in HuggingFace's "
                    "layout (config.json, model.safetensors, vocab.json + merges.txt: "
                    "transformers' from_pretrained(OUT) loads it) or OpenAI's (hparams.json, a "
                    "TensorFlow checkpoint, encoder.json + vocab.bpe). OUT must not exist or be "
                    "empty: export never overwrites files.",
        epilog="example: picogpt export 124M gpt2-hf --dtype float16",
    )
    x.add_argument("model", metavar="MODEL", help="GPT-2 size, bundled model name or model folder")
    x.add_argument("out", metavar="OUT", help="the new folder to write")
    x.add_argument("--format", choices=export.FORMATS, default="hf",
                   help="hf: HuggingFace's layout (default); openai: OpenAI's")
    x.add_argument("--dtype", choices=export.DTYPES, default="float32",
                   help="the weights' type (default float32; float16 and bfloat16 halve the size, "
                        "hf only)")
    add_weights_dir(x)
    add_download_options(x)


def run(args):
    from picogpt.hub import export
    from picogpt.hub.resolve import resolve

    if args.format == "openai" and args.dtype != "float32":
        raise UsageError("--format openai writes float32 weights (as OpenAI published GPT-2)")
    out = Path(args.out).expanduser()
    try:
        export.check_new_folder(out)
        folder = resolve(args.model, args.weights_dir, args.base_url, args.source)
    except (UnknownModelError, OutputExistsError) as e:
        raise UsageError(str(e)) from e
    export.export(folder, out, args.format, args.dtype)
    layout = "HuggingFace's" if args.format == "hf" else "OpenAI's"
    print(f"{args.model} written to {out} in {layout} layout ({args.dtype})", file=sys.stderr)
    return 0
