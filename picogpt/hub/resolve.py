"""The one place a model's name resolves to a folder: a path, a GPT-2 size (downloaded when
missing), or a bundled model; a tokenizer's name likewise, except that GPT-2's vocabulary is the
one shipped in the package.

A model folder is in OpenAI's layout: `hparams.json`, a TensorFlow checkpoint with GPT-2's tensor
names, and a tokenizer (`encoder.json` + `vocab.bpe`, or `chars.json` for trained char models);
or in HuggingFace's (config.json, model.safetensors, ...: formats/hf.py reads it).
"""

from pathlib import Path

from picogpt.errors import ModelError, UnknownModelError
from picogpt.hub import download, sources
from picogpt.tokenizers import GPT2_VOCABULARY

BUNDLED = Path(__file__).parent.parent / "models"


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
    size = sources.canonical_size(text)
    if size:
        return download.ensure_model(size, weights_dir, base_url, source)
    if text and "/" not in text and "\\" not in text and text in bundled_models():
        return BUNDLED / text
    raise UnknownModelError(
        f"no model {text!r}: not a folder, not a GPT-2 size ({', '.join(sources.SIZES)}, or "
        f"{', '.join(sources.ALIASES)}), and not a bundled model "
        f"({', '.join(bundled_models()) or 'none'})"
    )


def resolve_tokenizer(name, weights_dir=None, base_url=None, source=None):
    """The folder whose tokenizer `name` names (`--tokenizer`): as `resolve`, except that a GPT-2
    size or alias is the vocabulary shipped in the package, which is every size's (the files
    sources.py pins), so GPT-2's tokens need neither the network nor a downloaded model."""
    text = str(name)
    if sources.canonical_size(text) and not Path(text).expanduser().exists():
        return GPT2_VOCABULARY
    return resolve(name, weights_dir, base_url, source)
