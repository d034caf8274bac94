"""`picogpt serve`: OpenAI's API and the page over HTTP (picogpt/serve/ does the work)."""

import argparse
import os
import sys
from pathlib import Path

from picogpt.cli.arguments import UsageError, add_model_options, open_model, whole_number
from picogpt.errors import PicogptError
from picogpt.hub import sources


def add_parser(sub):
    v = sub.add_parser(
        "serve", prog="picogpt serve", help="OpenAI's API and a page that shows the tokens",
        description="Serve the model over HTTP with OpenAI's API (GET /v1/models, POST "
                    "/v1/completions, POST /v1/chat/completions; streaming, logprobs, stop, "
                    "penalties, seed) and, at /, a page that streams text with each token shaded "
                    "by its probability. One generation runs at a time; the others wait in turn. "
                    "Binds 127.0.0.1 unless --host says otherwise; Ctrl-C stops.",
        epilog="example: picogpt serve --model shakespeare-char --port 8080, then open "
               "http://127.0.0.1:8080/ or point an OpenAI client at http://127.0.0.1:8080/v1",
    )
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0: any free)")
    v.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (default $PICOGPT_API_KEY, "
                        "else none)")
    v.add_argument("--cors", action="store_true",
                   help="let pages from other origins call the API (Access-Control-Allow-Origin)")
    add_model_options(v)


def _port(value):
    n = whole_number("must be in [0, 65535]")(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535] (0: any free port), got {n}")
    return n


def run(args):
    from picogpt.serve import transport as server

    api_key = args.api_key if args.api_key is not None else os.environ.get("PICOGPT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    model = open_model(args)
    size = sources.canonical_size(args.model)  # a GPT-2 size goes by its usual name: gpt2, ...
    names = {v: k for k, v in sources.ALIASES.items()}
    name = names[size] if size else Path(args.model).name
    if not server.is_loopback(args.host) and api_key is None:
        print(f"picogpt serve: warning: --host {args.host} without --api-key: anyone who can "
              "reach this address can use the model", file=sys.stderr)
    try:
        s = server.Server(model, name, args.host, args.port, api_key, args.cors)
    except OSError as e:
        raise PicogptError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    print(f"picogpt serve: {name} ({model.gpt.dtype}) at {s.url}/ (the page) and {s.url}/v1 "
          "(OpenAI's API); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        s.serve_forever()
    finally:
        s.close()
    return 0
