"""From a model's name to a `Model`: the one place a name resolves to a folder, and the reading of
a model folder (hparams, tokenizer, weights).

A model folder is in OpenAI's layout: `hparams.json`, a TensorFlow checkpoint with GPT-2's tensor
names, and a tokenizer (`encoder.json` + `vocab.bpe`, or `chars.json` for trained char models);
or in HuggingFace's (config.json, model.safetensors, ...: picogpt/hf.py reads it).
"""

from pathlib import Path

from picogpt import checkpoint, download, files, hf
from picogpt.api import Model
from picogpt.errors import FileReadError, ModelError, PicogptError, UnknownModelError
from picogpt.gpt2.engine import GPT
from picogpt.gpt2.params import check_hparams, check_params

BUNDLED = Path(__file__).parent / "models"
HPARAMS_LIMIT = 1 << 16  # bytes: a few integers


def bundled_models():
    """The names of the models that ship inside the package."""
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "hparams.json").is_file())


def resolve(name, weights_dir=None, base_url=None, source=None):
    """The folder that model `name` names; the only mapping from a name to a folder.

    In order: a path that exists is the user's folder (even one called `shakespeare-char`); a
    GPT-2 size or alias (124M, gpt2-medium, ...) is looked for in the weights folder and
    downloaded there when missing (from `source`, see download.ensure_model); a bare name is a
    bundled model. Anything else is an UnknownModelError that lists what names can be."""
    text = str(name)
    path = Path(text).expanduser()
    if text and path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: a model is a folder, and this is a file")
        return path
    size = download.canonical_size(text)
    if size:
        return download.ensure_model(size, weights_dir, base_url, source)
    if text and "/" not in text and "\\" not in text and text in bundled_models():
        return BUNDLED / text
    raise UnknownModelError(
        f"no model {text!r}: not a folder, not a GPT-2 size ({', '.join(download.SIZES)}, or "
        f"{', '.join(download.ALIASES)}), and not a bundled model "
        f"({', '.join(bundled_models()) or 'none'})"
    )


def load(name="124M", weights_dir=None, base_url=None, source=None):
    """A Model from a GPT-2 size ('124M', 'gpt2-medium', ...), a bundled model name, or a folder
    (see `resolve`). Anything wrong in the folder is a ModelError naming it, the cause chained."""
    return load_folder(resolve(name, weights_dir, base_url, source))


def load_folder(folder):
    """A Model from a model folder. Everything is checked before anything is built from it: the
    hparams against the checkpoint's own tensors, the tokenizer against the vocabulary size.
    Anything wrong is a ModelError naming the folder or the file, the cause chained."""
    folder = Path(folder)
    try:
        hparams, tokenizer, params = read_folder(folder)
        gpt = GPT(params, hparams, release=checkpoint.release)
    except ModelError:
        raise
    except (PicogptError, OSError, ValueError) as e:
        raise ModelError(f"{folder}: {e}") from e
    return Model(gpt, tokenizer, folder)


def read_folder(folder):
    """(hparams, tokenizer, params) of a model folder in either layout, each checked against the
    others: params float32 in OpenAI's names and shapes, as the engine, training and export take
    them. Anything wrong is a PicogptError naming the file."""
    folder = Path(folder)
    if hf.is_hf_folder(folder):
        hparams, tokenizer, params = hf.read_folder(folder)
    else:
        hparams = read_hparams(folder)
        params = checkpoint.read(folder)
        try:
            check_params(params, hparams)
        except ValueError as e:
            raise ModelError(f"{folder}: hparams.json does not fit the checkpoint: {e}") from e
        tokenizer = read_tokenizer(folder)
    check_tokenizer(tokenizer, hparams["n_vocab"], folder)
    return hparams, tokenizer, params


def read_hparams(folder):
    """hparams.json of a model folder: a JSON object with GPT-2's five positive sizes."""
    path = Path(folder) / "hparams.json"
    if not path.exists():
        raise ModelError(f"{folder}: not a model folder (no hparams.json)")
    try:
        hparams = files.load_json(path, HPARAMS_LIMIT, "hparams.json")
    except FileReadError as e:
        raise ModelError(str(e)) from e
    if not isinstance(hparams, dict):
        raise ModelError(f"{path}: expected a JSON object")
    try:
        check_hparams(hparams)
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from e
    return hparams


def check_tokenizer(tokenizer, n_vocab, folder):
    """A tokenizer must have a token for every id the model can produce, and no more: one that
    is smaller fails mid-stream on the first id it lacks, one that is larger on its first use."""
    if tokenizer.n_vocab == n_vocab:
        return
    source = getattr(tokenizer, "path", None) or folder
    encoder = getattr(tokenizer, "encoder", None)  # a BPE's token -> id
    hint = " (no <|endoftext|>)" if encoder is not None and "<|endoftext|>" not in encoder else ""
    raise ModelError(f"{source}: {tokenizer.n_vocab} tokens{hint}, but the model's vocabulary "
                     f"(n_vocab, the rows of its token embedding) has {n_vocab}")


def read_tokenizer(folder):
    folder = Path(folder)
    if (folder / "encoder.json").exists() or (folder / "vocab.bpe").exists():
        from picogpt.bpe import BPE

        return BPE.load(folder)
    if (folder / "chars.json").exists():
        from picogpt.chars import CharTokenizer

        return CharTokenizer.load(folder)
    raise ModelError(f"{folder}: no tokenizer (encoder.json + vocab.bpe, or chars.json)")
