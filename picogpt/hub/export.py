"""Export: any model folder, in either layout, written anew in HuggingFace's layout or OpenAI's.
It reads a whole model, so it sits above the formats whose writers it uses."""

import contextlib
import os
import shutil
from pathlib import Path

from picogpt import files
from picogpt.errors import ModelError, OutputExistsError, PicogptError
from picogpt.formats import hf, openai
from picogpt.hub.folder import read_folder

FORMATS = ("hf", "openai")
DTYPES = ("float32", "float16", "bfloat16")
MARK = ".picogpt-export"  # the first file in a folder being written: says a leftover is export's


def export(model, out, format="hf", dtype="float32"):
    """Write the model folder `model` (either layout) to `out`, a new folder, in HuggingFace's
    layout ("hf": what transformers' from_pretrained reads) or OpenAI's ("openai": what OpenAI
    published), with float32, float16 or bfloat16 weights (HF only: OpenAI's layout is float32).

    `out` must not exist or be empty: export never overwrites a file. The folder is written
    under a temporary name beside `out` (`OUT.tmp<pid>`) and renamed into place when complete;
    what a killed export to `out` left there is deleted first (`remove_stale`). Returns `out`."""
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
    remove_stale(out)
    tmp = files.temporary_name(out)
    try:
        tmp.mkdir(parents=True)
        (tmp / MARK).touch()
        if format == "hf":
            hf.write_folder(tmp, hparams, tokenizer, params, dtype, model)
        else:
            openai.write_folder(tmp, hparams, tokenizer, params)
        (tmp / MARK).unlink()
        check_new_folder(out)
        os.replace(tmp, out)  # a directory onto a missing or empty one
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, PicogptError):  # a full disk, say:
            # named by `out`, as the user gave it; the temporary name is ours
            raise PicogptError(f"cannot write {out}: {e.strerror or e}") from e
        raise
    return out


def check_new_folder(out):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists and is not an empty folder; export "
                                "never overwrites files: name a new folder")


def remove_stale(out):
    """Delete the folders that killed exports to `out` left beside it: `OUT.tmp<pid>` whose
    process is gone, holding export's MARK, or nothing (killed before writing it). Anything
    else by that name is not export's, and stays."""
    own = files.temporary_name(out)  # not made yet: one there is an earlier process's, our pid
    stale = list(files.stale_temporaries(out.parent, out.name))
    for tmp in stale + ([own] if own.exists() else []):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        mark = tmp / MARK
        if mark.is_file() and not mark.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # only if empty
                tmp.rmdir()
