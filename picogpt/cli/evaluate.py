"""`picogpt eval FILE`: cross-entropy, perplexity and bits per byte of a text under a model."""

import sys
import time

from picogpt import files
from picogpt.cli.arguments import (
    UsageError,
    add_model_options,
    open_model,
    positive_int,
    read_text_file,
)
from picogpt.errors import PicogptError


def add_parser(sub):
    e = sub.add_parser(
        "eval", prog="picogpt eval", help="measure how well a model predicts a text file",
        description="Cross-entropy (nats per token), perplexity and bits per byte of FILE. Long "
                    "files are scored with a sliding window: each window scores STRIDE new tokens "
                    "with the rest of the window as context.",
        epilog="example: picogpt eval essay.txt --model 355M",
    )
    e.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    e.add_argument("--stride", type=positive_int, default=None, metavar="S",
                   help="tokens scored per window (default half the context)")
    add_model_options(e)


EVAL_LIMIT = 256 * files.MB  # minutes of tokenizing; larger texts are better sampled


def run(args):
    text = read_text_file(args.file, EVAL_LIMIT)
    model = open_model(args)
    progress = _EvalProgress() if sys.stderr.isatty() else None
    try:
        score = model.log_likelihood(text, stride=args.stride, progress=progress)
    except PicogptError:  # the model failed (damaged weights): not the user's typing
        raise
    except ValueError as e:  # characters a char-level model has never seen; a text too short
        raise UsageError(f"{args.file}: {e}") from None
    if progress:
        progress.close()
    # The bytes are the scored tokens': a character model never scores its first character.
    print(f"file:          {args.file} ({score.tokens} tokens scored, {score.n_bytes} bytes; "
          f"window {score.window}, stride {score.stride})")
    print(f"model:         {args.model} ({model.gpt.dtype})")
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
