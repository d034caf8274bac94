"""Preparing a run: the text, the options, the tokenizer or the model to start from, the run
folder and the memory, all checked before anything is written; the result is a `Plan`."""

from pathlib import Path
from typing import NamedTuple, Optional

from picogpt import files
from picogpt.errors import ModelError, PicogptError, TrainingError
from picogpt.gpt2.memory import physical_memory
from picogpt.training import data as data_module
from picogpt.training import resume as resume_check
from picogpt.training import token_files
from picogpt.training.config import ARCHITECTURE, make_config
from picogpt.training.data import encode, read_text, split_data, vocabulary_files
from picogpt.training.memory import estimate_memory
from picogpt.training.run_folder import STATE_DIR, RunFolder


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


def prepare(text_path, out, options, *, resume=False, init=None, tokenizer=None, data=None,
            weights_dir=None, base_url=None, check_saved=None, progress=None,
            download_source=None):
    """Check everything that can be wrong before any training: the text (or `data`, a folder of
    nanoGPT's train.bin and val.bin, when `text_path` is None), the options, --out, the memory it
    needs. `init` and `tokenizer` are model names as --model takes them (hub.resolve; a GPT-2
    size is downloaded from `download_source`); no `tokenizer` is the text's characters (GPT-2's
    with `data`) for a new run, and the run's own when resuming, which any other refuses;
    `check_saved(config, path)` validates a folder's saved configuration; `progress(done,
    total[, what, unit])` hears how tokenizing and checking go. Nothing is written until all is
    checked."""
    from picogpt.hub.folder import read_folder
    from picogpt.hub.resolve import resolve

    text = None if data is not None else _read_text(text_path)
    out = Path(out)
    notice, saved, init_params, source, model_record = None, None, None, None, None
    if resume:
        if not out.is_dir():
            raise TrainingError(f"{out}: nothing to resume (no such folder)")
        if not any(out.iterdir()):
            raise TrainingError(f"{out}: nothing to resume (an empty folder)")
        folder = RunFolder.open(out)
        if folder.has_state():
            saved = _saved_config(out, check_saved)
            _check_same_tokenizer(tokenizer, saved)
            hparams, tok = _read_model(out, "cannot resume")
            resume_check.check_state(out / STATE_DIR, resume_check.describe(hparams, saved, tok))
            source = out
            config = make_config(options, saved)
            config.update({k: saved.get(k) for k in ("init", "tokenizer")})
        else:  # the first save never finished: the same run again, from the folder's recipe
            saved = _saved_recipe(out, check_saved)
            if folder.has_model():
                hparams, tok = _read_model(out, "cannot start over")
                model_record = resume_check.describe(hparams, {}, tok)
            _check_same_tokenizer(tokenizer, saved)
            init, tokenizer = _saved_sources(saved, tokenizer)
            notice = (f"{out} holds no complete training state to resume (its first save never "
                      "finished): starting over" + (" with its own recipe" if saved else ""))
            resume = False
    else:
        folder = RunFolder.for_new_run(out)
    if not resume:
        if init is not None:
            source = resolve(init, weights_dir, base_url, download_source)
            hparams, tok, init_params = read_folder(source)
            config = make_config(options, saved, init_hparams=hparams)
            hparams = dict(hparams)
        else:
            tokenizer = tokenizer or ("gpt2" if data is not None else "chars")
            tok, source = _scratch_tokenizer(tokenizer, text, text_path, weights_dir, base_url,
                                             download_source)  # fmt: skip
            config = make_config(options, saved)
            hparams = {"n_vocab": tok.n_vocab, "n_ctx": config["block_size"],
                       **{k: config[k] for k in ARCHITECTURE}}  # fmt: skip
        config.update(init=None if init is None else str(init),
                      tokenizer=None if init is not None else str(tokenizer))
        if model_record is not None:
            resume_check.check_same_model(model_record,
                                          resume_check.describe(hparams, config, tok), out)
    config["data"] = None if data is None else str(data)
    vocabulary = vocabulary_files(tok, source)
    splits = _training_data(text_path, text, data, tok, vocabulary, weights_dir, progress)
    need = config["block_size"] + 1
    unit = "characters" if "chars.json" in vocabulary else "tokens"
    for name, split in splits.items():
        if len(split) < need:
            raise TrainingError(
                f"{name} is too short for --block-size {config['block_size']}: "
                f"{len(split):,} {unit} must hold a window of {need}")
    memory = estimate_memory(hparams, config)
    ram = physical_memory()
    if ram is not None and memory > ram:
        raise TrainingError(
            f"this run needs about {memory / 1e9:.1f} GB of memory, more than this machine's "
            f"{ram / 1e9:.1f} GB: try a smaller --batch-size or --block-size")
    folder.begin()
    return Plan(config, hparams, tok, vocabulary, tuple(splits.values()), folder, resume,
                init_params, notice, memory)  # fmt: skip


def _read_text(path):
    """The training text, or None for a file over data.TEXT_LIMIT: it is tokenized as a stream
    (token_files.tokenize_file), never held whole."""
    size = files.check_regular(path, token_files.SIZE_LIMIT, "training text", error=TrainingError)
    if size > data_module.TEXT_LIMIT:
        return None
    return read_text(path)


def _saved_config(out, check_saved):
    """The folder's train_config.json, checked (check_saved)."""
    config_path = out / "train_config.json"
    saved = files.load_json(config_path, 1 << 20, "train_config.json", error=TrainingError)
    if check_saved is not None:
        check_saved(saved, config_path)
    return saved


def _saved_recipe(out, check_saved):
    """What a folder says of the run that made it: its train_config.json, else hparams.json's
    architecture, else None."""
    if (out / "train_config.json").is_file():
        return _saved_config(out, check_saved)
    if not (out / "hparams.json").is_file():
        return None
    hparams = _read_model(out, "cannot start over", tokenizer=False)
    return {**{k: hparams[k] for k in ARCHITECTURE}, "block_size": hparams["n_ctx"]}


def _check_same_tokenizer(tokenizer, saved):
    """A --tokenizer given with --resume must be the run's own (its recipe's, `saved`)."""
    if tokenizer is None or not saved:
        return
    if saved.get("init") is not None:
        raise TrainingError(f"--tokenizer {tokenizer}: the run being resumed uses the tokenizer of "
                            f"its --init model ({saved['init']}); it cannot change")
    if saved.get("tokenizer") is not None and tokenizer != saved["tokenizer"]:
        raise TrainingError(f"--tokenizer {tokenizer}: the run being resumed was trained with "
                            f"--tokenizer {saved['tokenizer']}; it cannot change")


def _saved_sources(saved, tokenizer):
    """(init, tokenizer) of the run a saved configuration describes; `tokenizer` where it names
    none."""
    init, name = (saved.get("init"), saved.get("tokenizer")) if saved else (None, None)
    return (init if isinstance(init, str) else None), (name if isinstance(name, str) else tokenizer)


def _read_model(out, doing, tokenizer=True):
    """(hparams, tokenizer) of the model folder `out` (hparams alone without `tokenizer`)."""
    from picogpt.formats import openai

    try:
        hparams = openai.read_hparams(out)
        return (hparams, openai.read_tokenizer(out)) if tokenizer else hparams
    except (PicogptError, OSError, ValueError) as e:
        raise TrainingError(f"{out}: {doing}: {e}") from e


def _scratch_tokenizer(name, text, text_path, weights_dir, base_url, download_source):
    """(tokenizer, the folder it came from or None) of a run from scratch: the text's characters
    for "chars", else the tokenizer of the model `name` names."""
    from picogpt.hub.folder import read_tokenizer
    from picogpt.hub.resolve import resolve_tokenizer

    if name == "chars":
        if text is None:
            raise TrainingError(
                f"{text_path} is more than the {data_module.TEXT_LIMIT >> 20:,} MB of text a "
                "character vocabulary is built from: train on GPT-2's tokens (--tokenizer gpt2)")
        from picogpt.tokenizers.chars import CharTokenizer

        return CharTokenizer.from_text(text), None
    source = resolve_tokenizer(name, weights_dir, base_url, download_source)
    try:  # a model folder in either layout, or one holding just a tokenizer
        return read_tokenizer(source), source
    except (OSError, ValueError) as e:  # a folder without (or with a bad) tokenizer
        raise ModelError(f"--tokenizer {name}: {e}") from e


def _training_data(text_path, text, data, tok, vocabulary, weights_dir, progress):
    """{what: ids} for training and validation: `data`'s train.bin and val.bin, or the first 90%
    and the last 10% of the text's ids (cached in the weights folder's tokens/)."""
    from picogpt.gpt2 import parallel
    from picogpt.hub import sources

    if data is not None:
        train, val = token_files.open_split(data, tok.n_vocab, progress)
        return {f"{Path(data) / 'train.bin'}": train, f"{Path(data) / 'val.bin'}": val}
    cache_dir = sources.weights_dir(weights_dir) / "tokens"
    if text is not None:
        try:
            ids = encode(text, tok, cache_dir, vocabulary, progress)
        except ValueError as e:  # characters a character-level vocabulary does not have
            raise TrainingError(f"{text_path}: {e}") from None
    elif "chars.json" in vocabulary:
        raise TrainingError(f"{text_path} is more than the {data_module.TEXT_LIMIT >> 20:,} MB "
                            "of text a character vocabulary encodes")  # fmt: skip
    else:
        ids = token_files.tokenize_file(text_path, tok, cache_dir, vocabulary, progress,
                                        parallel.threads())  # fmt: skip
    train, val = split_data(ids)
    return {f"{text_path}'s first 90%": train, f"{text_path}'s last 10%": val}
