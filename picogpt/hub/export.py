"""Export: any model folder, in either layout, written anew in HuggingFace's layout or OpenAI's.
It reads a whole model, so it sits above the formats whose writers it uses."""

import os
import shutil
from pathlib import Path

from picogpt import files
from picogpt.errors import ModelError, OutputExistsError
from picogpt.formats import hf, openai
from picogpt.hub.folder import read_folder

FORMATS = ("hf", "openai")
DTYPES = ("float32", "float16", "bfloat16")


def export(model, out, format="hf", dtype="float32"):
    """Write the model folder `model` (either layout) to `out`, a new folder, in HuggingFace's
    layout ("hf": what transformers' from_pretrained reads) or OpenAI's ("openai": what OpenAI
    published), with float32, float16 or bfloat16 weights (HF only: OpenAI's layout is float32).

    `out` must not exist or be empty: export never overwrites a file. The folder is written
    under a temporary name beside `out` and renamed into place when complete. Returns `out`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if format == "openai" and dtype != "float32":
        raise ValueError("OpenAI's layout is float32 (as OpenAI published GPT-2)")
    out = Path(out)
    check_new_folder(out)
    try:
        hparams, tokenizer, params = read_folder(model)  # every tensor checked
    except (OSError, ValueError) as e:  # a tokenizer file missing, say: as load_folder says it
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{model}: {e}") from e
    tmp = files.temporary_name(out)
    tmp.mkdir(parents=True)
    try:
        if format == "hf":
            hf.write_folder(tmp, hparams, tokenizer, params, dtype, model)
        else:
            openai.write_folder(tmp, hparams, tokenizer, params)
        check_new_folder(out)
        os.replace(tmp, out)  # a directory onto a missing or empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_new_folder(out):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists and is not an empty folder; export "
                                "never overwrites files: name a new folder")
