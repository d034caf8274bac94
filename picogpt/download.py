"""Where GPT-2 models live on disk, and (later) fetching OpenAI's files."""

import os
from pathlib import Path

# OpenAI's folder names, and the HuggingFace-style names people also use for them.
SIZES = ("124M", "355M", "774M", "1558M")
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def canonical_size(name):
    """'gpt2-medium' -> '355M'; '124M' -> '124M'; anything else -> None."""
    name = ALIASES.get(name, name)
    return name if name in SIZES else None


def weights_dir(override=None):
    """The folder that holds downloaded models: an explicit override, else $PICOGPT_WEIGHTS,
    else ./weights when it exists (a clone of this repository), else ~/.cache/picogpt."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("PICOGPT_WEIGHTS")
    if env:
        return Path(env).expanduser()
    if Path("weights").is_dir():
        return Path("weights")
    return Path.home() / ".cache" / "picogpt"


class ModelNotFoundError(FileNotFoundError):
    """A named GPT-2 size is not on disk (and could not be fetched)."""


def ensure_model(size, weights_dir_override=None):
    """Return the folder of GPT-2 `size` ('124M', 'gpt2-medium', ...), fetching it if needed.

    Until downloading lands this only looks on disk and says where it looked."""
    size = canonical_size(size) or size
    folder = weights_dir(weights_dir_override) / size
    if (folder / "hparams.json").is_file():
        return folder
    raise ModelNotFoundError(
        f"GPT-2 {size} is not in {folder}. Get it with `picogpt download {size}`, or place "
        f"OpenAI's files for {size} in that folder by hand."
    )
