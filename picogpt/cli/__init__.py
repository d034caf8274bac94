"""The picogpt command line: generate (the default), chat, download, eval, serve, train,
export, verify. One module per command (each with its `add_parser` and `run`); arguments.py holds
what they share.

Bad input gets a one-line message and exit status 2; failures that are not the user's typing
(no network, a corrupt download) exit 1; Ctrl-C exits 130. Never a traceback for either.
"""

import argparse
import sys

from picogpt.cli import chat, download, evaluate, export, generate, serve, train, verify
from picogpt.cli.arguments import Parser, UsageError, apply_threads
from picogpt.errors import PicogptError

COMMANDS = ("generate", "chat", "download", "eval", "serve", "train", "export", "verify")

EXAMPLES = """\
examples:
  picogpt "Once upon a time" --n 40        continue a prompt with GPT-2 124M (fetched once)
  picogpt "The meaning of life is" --model 355M --temperature 0.8 --top-p 0.9 --seed 1
  cat notes.txt | picogpt - --n 100         the prompt from stdin
  picogpt generate chat                     a prompt that is also a command name
  picogpt chat                              talk with GPT-2 (Ctrl-D to leave)
  picogpt download 774M                     fetch a model ahead of time
  picogpt eval essay.txt                    cross-entropy, perplexity, bits per byte
  picogpt serve                             OpenAI's API and a page at http://127.0.0.1:8080/
  picogpt train input.txt --out my-model    train a GPT on a text (picogpt train --help)
  picogpt "ROMEO:" -m shakespeare-char      the bundled model trained on Tiny Shakespeare
  picogpt export my-model my-model-hf       a model folder for transformers (HuggingFace's layout)
  picogpt verify 124M                       check a model's weights against their checksums

models (--model): a GPT-2 size (124M, 355M, 774M, 1558M, or gpt2, gpt2-medium, gpt2-large,
gpt2-xl), a bundled model name (shakespeare-char), or the path of a model folder, in OpenAI's
layout (hparams.json, a TF checkpoint) or HuggingFace's (config.json, model.safetensors; a hub
cache snapshot works as it is).

weights folder, where sizes are downloaded to and looked for: --weights-dir, else $PICOGPT_WEIGHTS,
else ./weights when it exists in the current directory, else ~/.cache/picogpt. A model lives in
<folder>/<size>/; files placed there by hand are used as they are. --source huggingface (or
$PICOGPT_SOURCE) fetches sizes from the HuggingFace hub instead of OpenAI; --base-url (or
$PICOGPT_BASE_URL) replaces the download address.
"""


def build_parser():
    parser = Parser(
        prog="picogpt",
        usage="picogpt [generate] PROMPT [options]\n"
              "       picogpt {chat,download,eval,serve,train,export,verify} ...",
        description="GPT-2 in plain Python and NumPy: run OpenAI's checkpoints on a laptop CPU,\n"
                    "chat with them, evaluate them, or train a small model of your own.\n"
                    "Without a command, picogpt continues PROMPT (the `generate` command).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from picogpt import __version__

    parser.add_argument("--version", action="version", version=f"picogpt {__version__}")
    sub = parser.add_subparsers(dest="command",
                                metavar="{generate,chat,download,eval,serve,train,export,verify}",
                                parser_class=Parser)

    g = generate.add_parser(sub)
    # `picogpt --help` is where people look for --n and friends: show generate's options there.
    options = g.format_help().split("\npositional arguments:", 1)[-1]
    options = options.replace("  -h, --help            show this help message and exit\n", "")
    parser.epilog = f"{EXAMPLES}\ngenerate (picogpt [generate] PROMPT ...):{options}"
    for command in (chat, download, evaluate, serve, export, train, verify):
        command.add_parser(sub)
    parser.commands = sub.choices  # name -> the command's parser
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerant_stdout()
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:  # a full device under stdout fails here, not at exit
                sys.stdout.flush()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `picogpt ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 0
    except OSError as e:  # `picogpt ... > /dev/full`: errors about files are PicogptErrors
        _silence_stdout()  # else Python's own flush at exit fails again, with a traceback
        where = e.filename or "cannot write the output"
        print(f"picogpt: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1


def _main(argv):
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] == "train":
        return train.run(argv[1:])
    if argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["generate", *argv]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser: its --help lists what it takes
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    command = {"generate": generate.run, "chat": chat.run, "download": download.run,
               "eval": evaluate.run, "serve": serve.run, "export": export.run,
               "verify": verify.run}
    try:
        if hasattr(args, "threads"):
            apply_threads(args)
        return command[args.command](args)
    except UsageError as e:
        print(f"picogpt: error: {e}", file=sys.stderr)
        return 2
    except PicogptError as e:  # no network, a damaged or foreign model folder, ...
        print(f"picogpt: {e}", file=sys.stderr)
        return 1


# --- terminal -------------------------------------------------------------------------------------

def _tolerant_stdout():
    """Never crash on a character the terminal's encoding cannot show (GPT-2 emits any Unicode)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def _silence_stdout():
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
