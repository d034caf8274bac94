"""`picogpt [generate] PROMPT`: continue a prompt, streamed, or with --logprobs each token's
probability and its likeliest alternatives (shaded on a terminal, a table when piped)."""

import json
import math
import os
import sys

from picogpt import files
from picogpt.cli.arguments import (
    UsageError,
    add_model_options,
    add_sampling_options,
    check_stops,
    int_in_range,
    open_model,
    positive_int,
    read_text_file,
    sampling_options,
)
from picogpt.errors import PicogptError


def add_parser(sub):
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
    g.add_argument("--samples", type=positive_int, default=1, metavar="K",
                   help="how many continuations to write (default 1)")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    g.add_argument("--logprobs", type=_logprobs, default=None, metavar="K",
                   help="show each token's probability and its K likeliest alternatives "
                        "(0..20): shaded on a terminal, a tab-separated table when piped")
    add_sampling_options(g, n=40)
    add_model_options(g)
    return g

_logprobs = int_in_range(0, 20)


PROMPT_LIMIT = 16 * files.MB  # far more than any context holds


def _read_prompt(args):
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("give either PROMPT or --prompt-file, not both")
        return read_text_file(args.prompt_file, PROMPT_LIMIT, "prompt file")
    if args.prompt is None:
        raise UsageError("give a PROMPT to continue (or - to read it from stdin)")
    if args.prompt == "-":
        data = sys.stdin.buffer.read(PROMPT_LIMIT + 1)
        if len(data) > PROMPT_LIMIT:
            raise UsageError(f"the prompt on stdin is more than {PROMPT_LIMIT // files.MB} MB")
        return files.decode_utf8(data, "stdin", "the prompt", error=UsageError)
    return args.prompt


def run(args):
    prompt = _read_prompt(args)
    stop = check_stops(args.stop)
    model = open_model(args)
    out = sys.stdout
    terminal = out.isatty()
    for k in range(args.samples):
        seed = None if args.seed is None else args.seed + k
        options = dict(n=args.n, seed=seed, stop=stop, **sampling_options(args))
        try:
            if args.logprobs is not None:
                _write_logprobs(model, prompt, out, k, args, terminal, options)
            else:
                _write_sample(model, prompt, out, k, args, options)
        except PicogptError:  # the model failed (damaged weights): not the user's typing
            raise
        except ValueError as e:  # e.g. a prompt longer than the context, unknown characters
            raise UsageError(str(e)) from None
    return 0


def _write_sample(model, prompt, out, k, args, options):
    """One continuation, streamed after the prompt (unless --no-echo)."""
    pieces = model.stream(prompt, **options)  # checks the prompt: nothing is written if it fails
    if args.samples > 1:
        out.write(f"{'' if k == 0 else chr(10)}--- sample {k + 1} of {args.samples} ---\n")
    if not args.no_echo:
        out.write(prompt)
    out.flush()
    text = prompt
    for piece in pieces:
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
    chunks = model.stream_completion(prompt, logprobs=args.logprobs, **options)  # checked first
    if terminal:
        if args.samples > 1:
            out.write(f"{'' if k == 0 else chr(10)}--- sample {k + 1} of {args.samples} ---\n")
        if not args.no_echo:
            out.write(prompt)
        out.flush()
    elif k == 0:
        out.write("sample\tposition\ttoken\tprobability\talternatives\n")
    rows, pending, text = [], [], ""
    for chunk in chunks:
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
