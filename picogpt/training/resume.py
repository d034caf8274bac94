"""What a resume state records of the folder it was saved with, and the checks that keep a folder
--resume saves loadable: the model's hparams (hparams.json), its shape as train_config.json gives
it, and the tokenizer (the sha256 of its files as picogpt writes them). --resume compares the
folder with its state before anything is written and refuses, naming each file and field that
differs. A state saved before the record existed is held to what must agree within the folder:
train_config's shape and the tokenizer's size against hparams.json. Starting over for want of a
state is compared the same way with the model the folder holds, so it never replaces it with
another."""

import hashlib
import json

import numpy as np

from picogpt.errors import PicogptError, TrainingError
from picogpt.formats import tf_checkpoint
from picogpt.training.config import ARCHITECTURE, SHAPE_KEYS

RECORD = "train/folder"  # the state's tensor holding the record, as UTF-8 JSON bytes
RECORD_LIMIT = 1 << 20  # bytes: a few sizes and digests


def describe(hparams, config, tokenizer):
    """The record of a model folder: file name -> {field: value} for hparams.json, the shape keys
    of train_config.json, and each tokenizer file's count of tokens and sha256 (of its bytes as
    picogpt writes them: the JSON's spacing does not matter, its tokens do)."""
    record = {"hparams.json": dict(hparams),
              "train_config.json": {k: config.get(k) for k in SHAPE_KEYS}}  # fmt: skip
    for name, data in tokenizer.file_bytes().items():
        record[name] = {"tokens": tokenizer.n_vocab, "sha256": hashlib.sha256(data).hexdigest()}
    return record


def as_tensor(record):
    """The record as the state's uint8 tensor RECORD."""
    return np.frombuffer(json.dumps(record, sort_keys=True).encode("utf-8"), np.uint8)


def check_state(state_dir, record):
    """Refuse to resume when the folder's `record` (describe) differs from the one its state was
    saved with. The state's every CRC is checked first: a damaged record is not a difference."""
    try:
        tf_checkpoint.verify(state_dir)  # never continue from damaged numbers
        stored = tf_checkpoint.read(state_dir).get(RECORD)
    except PicogptError as e:
        raise TrainingError(f"cannot resume: {e}") from None
    if stored is None:  # saved before the record existed
        return check_consistent(record)
    try:
        if stored.dtype != np.uint8 or stored.ndim != 1 or stored.size > RECORD_LIMIT:
            raise ValueError("not a record")
        saved = json.loads(stored.tobytes().decode("utf-8"))
        if not (isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values())):
            raise ValueError("not a record")
    except ValueError as e:
        message = f"cannot resume: {state_dir}: the state's {RECORD!r} is malformed"
        raise TrainingError(message) from e
    _refuse(differences(record, saved, "the resume state"),
            "cannot resume: the folder is not what its resume state was saved with")


def check_same_model(folder_record, record, out):
    """Starting over in a folder that holds a model: the run must train the same model (its
    hparams and tokenizer; the block it trains on may differ), or it would replace the user's
    model with another."""
    shape = "train_config.json"
    _refuse(differences({k: v for k, v in folder_record.items() if k != shape},
                        {k: v for k, v in record.items() if k != shape}, "this run"),
            f"cannot start over in {out}: it holds a model this run would replace with another")


def check_consistent(record):
    """A folder whose files agree with each other: train_config's architecture is hparams.json's,
    its block fits the context, and the tokenizer has a token for every row of the embedding."""
    hparams, config = record["hparams.json"], record["train_config.json"]
    found = [f"train_config.json: {key} is {config[key]}, hparams.json's is {hparams[key]}"
             for key in ARCHITECTURE if config.get(key) != hparams.get(key)]  # fmt: skip
    if (config.get("block_size") or 0) > hparams["n_ctx"]:
        found.append(f"train_config.json: block_size {config['block_size']} is more than "
                     f"hparams.json's n_ctx {hparams['n_ctx']}")  # fmt: skip
    for name, entry in record.items():
        if "tokens" in entry and entry["tokens"] != hparams["n_vocab"]:
            found.append(f"{name}: {entry['tokens']} tokens, hparams.json's n_vocab is "
                         f"{hparams['n_vocab']}")  # fmt: skip
    _refuse(found, "cannot resume: the folder's files disagree")


def differences(folder, other, whose):
    """'file: field is X in the folder, Y in <whose>' for each field where the `folder`'s record
    and the `other` (records as `describe` makes them) differ, a file at a time."""
    lines = []
    for name in sorted(folder.keys() | other.keys()):
        ours, theirs = folder.get(name), other.get(name)
        if ours is None or theirs is None:
            lines.append(f"{name}: in {whose}, not in the folder" if ours is None else
                         f"{name}: in the folder, not in {whose}")  # fmt: skip
            continue
        fields = [f for f in sorted(ours.keys() | theirs.keys()) if ours.get(f) != theirs.get(f)]
        for field in fields:
            if field == "sha256" and len(fields) == 1:  # (else the other field says enough)
                lines.append(f"{name} holds other tokens than {whose}'s")
            elif field != "sha256":
                lines.append(f"{name}: {field} is {_shown(ours.get(field))} in the folder, "
                             f"{_shown(theirs.get(field))} in {whose}")  # fmt: skip
    return lines


def _shown(value):
    return json.dumps(value)[:40]


def _refuse(found, headline):
    if found:
        raise TrainingError(f"{headline}: " + "; ".join(found))
