"""`picogpt chat`: a conversation with the model, one message a line, each reply streamed until
the model ends its turn."""

import contextlib
import sys
from pathlib import Path

from picogpt import files
from picogpt.cli.arguments import (
    UsageError,
    add_model_options,
    add_sampling_options,
    check_stops,
    open_model,
    sampling_options,
)
from picogpt.generation.chat import REPLY_STOP, Conversation
from picogpt.hub import sources


def add_parser(sub):
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
    add_sampling_options(c, n=60, temperature=0.7, unit="turn")
    add_model_options(c)


MESSAGE_LIMIT = files.MB  # bytes of one chat message read from piped stdin
NOT_UTF8 = "(cannot read that message: it is not UTF-8 text)"


def run(args):
    stop = check_stops(args.stop, reserved=(REPLY_STOP,))
    model = open_model(args)
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
            except UnicodeDecodeError:  # a terminal whose encoding is not UTF-8
                print(NOT_UTF8, file=sys.stderr)
                continue
        else:
            raw = sys.stdin.buffer.readline(MESSAGE_LIMIT + 1)  # bounded: stdin may be /dev/zero
            if not raw:  # end of input
                return 0
            if len(raw) > MESSAGE_LIMIT:
                raise UsageError(f"a message on stdin longer than {MESSAGE_LIMIT:,} bytes")
            line = raw.decode("utf-8", "surrogateescape")  # a bad byte is said below, not fatal
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
            message.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError:
            out.write(NOT_UTF8 + "\n")
            out.flush()
            continue
        try:
            prompt = chat.prompt(message)
        except ValueError as e:  # characters a char-level model does not know: say, go on
            out.write(f"(cannot read that message: {e})\n")
            out.flush()
            continue
        out.write(f"{name}> ")
        out.flush()
        seed = None if args.seed is None else args.seed + turn
        reply = _reply(model, prompt, out, stop=stop, n=args.n, seed=seed, **sampling_options(args))
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
