"""OpenAI's layout of a model folder, the one OpenAI published GPT-2 in and `picogpt train`
writes: `hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer), a TensorFlow checkpoint with
GPT-2's tensor names (tf_checkpoint.py), and a tokenizer (`encoder.json` + `vocab.bpe`, or
`chars.json` for trained char models)."""

from pathlib import Path

from picogpt import files
from picogpt.errors import FileReadError, ModelError
from picogpt.gpt2.params import check_hparams, param_shapes


def write_folder(out, hparams, tokenizer, params):
    from picogpt.formats import tf_checkpoint

    files.write_json(out / "hparams.json", {k: hparams[k] for k in
                                            ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
    tf_checkpoint.write(out / "model.ckpt", {name: params[name] for name in param_shapes(hparams)})
    for name, data in tokenizer.file_bytes().items():  # chars.json, or encoder.json + vocab.bpe
        files.atomic_write(out / name, data)


HPARAMS_LIMIT = 1 << 16  # bytes: a few integers


def read_hparams(folder):
    """hparams.json of a model folder: a JSON object with GPT-2's five positive sizes."""
    path = Path(folder) / "hparams.json"
    if not path.exists():
        raise ModelError(f"{folder}: not a model folder (no hparams.json, nor the HuggingFace "
                         "layout's config.json)")
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


def read_tokenizer(folder):
    folder = Path(folder)
    if (folder / "encoder.json").exists() or (folder / "vocab.bpe").exists():
        from picogpt.tokenizers.bpe import BPE

        return BPE.load(folder)
    if (folder / "chars.json").exists():
        from picogpt.tokenizers.chars import CharTokenizer

        return CharTokenizer.load(folder)
    raise ModelError(f"{folder}: no tokenizer (encoder.json + vocab.bpe, or chars.json)")
