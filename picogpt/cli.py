"""The picogpt command line: generate (the default), chat, download, eval, serve, train,
export.

Bad input gets a one-line message and exit status 2; failures that are not the user's typing
(no network, a corrupt download) exit 1; Ctrl-C exits 130. Never a traceback for either.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from picogpt import files
from picogpt.errors import OutputExistsError, PicogptError, UnknownModelError
from picogpt.generation.chat import REPLY_STOP, Conversation
from picogpt.hub import download, sources

COMMANDS = ("generate", "chat", "download", "eval", "serve", "train", "export")

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

class UsageError(PicogptError):
    """Bad input from the user: reported on one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def _print_message(self, message, file=None):  # argparse ignores a failed write: we do not
        if message:
            (file or sys.stderr).write(message)

    def error(self, message):  # one line instead of argparse's usage + error
        command = self.prog.replace(" [generate]", "")
        print(f"picogpt: error: {message} (see {command} --help)", file=sys.stderr)
        raise SystemExit(2)


def _whole_number(text):
    """A validator for integers >= 0; `text` says what is allowed, for the message."""
    def parse(value):
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"{text}, got {n}")
        return n
    return parse


def _positive_int(value):
    n = _whole_number("must be at least 1")(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


_seed = _whole_number("must be >= 0")


def _float(value):
    """A finite number (no nan, no inf)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return x


def _in_range(low, high, low_open=False, high_open=False):
    """A validator for finite numbers in [low, high] (either end open, or None for no bound)."""
    def parse(value):
        x = _float(value)
        too_low = low is not None and (x <= low if low_open else x < low)
        too_high = high is not None and (x >= high if high_open else x > high)
        if too_low or too_high:
            left = "-inf" if low is None else f"{low:g}"
            right = "inf" if high is None else f"{high:g}"
            interval = f"{'(' if low_open else '['}{left}, {right}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return x
    return parse


def _temperature(value):
    t = _float(value)
    if t < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 picks the likeliest token), got {value}")
    return t


_top_p = _in_range(0, 1, low_open=True)
_penalty = _in_range(-2, 2)  # OpenAI's range for frequency and presence penalties


def _int_in_range(low, high):
    """A validator for whole numbers in low..high."""
    def parse(value):
        n = _whole_number(f"must be in {low}..{high}")(value)
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {n}")
        return n
    return parse


_logprobs = _int_in_range(0, 20)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _stop(value):
    """A stop string as typed: \\n, \\t and \\\\ read as a newline, a tab and a backslash."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and value[i + 1 : i + 2] in _ESCAPES:
            out.append(_ESCAPES[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    if not out:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return "".join(out)


def _base_url(value):
    """An http(s) URL with a host and a valid port (what --base-url and $PICOGPT_BASE_URL
    replace the download address with)."""
    try:
        return sources.check_base_url(value)
    except download.DownloadError as e:
        raise argparse.ArgumentTypeError(f"{e} (--base-url or $PICOGPT_BASE_URL)") from None


def _source(value):
    if value not in sources.SOURCES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(sources.SOURCES)} "
                                         f"(--source or $PICOGPT_SOURCE), got {value!r}")
    return value


def _add_download_options(p):
    """--base-url and --source, for every command that may download a GPT-2 size. Their
    environment variables are the defaults, checked like the options."""
    p.add_argument("--base-url", metavar="URL", type=_base_url,
                   default=os.environ.get("PICOGPT_BASE_URL") or None,
                   help="download from here instead of the source's own address")
    p.add_argument("--source", metavar="{openai,huggingface}", type=_source,
                   default=os.environ.get("PICOGPT_SOURCE") or None,
                   help="where GPT-2 sizes are downloaded from: OpenAI (the default) or the "
                        "HuggingFace hub ($PICOGPT_SOURCE)")


def _port(value):
    n = _whole_number("must be in [0, 65535]")(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535] (0: any free port), got {n}")
    return n


def _add_model_options(p, default="124M"):
    p.add_argument("--model", "-m", default=default,
                   help=f"GPT-2 size, bundled model name or model folder (default {default})")
    p.add_argument("--weights-dir", metavar="DIR", help="where GPT-2 sizes are downloaded to")
    _add_download_options(p)


def _add_sampling_options(p, n, temperature=1.0, unit="sample"):
    p.add_argument("--n", type=_whole_number("must be >= 0"), default=n, metavar="N",
                   help=f"tokens to generate (default {n})")
    p.add_argument("--temperature", "-t", type=_temperature, default=temperature, metavar="T",
                   help=f"randomness: 0 always picks the likeliest token (default {temperature})")
    p.add_argument("--top-k", type=_whole_number("must be >= 0 (0 turns it off)"), default=40,
                   metavar="K", help="sample among the K likeliest tokens; 0: all (default 40)")
    p.add_argument("--top-p", type=_top_p, default=None, metavar="P",
                   help="nucleus sampling: the fewest tokens whose probability sums to P (0, 1]")
    p.add_argument("--seed", type=_seed, default=None, metavar="S",
                   help=f"make sampling repeatable ({unit} k uses seed S+k-1)")
    most = "up to 16" if unit == "sample" else "up to 15; a reply also ends at its line end"
    p.add_argument("--stop", type=_stop, action="append", default=[], metavar="STR",
                   help=f"end the text before STR (repeatable, {most}; \\n is a newline)")
    p.add_argument("--frequency-penalty", type=_penalty, default=0.0, metavar="F",
                   help="lower each token's logit by F per time it was generated: less "
                        "repetition ([-2, 2], default 0)")
    p.add_argument("--presence-penalty", type=_penalty, default=0.0, metavar="P",
                   help="lower the logit of every token generated so far by P: new topics "
                        "([-2, 2], default 0)")


def build_parser():
    parser = Parser(
        prog="picogpt",
        usage="picogpt [generate] PROMPT [options]\n"
              "       picogpt {chat,download,eval,serve,train,export} ...",
        description="GPT-2 in plain Python and NumPy: run OpenAI's checkpoints on a laptop CPU,\n"
                    "chat with them, evaluate them, or train a small model of your own.\n"
                    "Without a command, picogpt continues PROMPT (the `generate` command).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from picogpt import __version__

    parser.add_argument("--version", action="version", version=f"picogpt {__version__}")
    sub = parser.add_subparsers(dest="command",
                                metavar="{generate,chat,download,eval,serve,train,export}",
                                parser_class=Parser)

    g = sub.add_parser(
        "generate", prog="picogpt [generate]", help="continue a prompt (the default command)",
        description="Continue PROMPT, streaming the text to stdout as it is generated. The prompt "
                    "is printed first, then its continuation, so the output reads as one text "
                    "(--no-echo prints the continuation alone).",
        epilog='example: picogpt generate "Once upon a time" --n 40 --seed 1',
    )
    g.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="the text to continue; - reads it from stdin")
    g.add_argument("--prompt-file", "-f", metavar="FILE", help="read the prompt from FILE")
    g.add_argument("--samples", type=_positive_int, default=1, metavar="K",
                   help="how many continuations to write (default 1)")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    g.add_argument("--logprobs", type=_logprobs, default=None, metavar="K",
                   help="show each token's probability and its K likeliest alternatives "
                        "(0..20): shaded on a terminal, a tab-separated table when piped")
    _add_sampling_options(g, n=40)
    _add_model_options(g)
    # `picogpt --help` is where people look for --n and friends: show generate's options there.
    options = g.format_help().split("\npositional arguments:", 1)[-1]
    options = options.replace("  -h, --help            show this help message and exit\n", "")
    parser.epilog = f"{EXAMPLES}\ngenerate (picogpt [generate] PROMPT ...):{options}"

    c = sub.add_parser(
        "chat", prog="picogpt chat", help="talk with the model",
        description="A ChatGPT-like conversation backed by GPT-2: a short preamble and the "
                    "conversation so far are the prompt; the reply streams until the model ends "
                    "its turn. Only new tokens are computed each turn (the KV cache is kept); "
                    "when the context fills up the oldest turns are forgotten. Reads one message "
                    "per line, from the terminal or piped stdin; Ctrl-D (end of input) leaves, "
                    "/reset forgets the conversation.",
        epilog="example: printf 'Hello!\\nWhat is the capital of France?\\n' | picogpt chat",
    )
    _add_sampling_options(c, n=60, temperature=0.7, unit="turn")
    _add_model_options(c)

    d = sub.add_parser("download", prog="picogpt download", help="fetch a GPT-2 size ahead of time",
                       description="Download a GPT-2 size (resumable) from OpenAI, or with "
                                   "--source huggingface from the HuggingFace hub, verify it and "
                                   "keep it in the weights folder.",
                       epilog="example: picogpt download 355M --weights-dir ~/models")
    d.add_argument("size", metavar="SIZE", help="124M, 355M, 774M, 1558M (or gpt2, gpt2-medium, "
                                                "gpt2-large, gpt2-xl)")
    d.add_argument("--weights-dir", metavar="DIR", help="download into DIR/SIZE")
    _add_download_options(d)

    e = sub.add_parser(
        "eval", prog="picogpt eval", help="measure how well a model predicts a text file",
        description="Cross-entropy (nats per token), perplexity and bits per byte of FILE. Long "
                    "files are scored with a sliding window: each window scores STRIDE new tokens "
                    "with the rest of the window as context.",
        epilog="example: picogpt eval essay.txt --model 355M",
    )
    e.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    e.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                   help="tokens scored per window (default half the context)")
    _add_model_options(e)

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
    _add_model_options(v)

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
                   help="the weights' type (default float32; float16 halves the size, hf only)")
    x.add_argument("--weights-dir", metavar="DIR", help="where GPT-2 sizes are downloaded to")
    _add_download_options(x)

    # Listed here for --help; the real `train` parser is built by _train below, which imports
    # picogpt.training only when training is asked for (the only command that needs it).
    sub.add_parser("train", prog="picogpt train", help="train or fine-tune a GPT on a text file",
                   add_help=False, description="see picogpt train --help")
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
        return _train(argv[1:])
    if argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["generate", *argv]
    args = parser.parse_args(argv)
    command = {"generate": _generate, "chat": _chat, "download": _download, "eval": _eval,
               "serve": _serve, "export": _export}
    try:
        return command[args.command](args)
    except UsageError as e:
        print(f"picogpt: error: {e}", file=sys.stderr)
        return 2
    except PicogptError as e:  # no network, a damaged or foreign model folder, ...
        print(f"picogpt: {e}", file=sys.stderr)
        return 1


# --- models ---------------------------------------------------------------------------------------

def _open_model(args):
    """--model as `picogpt.resolve` reads it (a folder, a GPT-2 size downloaded when missing, or a
    bundled model name), loaded; a name that names nothing is a usage error."""
    from picogpt.generation.model import load

    try:
        return load(args.model, args.weights_dir, getattr(args, "base_url", None),
                            source=getattr(args, "source", None))
    except UnknownModelError as e:
        raise UsageError(str(e)) from e


def _sampling(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)


def _check_stops(stops, reserved=()):
    """The --stop strings, checked as the API checks them (before any model is loaded)."""
    from picogpt.generation.stops import MAX_STOPS, check_stop

    try:
        return list(check_stop([*reserved, *stops]))[len(reserved):]
    except ValueError as e:
        if len(set([*reserved, *stops])) > MAX_STOPS and reserved:
            raise UsageError(f"--stop: at most {MAX_STOPS - len(reserved)} strings here (the "
                             f"reply's line end is one of the {MAX_STOPS})") from None
        raise UsageError(f"--stop: {e}") from None


# --- generate -------------------------------------------------------------------------------------

PROMPT_LIMIT = 16 * files.MB  # far more than any context holds
MESSAGE_LIMIT = files.MB  # characters of one chat message read from stdin
EVAL_LIMIT = 256 * files.MB  # minutes of tokenizing; larger texts are better sampled


def _read_text_file(path, limit=EVAL_LIMIT, what="file"):
    """A UTF-8 text file the user named, bounded; any problem is a usage error naming it."""
    try:
        return files.read_text(path, limit, what, error=UsageError)
    except UsageError as e:
        raise UsageError(str(e)) from None


def _read_prompt(args):
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("give either PROMPT or --prompt-file, not both")
        return _read_text_file(args.prompt_file, PROMPT_LIMIT, "prompt file")
    if args.prompt is None:
        raise UsageError("give a PROMPT to continue (or - to read it from stdin)")
    if args.prompt == "-":
        data = sys.stdin.buffer.read(PROMPT_LIMIT + 1)
        if len(data) > PROMPT_LIMIT:
            raise UsageError(f"the prompt on stdin is more than {PROMPT_LIMIT // files.MB} MB")
        return files.decode_utf8(data, "stdin", "the prompt", error=UsageError)
    return args.prompt


def _generate(args):
    prompt = _read_prompt(args)
    stop = _check_stops(args.stop)
    model = _open_model(args)
    out = sys.stdout
    terminal = out.isatty()
    for k in range(args.samples):
        seed = None if args.seed is None else args.seed + k
        options = dict(n=args.n, seed=seed, stop=stop, **_sampling(args))
        try:
            if args.logprobs is not None:
                _write_logprobs(model, prompt, out, k, args, terminal, options)
            else:
                _write_sample(model, prompt, out, k, args, options)
        except ValueError as e:  # e.g. a prompt longer than the context, unknown characters
            raise UsageError(str(e)) from None
    return 0


def _write_sample(model, prompt, out, k, args, options):
    """One continuation, streamed after the prompt (unless --no-echo)."""
    if args.samples > 1:
        out.write(f"{'' if k == 0 else chr(10)}--- sample {k + 1} of {args.samples} ---\n")
    if not args.no_echo:
        out.write(prompt)
    out.flush()
    text = prompt
    for piece in model.stream(prompt, **options):
        out.write(piece)
        out.flush()  # each piece as it comes: this is the point of streaming
        text += piece
    if text and not text.endswith("\n"):
        out.write("\n")
    out.flush()


def _write_logprobs(model, prompt, out, k, args, terminal, options):
    """One continuation with --logprobs. On a terminal: the text streamed, each piece shaded by
    the probability of its least likely token, then a table of the tokens. Piped: the table
    alone, tab-separated (sample, position, token, probability, then K alternatives and theirs)."""
    color = terminal and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    if terminal:
        if args.samples > 1:
            out.write(f"{'' if k == 0 else chr(10)}--- sample {k + 1} of {args.samples} ---\n")
        if not args.no_echo:
            out.write(prompt)
        out.flush()
    elif k == 0:
        out.write("sample\tposition\ttoken\tprobability\talternatives\n")
    rows, pending, text = [], [], ""
    for chunk in model.stream_completion(prompt, logprobs=args.logprobs, **options):
        rows += zip(chunk.tokens, chunk.token_logprobs, chunk.top_logprobs)
        pending += chunk.token_logprobs
        if terminal and chunk.text:
            out.write(_shade(chunk.text, math.exp(min(pending, default=0.0)), color))
            out.flush()
            pending, text = [], text + chunk.text
    if terminal:
        out.write("\n" if text and not text.endswith("\n") else "")
        out.write(f"\n{'#':>4}  {'token':<16} {'prob':>7}  alternatives\n")
    for i, (token, lp, top) in enumerate(rows, 1):
        shown = _token_label(model.token_text(token))
        alternatives = [(_token_label(t), v) for t, v in top.items()]
        if terminal:
            cell = _shade(f"{shown:<16}", math.exp(lp), color)
            alts = "  ".join(_shade(f"{t} {_percent(v)}", math.exp(v), color)
                             for t, v in alternatives)
            out.write(f"{i:>4}  {cell} {_percent(lp):>7}  {alts}\n")
        else:
            cells = [str(k + 1), str(i), shown, _percent(lp)]
            cells += [f"{t}\t{_percent(v)}" for t, v in alternatives]
            out.write("\t".join(cells) + "\n")
    out.flush()


def _token_label(text):
    """A token as the table shows it: quoted with escapes, so spaces and newlines are seen."""
    return text if text.startswith("bytes:") else json.dumps(text, ensure_ascii=False)


def _percent(logprob):
    p = 100 * math.exp(logprob)
    return f"{p:.2f}%" if p >= 0.005 else f"{p:.0e}%"


# Background colours (xterm's 256) from unlikely to likely, black text on each.
_SHADES = ((0.8, 114), (0.5, 150), (0.3, 186), (0.1, 216), (0.03, 210), (0.0, 203))


def _shade(text, p, color):
    """`text` on a background that says how likely it was (each line apart: no colour bleeds
    past a line's end)."""
    if not color:
        return text
    code = next(c for limit, c in _SHADES if p >= limit)
    return "\n".join(f"\x1b[48;5;{code}m\x1b[38;5;16m{line}\x1b[0m" if line else ""
                     for line in text.split("\n"))


# --- chat -----------------------------------------------------------------------------------------

def _chat(args):
    stop = _check_stops(args.stop, reserved=(REPLY_STOP,))
    model = _open_model(args)
    n_ctx = model.hparams["n_ctx"]
    if args.n >= n_ctx:
        raise UsageError(f"--n {args.n} leaves no room for the conversation (context {n_ctx})")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"picogpt chat with {args.model}: type a message and press Enter. /reset forgets "
              "the conversation; Ctrl-D leaves.", file=sys.stderr)
    chat = Conversation(model, args.n)
    name = "gpt2" if sources.canonical_size(args.model) else Path(args.model).name
    out = sys.stdout
    turn = 0
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:  # Ctrl-D
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline(MESSAGE_LIMIT + 1)  # bounded: stdin may be /dev/zero
            if not line:  # end of input
                return 0
            if len(line) > MESSAGE_LIMIT:
                raise UsageError(f"a message on stdin longer than {MESSAGE_LIMIT:,} characters")
        message = line.strip()
        if not message:
            continue
        if message in ("/reset", "/quit", "/exit"):
            if message != "/reset":
                return 0
            chat = Conversation(model, args.n)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not interactive:  # show the exchange, so a piped session reads as a transcript
            out.write(f"you> {message}\n")
        try:
            prompt = chat.prompt(message)
        except ValueError as e:  # characters a char-level model does not know: say, go on
            out.write(f"(cannot read that message: {e})\n")
            out.flush()
            continue
        out.write(f"{name}> ")
        out.flush()
        seed = None if args.seed is None else args.seed + turn
        reply = _reply(model, prompt, out, stop=stop, n=args.n, seed=seed, **_sampling(args))
        chat.add(message, reply)
        turn += 1


def _reply(model, prompt, out, stop=(), **options):
    """Stream the model's turn to `out`, up to where it ends its line (or a `stop` string);
    return it as generated."""
    reply = ""
    with contextlib.closing(model.stream(prompt, stop=[REPLY_STOP, *stop], **options)) as stream:
        for piece in stream:
            out.write(piece.lstrip() if not reply.strip() else piece)
            out.flush()
            reply += piece
    out.write("\n" if reply.strip() else "...\n")
    out.flush()
    return reply


# --- download -------------------------------------------------------------------------------------

def _download(args):
    size = sources.canonical_size(args.size)
    if size is None:
        raise UsageError(f"unknown GPT-2 size {args.size!r}: expected one of "
                         f"{', '.join(download.SIZES)} (or {', '.join(sources.ALIASES)})")
    folder = download.download(size, args.weights_dir, args.base_url, source=args.source)
    print(f"GPT-2 {size} is ready in {folder}", file=sys.stderr)
    return 0


# --- eval -----------------------------------------------------------------------------------------

def _eval(args):
    text = _read_text_file(args.file)
    model = _open_model(args)
    progress = _EvalProgress() if sys.stderr.isatty() else None
    try:
        score = model.log_likelihood(text, stride=args.stride, progress=progress)
    except ValueError as e:  # characters a char-level model has never seen; a text too short
        raise UsageError(f"{args.file}: {e}") from None
    if progress:
        progress.close()
    print(f"file:          {args.file} ({score.n_bytes} bytes, {score.tokens} tokens scored; "
          f"window {score.window}, stride {score.stride})")
    print(f"model:         {args.model}")
    print(f"cross-entropy: {score.cross_entropy:.4f} nats/token")
    print(f"perplexity:    {score.perplexity:.4f}")
    print(f"bits per byte: {score.bits_per_byte:.4f}")
    return 0


class _EvalProgress:
    """The eval progress line, redrawn at most ten times a second."""

    def __init__(self):
        self.t0 = self.shown = time.monotonic()

    def __call__(self, done, total, nll):
        now = time.monotonic()
        if now - self.shown < 0.1 and done < total:
            return
        self.shown = now
        rate = done / max(now - self.t0, 1e-9)
        sys.stderr.write(f"\reval: {done}/{total} tokens  {nll / done:.4f} nats/token  "
                         f"{rate:.0f} tokens/s\x1b[K")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


# --- serve ----------------------------------------------------------------------------------------

def _serve(args):
    from picogpt.serve import transport as server

    api_key = args.api_key if args.api_key is not None else os.environ.get("PICOGPT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    model = _open_model(args)
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
    print(f"picogpt serve: {name} at {s.url}/ (the page) and {s.url}/v1 (OpenAI's API); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        s.serve_forever()
    finally:
        s.close()
    return 0


# --- export ---------------------------------------------------------------------------------------

def _export(args):
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


# --- train ----------------------------------------------------------------------------------------

TRAIN_DESCRIPTION = """\
Train a GPT (GPT-2's architecture, backpropagation in NumPy) on a text file, from
scratch or from a model's weights (--init: fine-tuning). The first 90% of the text's
tokens train, the last 10% validate. The model with the best validation loss is saved
to --out, a model folder that `picogpt --model DIR` and picogpt.load(DIR) use like GPT-2.
From scratch the vocabulary is the text's characters (or GPT-2's, --tokenizer gpt2) and
the defaults are nanoGPT's CPU recipe for Tiny Shakespeare (about a minute here); with
--init, the model's vocabulary and architecture, and nanoGPT's fine-tuning recipe."""

TRAIN_EPILOG = """\
examples:
  picogpt train tinyshakespeare.txt --out weights/shakespeare
  picogpt --model weights/shakespeare "ROMEO:" --n 200
  picogpt train tinyshakespeare.txt --out weights/shakespeare --resume --max-iters 4000
  picogpt train tinyshakespeare.txt --out weights/bpe --tokenizer gpt2
  picogpt train tinyshakespeare.txt --out weights/gpt2-shakespeare --init 124M

fine-tuning defaults (--init): --batch-size 1 --grad-accum 32 --max-iters 20 --lr 3e-5
(constant: --min-lr follows --lr) --warmup-iters 0 --dropout 0 --beta2 0.95
--eval-interval 5 --eval-iters 40, --block-size the model's context.

the folder: hparams.json, the tokenizer (chars.json, or encoder.json and vocab.bpe),
train_config.json, the TF checkpoint (best model), train_log.jsonl (every evaluation),
resume/ (the latest parameters and optimizer state, for --resume) and train_files.json
(what picogpt wrote: it replaces or deletes nothing else, and trains only into a new or
empty folder or one it made). Saves are atomic: a kill at any moment leaves the last good
model. GPT-2's tokenization is cached in <weights folder>/tokens."""

_probability = _in_range(0, 1, high_open=True)
_nonnegative = _in_range(0, None)

# Every numeric training option: its group, the configuration key, its validator (which also
# checks a resumed run's train_config.json), metavar and help. Defaults: training DEFAULTS.
TRAIN_OPTIONS = (
    ("model", "n_layer", _positive_int, "N", "transformer blocks"),
    ("model", "n_head", _positive_int, "N", "attention heads"),
    ("model", "n_embd", _positive_int, "N", "embedding width"),
    ("model", "block_size", _positive_int, "N", "context length in tokens"),
    ("training", "batch_size", _positive_int, "N", "windows per micro-batch"),
    ("training", "grad_accum", _positive_int, "N", "micro-batches per step (their mean gradient)"),
    ("training", "max_iters", _whole_number("must be >= 0"), "N", "optimizer steps in all"),
    ("training", "lr", _nonnegative, "LR", "peak learning rate"),
    ("training", "min_lr", _nonnegative, "LR", "final learning rate"),
    ("training", "warmup_iters", _whole_number("must be >= 0"), "N", "linear warmup steps"),
    ("training", "lr_decay_iters", _whole_number("must be >= 0"), "N",
     "cosine decay reaches --min-lr here"),
    ("training", "dropout", _probability, "P", "dropout probability"),
    ("training", "weight_decay", _nonnegative, "W", "AdamW weight decay, matrices only"),
    ("training", "beta1", _probability, "B", "AdamW's beta1"),
    ("training", "beta2", _probability, "B", "AdamW's beta2"),
    ("training", "grad_clip", _nonnegative, "NORM", "clip the gradient's norm; 0: off"),
    ("training", "eval_interval", _positive_int, "N", "evaluate and save every N steps"),
    ("training", "eval_iters", _positive_int, "N", "batches per loss estimate"),
    ("training", "log_interval", _positive_int, "N", "steps per progress line (not on a terminal)"),
    ("training", "seed", _seed, "S", "initialisation, batches and dropout"),
)  # fmt: skip


def _add_train_arguments(parser, defaults):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description, parser.epilog = TRAIN_DESCRIPTION, TRAIN_EPILOG
    parser.add_argument("text", metavar="TEXT", help="a UTF-8 text file to learn from")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the model in DIR from its last saved state")
    parser.add_argument("--init", metavar="MODEL",
                        help="fine-tune: start from MODEL's weights, tokenizer and architecture "
                             "(anything --model takes: a GPT-2 size, a bundled model, a folder)")
    parser.add_argument("--tokenizer", metavar="NAME", default="chars",
                        help="from scratch: chars (the text's characters, the default), or gpt2 "
                             "(GPT-2's 50,257 tokens), or any model whose tokenizer to use")
    parser.add_argument("--weights-dir", metavar="DIR",
                        help="where GPT-2 sizes are downloaded to (and tokenized texts cached)")
    _add_download_options(parser)
    groups = {"model": parser.add_argument_group("model (fixed once training starts)"),
              "training": parser.add_argument_group(
                  "training (--resume keeps the saved values unless given)")}  # fmt: skip
    for group, key, kind, metavar, text in TRAIN_OPTIONS:
        default = "--max-iters" if defaults[key] is None else defaults[key]
        groups[group].add_argument(f"--{key.replace('_', '-')}", dest=key, metavar=metavar,
                                   type=kind, help=f"{text} ({default})")


def _check_train_config(saved, path):
    """A resumed run's saved configuration, checked with the options' own validators: a JSON
    object whose options have values the options would accept (lr_decay_iters may be null)."""
    from picogpt.errors import TrainingError

    if not isinstance(saved, dict):
        raise TrainingError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    for _, key, kind, _, _ in TRAIN_OPTIONS:
        if key not in saved or (key == "lr_decay_iters" and saved[key] is None):
            continue  # a run saved before the option existed: the default
        value = saved[key]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise argparse.ArgumentTypeError(f"expected a number, got {json.dumps(value)[:40]}")
            kind(str(value))  # as the option would read it: 2.5 is not a whole number
        except argparse.ArgumentTypeError as e:
            raise TrainingError(f"{path}: {key}: {e}") from None


def _train(argv):
    try:
        from picogpt.training import loop
        from picogpt.training.config import DEFAULTS, command_line
        from picogpt.training.prepare import prepare
    except ImportError as e:
        print(f"picogpt: error: training is not available ({e})", file=sys.stderr)
        return 1
    from picogpt.errors import FileReadError, TrainingError

    parser = Parser(prog="picogpt train")
    _add_train_arguments(parser, DEFAULTS)
    args = parser.parse_args(argv)
    if args.init is not None and args.resume:
        parser.error("--init starts a run and --resume continues one: give one of them")
    if args.init is not None and args.tokenizer != "chars":
        parser.error("--init uses its model's tokenizer: --tokenizer goes with a run from scratch")
    options = {key: getattr(args, key) for key in DEFAULTS}
    progress = _TokenizeProgress(args.text)
    try:
        plan = prepare(args.text, args.out, options, resume=args.resume, init=args.init,
                       tokenizer=args.tokenizer, weights_dir=args.weights_dir,
                       base_url=args.base_url, check_saved=_check_train_config,
                       progress=progress, download_source=args.source)  # fmt: skip
        progress.close()
        config = plan.config
        config["command"] = command_line(args.text, args.out, config)
        trainer = loop.Trainer(config, plan.hparams, plan.tokenizer, plan.folder,
                               plan.vocabulary)  # fmt: skip
        if plan.resume:
            trainer.load_state()
        else:
            trainer.initialize(plan.init)
    except (TrainingError, UnknownModelError) as e:  # bad input: options, text, --out, --init
        progress.close()
        print(f"picogpt train: error: {e}", file=sys.stderr)
        return 2
    except PicogptError as e:  # a file that cannot be read, a download that failed
        progress.close()
        print(f"picogpt train: {'error: ' if isinstance(e, FileReadError) else ''}{e}",
              file=sys.stderr)  # fmt: skip
        return 1
    except OSError as e:  # --out cannot be written (read-only, full)
        progress.close()
        print(f"picogpt train: error: cannot write to {args.out}: {e.strerror or e}",
              file=sys.stderr)  # fmt: skip
        return 1
    if plan.notice:
        print(plan.notice, file=sys.stderr)
    unit = "characters" if "chars.json" in plan.vocabulary else "tokens"
    n_params = trainer.flat.size
    start = (f"; resuming at iter {trainer.iter}" if plan.resume
             else f"; fine-tuning {args.init}" if args.init else "")  # fmt: skip
    print(f"{n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB), a vocabulary of "
          f"{plan.tokenizer.n_vocab:,} {unit}, {len(plan.data[0]):,} training and "
          f"{len(plan.data[1]):,} validation {unit}; about {plan.memory / 1e9:.1f} GB of "
          f"memory{start}")  # fmt: skip
    status = _TrainStatus(sys.stdout, config["log_interval"])
    try:
        loop.train(trainer, plan.data, report=status.report, status=status.update,
                   resumed=plan.resume)  # fmt: skip
    except KeyboardInterrupt:
        status.report(f"interrupted at iter {trainer.iter}")
        _say_where(trainer, args, interrupted=True)
        return 130
    except MemoryError:
        status.end()
        print(f"picogpt train: error: out of memory at iter {trainer.iter} (about "
              f"{plan.memory / 1e9:.1f} GB were estimated)" + _still_there(trainer, args),
              file=sys.stderr)  # fmt: skip
        return 1
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        status.end()
        print(f"picogpt train: error: cannot save to {trainer.out}: {e.strerror or e}"
              + _still_there(trainer, args), file=sys.stderr)  # fmt: skip
        return 1
    _say_where(trainer, args)
    return 0


def _say_where(trainer, args, interrupted=False):
    """What the folder holds now, and the commands that use it."""
    import shlex

    out, text = shlex.quote(str(trainer.out)), shlex.quote(str(args.text))
    if trainer.saved_model is not None:
        print(f"best model (val loss {trainer.saved_model[1]:.4f}) in {out}; try: "
              f"picogpt --model {out} \"{_sample_prompt(trainer)}\" --n 200")
    if trainer.saved_iter is None:
        return
    if interrupted:
        print(f"picogpt train {text} --out {out} --resume   continues from iter "
              f"{trainer.saved_iter} (the last evaluation)")
    else:
        print(f"picogpt train {text} --out {out} --resume --max-iters N   trains it further")


def _still_there(trainer, args):
    """After a failed save: what the folder still holds, for the error line."""
    held = []
    if trainer.saved_model is not None:
        held.append(f"the model of val loss {trainer.saved_model[1]:.4f}")
    if trainer.saved_iter is not None:
        held.append(f"the state of iter {trainer.saved_iter}, which --resume continues")
    return f" ({trainer.out} still holds {' and '.join(held)})" if held else ""


def _sample_prompt(trainer):
    try:
        trainer.tokenizer.encode("ROMEO:")
        return "ROMEO:"
    except ValueError:
        return ""


class _TokenizeProgress:
    """Tokenizing a large text with GPT-2's BPE takes a while: a line on stderr, redrawn on a
    terminal, for texts of more than 4 MB."""

    def __init__(self, path):
        self.path, self.shown, self.active = path, 0.0, False
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def __call__(self, done, total):
        if total < 4 << 20:
            return
        now = time.monotonic()
        if not self.tty and done < total and now - self.shown < 10:
            return
        if self.tty and done < total and now - self.shown < 0.1:
            return
        self.shown, self.active = now, True
        line = (f"tokenizing {self.path}: {done / total:.0%} of {total / 1e6:.1f}M characters, "
                f"{_duration(now - self.t0)}")  # fmt: skip
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.active and self.tty:
            sys.stderr.write("\n")
        self.active = False


class _TrainStatus:
    """Progress: on a terminal one line redrawn at most ten times a second; otherwise a line
    every log_interval steps. Evaluation reports are always whole lines."""

    def __init__(self, stream, log_interval):
        import shutil

        self.stream, self.log_interval = stream, log_interval
        self.tty = stream.isatty()
        self.shown = 0.0
        self.width = shutil.get_terminal_size().columns if self.tty else 0

    def update(self, it, max_iters, loss, ms):
        eta = (max_iters - it) * ms / 1e3
        line = (f"iter {it}/{max_iters}  loss {loss:.4f}  {ms:.1f} ms/iter  "
                f"ETA {_duration(eta)}")  # fmt: skip
        if self.tty:
            now = time.monotonic()
            if now - self.shown >= 0.1 or it == max_iters:
                self.shown = now
                self.stream.write("\r" + line[: self.width - 1] + "\x1b[K")
                self.stream.flush()
        elif it % self.log_interval == 0:
            self.stream.write(line + "\n")
            self.stream.flush()

    def report(self, line):
        self.end()
        self.stream.write(line + "\n")
        self.stream.flush()

    def end(self):
        """Clear the redrawn line (before a message on another stream, too)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
