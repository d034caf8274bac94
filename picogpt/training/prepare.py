"""Preparing a run: the text, the options, the tokenizer or the model to start from, the run
folder and the memory, all checked before anything is written; the result is a `Plan`."""

from pathlib import Path
from typing import NamedTuple, Optional

from picogpt import files
from picogpt.errors import ModelError, PicogptError, TrainingError
from picogpt.gpt2.memory import physical_memory
from picogpt.training.config import ARCHITECTURE, make_config
from picogpt.training.data import encode, read_text, split_data, vocabulary_files
from picogpt.training.memory import estimate_memory
from picogpt.training.run_folder import RunFolder


class Plan(NamedTuple):
    """A run ready to start: what `prepare` found and checked."""

    config: dict
    hparams: dict
    tokenizer: object
    vocabulary: dict  # the tokenizer's files for the folder: name -> bytes
    data: tuple  # (training ids, validation ids)
    folder: RunFolder
    resume: bool  # continue from the folder's saved state
    init: Optional[dict]  # the parameters of --init's model, or None for a random start
    notice: Optional[str]  # something to tell the user before training (starting over, ...)
    memory: int  # bytes the run is estimated to need at its peak


def prepare(text_path, out, options, *, resume=False, init=None, tokenizer="chars",
            weights_dir=None, base_url=None, check_saved=None, progress=None,
            download_source=None):
    """Check everything that can be wrong before any training: the text, the options, --out,
    the memory it needs. `init` and `tokenizer` are model names as --model takes them
    (hub.resolve; a GPT-2 size is downloaded from `download_source`); `check_saved(config,
    path)` validates a resumed run's saved configuration; `progress(done, total)` hears how
    tokenizing goes. Nothing is written until all is checked."""
    from picogpt.formats import openai
    from picogpt.hub import sources
    from picogpt.hub.folder import read_folder, read_tokenizer
    from picogpt.hub.resolve import resolve, resolve_tokenizer

    text = read_text(text_path)
    out = Path(out)
    notice, saved, init_params, source = None, None, None, None
    if resume:
        if not out.is_dir():
            raise TrainingError(f"{out}: nothing to resume (no such folder)")
        folder = RunFolder.open(out)
        if folder.has_state():
            config_path = out / "train_config.json"
            saved = files.load_json(config_path, 1 << 20, "train_config.json",
                                    error=TrainingError)  # fmt: skip
            if check_saved is not None:
                check_saved(saved, config_path)
            try:
                hparams = openai.read_hparams(out)
                tok = openai.read_tokenizer(out)
            except (PicogptError, OSError, ValueError) as e:
                raise TrainingError(f"{out}: cannot resume: {e}") from e
            source = out
            config = make_config(options, saved)
            config.update({k: saved.get(k) for k in ("init", "tokenizer")})
        else:
            notice = (f"{out} holds no complete training state to resume (its first save never "
                      "finished): starting over")
            resume = False
    else:
        folder = RunFolder.for_new_run(out)
    if not resume:
        if init is not None:
            source = resolve(init, weights_dir, base_url, download_source)
            hparams, tok, init_params = read_folder(source)
            config = make_config(options, init_hparams=hparams)
            hparams = dict(hparams)
        else:
            if tokenizer == "chars":
                from picogpt.tokenizers.chars import CharTokenizer

                tok = CharTokenizer.from_text(text)
            else:
                source = resolve_tokenizer(tokenizer, weights_dir, base_url, download_source)
                try:  # a model folder in either layout, or one holding just a tokenizer
                    tok = read_tokenizer(source)
                except (OSError, ValueError) as e:  # a folder without (or with a bad) tokenizer
                    raise ModelError(f"--tokenizer {tokenizer}: {e}") from e
            config = make_config(options)
            hparams = {"n_vocab": tok.n_vocab, "n_ctx": config["block_size"],
                       **{k: config[k] for k in ARCHITECTURE}}  # fmt: skip
        config.update(init=None if init is None else str(init),
                      tokenizer=None if init is not None else str(tokenizer))
    vocabulary = vocabulary_files(tok, source)
    cache_dir = sources.weights_dir(weights_dir) / "tokens"
    try:
        ids = encode(text, tok, cache_dir, vocabulary, progress)
    except ValueError as e:  # characters a character-level vocabulary does not have
        raise TrainingError(f"{text_path}: {e}") from None
    train_data, val_data = split_data(ids)
    need = config["block_size"] + 1
    unit = "characters" if "chars.json" in vocabulary else "tokens"
    for name, split in (("first 90%", train_data), ("last 10%", val_data)):
        if len(split) < need:
            raise TrainingError(
                f"{text_path} is too short for --block-size {config['block_size']}: its {name} "
                f"({len(split):,} {unit}) must hold a window of {need}")
    memory = estimate_memory(hparams, config)
    ram = physical_memory()
    if ram is not None and memory > ram:
        raise TrainingError(
            f"this run needs about {memory / 1e9:.1f} GB of memory, more than this machine's "
            f"{ram / 1e9:.1f} GB: try a smaller --batch-size or --block-size")
    folder.begin()
    return Plan(config, hparams, tok, vocabulary, (train_data, val_data), folder, resume,
                init_params, notice, memory)  # fmt: skip
