"""`picogpt train TEXT --out DIR`: train or fine-tune a GPT on a text file, with its options
(each checked by a validator that also checks a resumed run's train_config.json), its progress
line and its messages. picogpt.training is imported only when training is asked for."""

import argparse
import json
import sys
import time

from picogpt.cli.arguments import (
    Parser,
    UsageError,
    add_download_options,
    add_threads_option,
    add_weights_dir,
    apply_threads,
    in_range,
    positive_int,
    whole_number,
)
from picogpt.errors import PicogptError, UnknownModelError


def add_parser(sub):
    # Listed here for --help; the real `train` parser is built by run below, which imports
    # picogpt.training only when training is asked for (the only command that needs it).
    sub.add_parser("train", prog="picogpt train", help="train or fine-tune a GPT on a text file",
                   add_help=False, description="see picogpt train --help")


TRAIN_DESCRIPTION = """\
Train a GPT (GPT-2's architecture, backpropagation in NumPy) on a text file, from
scratch or from a model's weights (--init: fine-tuning). The first 90% of the text's
tokens train, the last 10% validate; or, with --data DIR instead of a text, nanoGPT's
DIR/train.bin and DIR/val.bin (its prepare.py's GPT-2 token ids, memory-mapped).
The model with the best validation loss is saved to --out, a model folder that
`picogpt --model DIR` and picogpt.load(DIR) use like GPT-2. From scratch the vocabulary
is the text's characters (or GPT-2's, --tokenizer gpt2) and the defaults are nanoGPT's
CPU recipe for Tiny Shakespeare (about a minute here); with --init, the model's
vocabulary and architecture, and nanoGPT's fine-tuning recipe."""

TRAIN_EPILOG = """\
examples:
  picogpt train tinyshakespeare.txt --out weights/shakespeare
  picogpt --model weights/shakespeare "ROMEO:" --n 200
  picogpt train tinyshakespeare.txt --out weights/shakespeare --resume --max-iters 4000
  picogpt train tinyshakespeare.txt --out weights/bpe --tokenizer gpt2
  picogpt train tinyshakespeare.txt --out weights/gpt2-shakespeare --init 124M
  picogpt train --data nanoGPT/data/openwebtext --out weights/owt --tokenizer gpt2

fine-tuning defaults (--init): --batch-size 1 --grad-accum 32 --max-iters 20 --lr 3e-5
(constant: --min-lr follows --lr) --warmup-iters 0 --dropout 0 --beta2 0.95
--eval-interval 5 --eval-iters 40, --block-size the model's context.

the folder: hparams.json, the tokenizer (chars.json, or encoder.json and vocab.bpe),
train_config.json, the TF checkpoint (best model), train_log.jsonl (every evaluation),
resume/ (the latest parameters and optimizer state, for --resume) and train_files.json
(what picogpt wrote: it replaces or deletes nothing else, and trains only into a new or
empty folder or one it made). Saves are atomic: a kill at any moment leaves the last good
model. GPT-2's tokenization is cached in <weights folder>/tokens; a text over 1 GB is
tokenized there, on every core, into a token file like nanoGPT's train.bin."""

_probability = in_range(0, 1, high_open=True)
_nonnegative = in_range(0, None)

# Every numeric training option: its group, the configuration key, its validator (which also
# checks a resumed run's train_config.json), metavar and help. Defaults: training DEFAULTS.
TRAIN_OPTIONS = (
    ("model", "n_layer", positive_int, "N", "transformer blocks"),
    ("model", "n_head", positive_int, "N", "attention heads"),
    ("model", "n_embd", positive_int, "N", "embedding width"),
    ("model", "block_size", positive_int, "N", "context length in tokens"),
    ("training", "batch_size", positive_int, "N", "windows per micro-batch"),
    ("training", "grad_accum", positive_int, "N", "micro-batches per step (their mean gradient)"),
    ("training", "max_iters", whole_number("must be >= 0"), "N", "optimizer steps in all"),
    ("training", "lr", _nonnegative, "LR", "peak learning rate"),
    ("training", "min_lr", _nonnegative, "LR", "final learning rate"),
    ("training", "warmup_iters", whole_number("must be >= 0"), "N", "linear warmup steps"),
    ("training", "lr_decay_iters", whole_number("must be >= 0"), "N",
     "cosine decay reaches --min-lr here"),
    ("training", "dropout", _probability, "P", "dropout probability"),
    ("training", "weight_decay", _nonnegative, "W", "AdamW weight decay, matrices only"),
    ("training", "beta1", _probability, "B", "AdamW's beta1"),
    ("training", "beta2", _probability, "B", "AdamW's beta2"),
    ("training", "grad_clip", _nonnegative, "NORM", "clip the gradient's norm; 0: off"),
    ("training", "eval_interval", positive_int, "N", "evaluate and save every N steps"),
    ("training", "eval_iters", positive_int, "N", "batches per loss estimate"),
    ("training", "log_interval", positive_int, "N", "steps per progress line (not on a terminal)"),
    ("training", "seed", whole_number("must be >= 0"), "S", "initialisation, batches and dropout"),
)  # fmt: skip


def _add_train_arguments(parser, defaults):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description, parser.epilog = TRAIN_DESCRIPTION, TRAIN_EPILOG
    parser.add_argument("text", metavar="TEXT", nargs="?",
                        help="a UTF-8 text file to learn from (or --data)")
    parser.add_argument("--data", metavar="DIR",
                        help="instead of TEXT: a folder of nanoGPT's train.bin and val.bin (raw "
                             "uint16 token ids, no header), with --tokenizer gpt2 (the default "
                             "here) or --init's tokenizer")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the model in DIR from its last saved state")
    parser.add_argument("--init", metavar="MODEL",
                        help="fine-tune: start from MODEL's weights, tokenizer and architecture "
                             "(anything --model takes: a GPT-2 size, a bundled model, a folder)")
    parser.add_argument("--tokenizer", metavar="NAME",
                        help="from scratch: chars (the text's characters, the default), or gpt2 "
                             "(GPT-2's 50,257 tokens, shipped with picogpt: no download; the "
                             "default with --data), or any model whose tokenizer to use")
    add_weights_dir(parser, "where GPT-2 sizes are downloaded to, and tokenized texts cached")
    add_download_options(parser)
    add_threads_option(parser)
    groups = {"model": parser.add_argument_group("model (fixed once training starts)"),
              "training": parser.add_argument_group(
                  "training (--resume keeps the saved values unless given)")}  # fmt: skip
    for group, key, kind, metavar, text in TRAIN_OPTIONS:
        default = "--max-iters" if defaults[key] is None else defaults[key]
        groups[group].add_argument(f"--{key.replace('_', '-')}", dest=key, metavar=metavar,
                                   type=kind, help=f"{text} ({default})")


def _check_source(parser, args):
    """TEXT or --data, one of them; --data's ids need a tokenizer of tokens (no --tokenizer is
    GPT-2's there: training.prepare decides the default)."""
    if (args.text is None) == (args.data is None):
        parser.error("give a text file (TEXT) or --data DIR, one of them")
    if args.data is not None and args.tokenizer == "chars":
        parser.error("--data holds token ids, not characters: --tokenizer gpt2 (the default "
                     "with --data) or a model's tokenizer")


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


def run(argv):
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
    try:
        apply_threads(args)
    except UsageError as e:
        parser.error(str(e))
    if args.init is not None and args.resume:
        parser.error("--init starts a run and --resume continues one: give one of them")
    if args.init is not None and args.tokenizer is not None:
        parser.error("--init uses its model's tokenizer: --tokenizer goes with a run from scratch")
    _check_source(parser, args)
    options = {key: getattr(args, key) for key in DEFAULTS}
    progress = _TokenizeProgress(args.text)
    try:
        plan = prepare(args.text, args.out, options, resume=args.resume, init=args.init,
                       tokenizer=args.tokenizer, data=args.data, weights_dir=args.weights_dir,
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
    if plan.resume and trainer.iter >= config["max_iters"]:
        start += (f", which is --max-iters {config['max_iters']} or more: nothing to train "
                  "(a larger --max-iters goes on)")  # fmt: skip
    print(f"{n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB), a vocabulary of "
          f"{plan.tokenizer.n_vocab:,} {unit}, {len(plan.data[0]):,} training and "
          f"{len(plan.data[1]):,} validation {unit}; about {plan.memory / 1e9:.1f} GB of "
          f"memory{start}")  # fmt: skip
    status = _TrainStatus(sys.stdout, config["log_interval"])
    try:
        loop.train(trainer, plan.data, report=status.report, status=status.update,
                   resumed=plan.resume, busy=status.busy)  # fmt: skip
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
    except BrokenPipeError:  # `picogpt train ... | head`: the reader left, as for every command
        raise
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

    out = shlex.quote(str(trainer.out))
    text = shlex.quote(str(args.text)) if args.data is None else f"--data {shlex.quote(args.data)}"
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
    """Tokenizing a large text with GPT-2's BPE (or checking a large token file) takes a while:
    a line on stderr, redrawn on a terminal, for more than 4 M characters (bytes, tokens)."""

    def __init__(self, path):
        self.path, self.shown, self.active = path, 0.0, False
        self.tty = sys.stderr.isatty()
        self.t0, self.what = time.monotonic(), None

    def __call__(self, done, total, what=None, unit="characters"):
        if total < 4 << 20:
            return
        now = time.monotonic()
        if what != self.what:  # a new phase (reading, then tokenizing): its own time and rate
            self.t0, self.what = now, what
        if not self.tty and done < total and now - self.shown < 10:
            return
        if self.tty and done < total and now - self.shown < 0.1:
            return
        self.shown, self.active = now, True
        rate = f", {done / 1e6 / (now - self.t0):.1f} MB/s" if unit == "bytes" and now > self.t0 \
            else ""  # fmt: skip
        line = (f"{what or f'tokenizing {self.path}'}: {done / total:.0%} of {total / 1e6:,.1f}M "
                f"{unit}, {_duration(now - self.t0)}{rate}")  # fmt: skip
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

    def update(self, it, max_iters, loss, ms, eta):
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

    def busy(self, what):
        """On a terminal, what the run is doing between steps (an evaluation, a save)."""
        if self.tty:
            self.stream.write("\r" + f"{what}..."[: self.width - 1] + "\x1b[K")
            self.stream.flush()
            self.shown = 0.0  # the next step redraws its line at once

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
