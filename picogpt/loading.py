"""From a model's name to a `Model`: the one place a name resolves to a folder, and the reading of
a model folder (hparams, tokenizer, weights).

A model folder is OpenAI's layout: `hparams.json`, a TensorFlow checkpoint with GPT-2's tensor
names, and a tokenizer (`encoder.json` + `vocab.bpe`, or `chars.json` for trained char models).
"""

from pathlib import Path

from picogpt import checkpoint, download, files
from picogpt.api import Model
from picogpt.errors import ModelError, PicogptError, UnknownModelError
from picogpt.model import GPT

BUNDLED = Path(__file__).parent / "models"
HPARAMS_LIMIT = 1 << 16  # bytes: a few integers


def bundled_models():
    """The names of the models that ship inside the package."""
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "hparams.json").is_file())


def resolve(name, weights_dir=None, base_url=None):
    """The folder that model `name` names; the only mapping from a name to a folder.

    In order: a path that exists is the user's folder (even one called `shakespeare-char`); a
    GPT-2 size or alias (124M, gpt2-medium, ...) is looked for in the weights folder and
    downloaded there when missing; a bare name is a bundled model. Anything else is an
    UnknownModelError that lists what names can be."""
    text = str(name)
    path = Path(text).expanduser()
    if text and path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: a model is a folder, and this is a file")
        return path
    size = download.canonical_size(text)
    if size:
        return download.ensure_model(size, weights_dir, base_url)
    if text and "/" not in text and "\\" not in text and text in bundled_models():
        return BUNDLED / text
    raise UnknownModelError(
        f"no model {text!r}: not a folder, not a GPT-2 size ({', '.join(download.SIZES)}, or "
        f"{', '.join(download.ALIASES)}), and not a bundled model "
        f"({', '.join(bundled_models()) or 'none'})"
    )


def load(name="124M", weights_dir=None, base_url=None):
    """A Model from a GPT-2 size ('124M', 'gpt2-medium', ...), a bundled model name, or a folder
    (see `resolve`). Anything wrong in the folder is a ModelError naming it, the cause chained."""
    return load_folder(resolve(name, weights_dir, base_url))


def load_folder(folder):
    """A Model from a model folder."""
    folder = Path(folder)
    params, hparams, tokenizer = read_folder(folder)
    try:
        gpt = GPT(params, hparams)
    except (PicogptError, OSError, ValueError) as e:
        raise ModelError(f"{folder}: {e}") from e
    return Model(gpt, tokenizer, folder)


def read_folder(folder):
    """What a model folder holds: its parameters (OpenAI's tensor names -> arrays, mapped from
    the file), hparams and tokenizer. Training's --init starts from these."""
    folder = Path(folder)
    try:
        hparams = read_hparams(folder)
        tokenizer = read_tokenizer(folder)
        params = checkpoint.read(folder)
    except ModelError:
        raise
    except (PicogptError, OSError, ValueError) as e:
        raise ModelError(f"{folder}: {e}") from e
    if tokenizer.n_vocab > hparams["n_vocab"]:
        raise ModelError(f"{folder}: the tokenizer has {tokenizer.n_vocab} tokens, "
                         f"the model only {hparams['n_vocab']}")
    return params, hparams, tokenizer


def read_hparams(folder):
    path = Path(folder) / "hparams.json"
    if not path.exists():
        raise ModelError(f"{folder}: not a model folder (no hparams.json)")
    hparams = files.load_json(path, HPARAMS_LIMIT, "hparams.json", error=ModelError)
    if not isinstance(hparams, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return hparams


def read_tokenizer(folder):
    folder = Path(folder)
    if (folder / "encoder.json").exists() or (folder / "vocab.bpe").exists():
        from picogpt.bpe import BPE

        return BPE.load(folder)
    if (folder / "chars.json").exists():
        from picogpt.chars import CharTokenizer

        return CharTokenizer.load(folder)
    raise ModelError(f"{folder}: no tokenizer (encoder.json + vocab.bpe, or chars.json)")
