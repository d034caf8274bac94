"""What the commands share: the parser that reports bad input on one line, the argument
validators, the model and sampling options, opening --model, checking --stop, and reading a text
file the user named."""

import argparse
import math
import os
import sys

from picogpt import files
from picogpt.errors import PicogptError, UnknownModelError
from picogpt.hub import download, sources

# gpt2/compact.py's DTYPES, written out: importing it would import NumPy before the command can
# catch Ctrl-C (tests/test_compact.py holds the two equal).
DTYPES = ("float32", "float16", "bfloat16", "int8")


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


def whole_number(text):
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


def positive_int(value):
    n = whole_number("must be at least 1")(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


_seed = whole_number("must be >= 0")


def _float(value):
    """A finite number (no nan, no inf)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return x


def in_range(low, high, low_open=False, high_open=False):
    """A validator for finite numbers in [low, high] (either end open, or None for no bound)."""
    def parse(value):
        x = _float(value)
        too_low = low is not None and (x <= low if low_open else x < low)
        too_high = high is not None and (x >= high if high_open else x > high)
        if too_low or too_high:  # (infinities are refused: no bound is said as one)
            if high is None:
                bound = f"{'>' if low_open else '>='} {low:g}"
            elif low is None:
                bound = f"{'<' if high_open else '<='} {high:g}"
            else:
                bound = (f"in {'(' if low_open else '['}{low:g}, {high:g}"
                         f"{')' if high_open else ']'}")  # fmt: skip
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return x
    return parse


def _temperature(value):
    t = _float(value)
    if t < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 picks the likeliest token), got {value}")
    return t


_top_p = in_range(0, 1, low_open=True)
_penalty = in_range(-2, 2)  # OpenAI's range for frequency and presence penalties


def int_in_range(low, high):
    """A validator for whole numbers in low..high."""
    def parse(value):
        n = whole_number(f"must be in {low}..{high}")(value)
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {n}")
        return n
    return parse
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


def add_download_options(p):
    """--base-url and --source, for every command that may download a GPT-2 size. Their
    environment variables are the defaults, checked like the options."""
    p.add_argument("--base-url", metavar="URL", type=_base_url,
                   default=os.environ.get("PICOGPT_BASE_URL") or None,
                   help="download from here instead of the source's own address "
                        "($PICOGPT_BASE_URL)")
    p.add_argument("--source", metavar="{openai,huggingface}", type=_source,
                   default=os.environ.get("PICOGPT_SOURCE") or None,
                   help="where GPT-2 sizes are downloaded from: OpenAI (the default) or the "
                        "HuggingFace hub ($PICOGPT_SOURCE)")


def add_weights_dir(p, help="where GPT-2 sizes are downloaded to"):
    """--weights-dir, its default said as hub.sources.weights_dir finds it."""
    p.add_argument("--weights-dir", metavar="DIR",
                   help=f"{help} (default $PICOGPT_WEIGHTS, else ./weights where it exists, else "
                        "~/.cache/picogpt)")


def add_model_options(p, default="124M"):
    p.add_argument("--model", "-m", default=default,
                   help=f"GPT-2 size, bundled model name or model folder (default {default})")
    add_weights_dir(p)
    add_download_options(p)
    add_threads_option(p)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="what the weights are kept in while running: float16 and bfloat16 "
                        "halve their memory, int8 quarters it, for a model that would not "
                        "fit otherwise; on a few cores each decodes slower than float32, "
                        "float16 most (default: the folder's own, float32 unless an HF folder "
                        "holds float16 or bfloat16)")


def add_threads_option(p):
    """--threads, for every command that runs a model."""
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads to compute on (default $PICOGPT_THREADS, else every core this "
                        "process may use)")


def apply_threads(args):
    """Set --threads, else check $PICOGPT_THREADS: a bad value is a usage error, said before any
    work starts."""
    from picogpt.gpt2 import parallel

    try:
        parallel.set_threads(args.threads)
        parallel.threads()
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_sampling_options(p, n, temperature=1.0, unit="sample"):
    p.add_argument("--n", type=whole_number("must be >= 0"), default=n, metavar="N",
                   help=f"tokens to generate (default {n})")
    p.add_argument("--temperature", "-t", type=_temperature, default=temperature, metavar="T",
                   help=f"randomness: 0 always picks the likeliest token (default {temperature})")
    p.add_argument("--top-k", type=whole_number("must be >= 0 (0 turns it off)"), default=40,
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


# --- models ---------------------------------------------------------------------------------------

def open_model(args):
    """--model as `picogpt.resolve` reads it (a folder, a GPT-2 size downloaded when missing, or a
    bundled model name), loaded; a name that names nothing is a usage error. On a terminal,
    stderr says what is loading while it loads: 1558M, or any model made compact, takes seconds."""
    from picogpt.generation.model import load_folder
    from picogpt.hub.resolve import resolve

    try:
        folder = resolve(args.model, args.weights_dir, getattr(args, "base_url", None),
                         source=getattr(args, "source", None))
    except UnknownModelError as e:
        raise UsageError(str(e)) from e
    terminal = sys.stderr.isatty()
    if terminal:
        sys.stderr.write(f"loading {folder}" + (f" as {args.dtype}" if args.dtype else "") + " ...")
        sys.stderr.flush()
    try:
        return load_folder(folder, args.dtype)
    finally:
        if terminal:
            sys.stderr.write("\r\x1b[K")  # the line erased: what follows starts clean
            sys.stderr.flush()


def sampling_options(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)


def check_stops(stops, reserved=()):
    """The --stop strings, checked as the API checks them (before any model is loaded)."""
    from picogpt.generation.stops import MAX_STOPS, check_stop

    try:
        return list(check_stop([*reserved, *stops]))[len(reserved):]
    except ValueError as e:
        if len(set([*reserved, *stops])) > MAX_STOPS and reserved:
            raise UsageError(f"--stop: at most {MAX_STOPS - len(reserved)} strings here (the "
                             f"reply's line end is one of the {MAX_STOPS})") from None
        raise UsageError(f"--stop: {e}") from None


def read_text_file(path, limit, what="file"):
    """A UTF-8 text file the user named, bounded; any problem is a usage error naming it."""
    try:
        return files.read_text(path, limit, what, error=UsageError)
    except UsageError as e:
        raise UsageError(str(e)) from None
