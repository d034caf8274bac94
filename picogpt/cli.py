"""The picogpt command line: generate (the default), chat, download, eval, serve, train.

Bad input gets a one-line message and exit status 2; failures that are not the user's typing
(no network, a corrupt download) exit 1; Ctrl-C exits 130. Never a traceback for either.
"""

import argparse
import math
import sys
import time
from pathlib import Path

from picogpt import download, files
from picogpt.errors import PicogptError, UnknownModelError

COMMANDS = ("generate", "chat", "download", "eval", "serve", "train")

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
  picogpt train input.txt --out my-model    train a character-level GPT (picogpt train --help)
  picogpt "ROMEO:" -m shakespeare-char      the bundled model trained on Tiny Shakespeare

models (--model): a GPT-2 size (124M, 355M, 774M, 1558M, or gpt2, gpt2-medium, gpt2-large,
gpt2-xl), a bundled model name (shakespeare-char), or the path of a model folder.

weights folder, where sizes are downloaded to and looked for: --weights-dir, else $PICOGPT_WEIGHTS,
else ./weights when it exists in the current directory, else ~/.cache/picogpt. A model lives in
<folder>/<size>/; files placed there by hand are used as they are. --base-url (or
$PICOGPT_BASE_URL) replaces OpenAI's download address.
"""

CHAT_PREAMBLE = (
    "The following is a conversation between a curious person and a friendly, knowledgeable "
    "assistant. The assistant answers in a sentence or two.\n\n"
    "User: Hi! Who are you?\n"
    "Assistant: Hello! I'm an assistant. Ask me anything and I'll do my best to help.\n"
)


class UsageError(PicogptError):
    """Bad input from the user: reported on one line, exit status 2."""


class Parser(argparse.ArgumentParser):
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


def _port(value):
    n = _whole_number("must be in [0, 65535]")(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535] (0: any free port), got {n}")
    return n


def _add_model_options(p, default="124M"):
    p.add_argument("--model", "-m", default=default,
                   help=f"GPT-2 size, bundled model name or model folder (default {default})")
    p.add_argument("--weights-dir", metavar="DIR", help="where GPT-2 sizes are downloaded to")
    p.add_argument("--base-url", metavar="URL", help="download from here instead of OpenAI")


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


def build_parser():
    parser = Parser(
        prog="picogpt",
        usage="picogpt [generate] PROMPT [options]\n"
              "       picogpt {chat,download,eval,serve,train} ...",
        description="GPT-2 in plain Python and NumPy: run OpenAI's checkpoints on a laptop CPU,\n"
                    "chat with them, evaluate them, or train a small model of your own.\n"
                    "Without a command, picogpt continues PROMPT (the `generate` command).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from picogpt import __version__

    parser.add_argument("--version", action="version", version=f"picogpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,download,eval,serve,train}",
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
                       description="Download OpenAI's files for a GPT-2 size (resumable), verify "
                                   "the checkpoint and keep it in the weights folder.",
                       epilog="example: picogpt download 355M --weights-dir ~/models")
    d.add_argument("size", metavar="SIZE", help="124M, 355M, 774M, 1558M (or gpt2, gpt2-medium, "
                                                "gpt2-large, gpt2-xl)")
    d.add_argument("--weights-dir", metavar="DIR", help="download into DIR/SIZE")
    d.add_argument("--base-url", metavar="URL", help="download from here instead of OpenAI")

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

    # Listed here for --help; the real `train` parser is built by picogpt.train, imported only
    # when training is asked for (it is the only command that needs it).
    sub.add_parser("train", prog="picogpt train", help="train a character-level GPT on a text file",
                   add_help=False, description="see picogpt train --help")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerant_stdout()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `picogpt ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 0


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
               "serve": _serve}
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
    from picogpt import loading

    try:
        return loading.load(args.model, args.weights_dir, getattr(args, "base_url", None))
    except UnknownModelError as e:
        raise UsageError(str(e)) from e


def _sampling(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


# --- generate -------------------------------------------------------------------------------------

PROMPT_LIMIT = 16 * files.MB  # far more than any context holds
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
    model = _open_model(args)
    out = sys.stdout
    for k in range(args.samples):
        if args.samples > 1:
            out.write(f"{'' if k == 0 else chr(10)}--- sample {k + 1} of {args.samples} ---\n")
        if not args.no_echo:
            out.write(prompt)
        out.flush()
        seed = None if args.seed is None else args.seed + k
        text = prompt
        try:
            for piece in model.stream(prompt, n=args.n, seed=seed, **_sampling(args)):
                out.write(piece)
                out.flush()  # each piece as it comes: this is the point of streaming
                text += piece
        except ValueError as e:  # e.g. a prompt longer than the context, unknown characters
            raise UsageError(str(e)) from None
        if text and not text.endswith("\n"):
            out.write("\n")
        out.flush()
    return 0


# --- chat -----------------------------------------------------------------------------------------

class Conversation:
    """The chat prompt: preamble + the turns so far + the new message, kept within the context.

    Each turn the whole conversation is handed to the model, which reuses its KV cache for the
    longest prefix it has already seen, so only the new message and the reply cost compute. The
    prefix stays put (the preamble, then turns that are only ever appended), except when the
    context is full and the oldest turns are dropped."""

    def __init__(self, model, reply_tokens, preamble=CHAT_PREAMBLE):
        self.model = model
        try:
            model.encode(preamble)
        except ValueError:  # a character-level model that never saw some of its characters
            preamble = ""
        self.preamble = preamble
        self.turns = []  # (message, reply) pairs, reply as generated (with its leading space)
        self.budget = model.hparams["n_ctx"] - reply_tokens  # prompt tokens we can afford

    def prompt(self, message):
        current = f"User: {message}\nAssistant:"
        while True:
            history = "".join(f"User: {m}\nAssistant:{r}\n" for m, r in self.turns)
            text = self.preamble + history + current
            if len(self.model.encode(text)) <= self.budget:
                return text
            if self.turns:
                self.turns.pop(0)  # forget the oldest turn
            elif self.preamble:
                self.preamble = ""  # a tiny context: even the preamble does not fit
            else:
                return self._keep_end(current)

    def _keep_end(self, text):
        """The longest end of `text` that fits the budget (a very long message)."""
        ids = self.model.encode(text)[-max(self.budget, 1):]
        text = self.model.decode(ids)
        while len(self.model.encode(text)) > self.budget and text:
            text = text[1:]
        return text

    def add(self, message, reply):
        self.turns.append((message, reply))


def _chat(args):
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
    name = "gpt2" if download.canonical_size(args.model) else Path(args.model).name
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
            line = sys.stdin.readline()
            if not line:  # end of input
                return 0
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
        reply = _reply(model, prompt, out, n=args.n, seed=seed, **_sampling(args))
        chat.add(message, reply)
        turn += 1


def _reply(model, prompt, out, **options):
    """Stream the model's turn to `out`, stopping where it ends its line; return it as generated."""
    reply = ""
    stream = model.stream(prompt, **options)
    try:
        for piece in stream:
            end = piece.find("\n")  # the reply ends with its line: the next turn is the user's
            if end >= 0:
                piece = piece[:end]
            out.write(piece.lstrip() if not reply.strip() else piece)
            out.flush()
            reply += piece
            if end >= 0:
                break
    finally:
        stream.close()
    out.write("\n" if reply.strip() else "...\n")
    out.flush()
    return reply


# --- download -------------------------------------------------------------------------------------

def _download(args):
    size = download.canonical_size(args.size)
    if size is None:
        raise UsageError(f"unknown GPT-2 size {args.size!r}: expected one of "
                         f"{', '.join(download.SIZES)} (or {', '.join(download.ALIASES)})")
    folder = download.download(size, args.weights_dir, args.base_url)
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
    import os

    from picogpt import server

    api_key = args.api_key if args.api_key is not None else os.environ.get("PICOGPT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    model = _open_model(args)
    size = download.canonical_size(args.model)  # a GPT-2 size goes by its usual name: gpt2, ...
    names = {v: k for k, v in download.ALIASES.items()}
    name = names[size] if size else Path(args.model).name
    try:
        s = server.Server(model, name, args.host, args.port, api_key, args.cors)
    except OSError as e:
        raise PicogptError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    if not s.loopback and api_key is None:
        print(f"picogpt serve: warning: listening on {args.host} without --api-key: anyone who "
              "can reach this address can use the model", file=sys.stderr)
    print(f"picogpt serve: {name} at {s.url}/ (the page) and {s.url}/v1 (OpenAI's API); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        s.serve_forever()
    finally:
        s.close()
    return 0


# --- train ----------------------------------------------------------------------------------------

def _train(argv):
    try:
        from picogpt import train
    except ImportError as e:
        print(f"picogpt: error: training is not available ({e})", file=sys.stderr)
        return 1
    parser = Parser(prog="picogpt train",
                    description="Train a character-level GPT on a text file; the result is a "
                                "model folder that --model accepts.")
    train.add_arguments(parser)
    args = parser.parse_args(argv)
    return train.run(args)


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
