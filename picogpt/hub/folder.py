"""A model folder, in either layout, read into (hparams, tokenizer, params), each checked against
the others. Which layout a folder has is decided here, once (formats/ reads each)."""

from pathlib import Path

from picogpt.errors import ModelError
from picogpt.formats import hf, openai, tf_checkpoint
from picogpt.gpt2.params import check_params
from picogpt.hub.verify import verify_once


def read_folder(folder, compact_matrices=False):
    """(hparams, tokenizer, params) of a model folder in either layout, each checked against the
    others: params float32 in OpenAI's names and shapes, as the engine, training and export take
    them (with compact_matrices, an HF folder's float16 or bfloat16 weight matrices as they are,
    for the engine). The weights' checksums are checked the first time (verify.py). Anything
    wrong is a PicogptError naming the file."""
    folder = Path(folder)
    if hf.is_hf_folder(folder):
        hparams, tokenizer, params = hf.read_folder(folder, compact_matrices)
    else:
        hparams = openai.read_hparams(folder)
        params = tf_checkpoint.read(folder)
        try:
            check_params(params, hparams)
        except ValueError as e:
            raise ModelError(f"{folder}: hparams.json does not fit the checkpoint: {e}") from e
        tokenizer = openai.read_tokenizer(folder)
    check_tokenizer(tokenizer, hparams["n_vocab"], folder)
    verify_once(folder)  # last: a malformed file is named as it always was, by its reader
    return hparams, tokenizer, params


def read_tokenizer(folder):
    """The tokenizer of a model folder in either layout, or of a folder that holds only a
    tokenizer in OpenAI's files: an HF folder's is read with its model, and checked against it."""
    folder = Path(folder)
    if hf.is_hf_folder(folder):
        return read_folder(folder)[1]
    return openai.read_tokenizer(folder)


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
