"""A character-level tokenizer: one id per character, the vocabulary of a trained model.

The vocabulary is the sorted set of characters of the training text (65 for Tiny Shakespeare),
saved in the model folder as `chars.json`, a JSON list of one-character strings.
"""

import json
from pathlib import Path

from picogpt import files
from picogpt.errors import MissingFileError, VocabularyError

FILENAME = "chars.json"
# One entry per character: at most Unicode's 1,114,112, about 20 bytes each as escaped JSON.
LIMIT = 32 * files.MB


class CharTokenizer:
    """Characters <-> ids, with the interface the engine expects of a tokenizer."""

    eot_id = None  # a character model has no <|endoftext|>
    path = None  # the file of the vocabulary, when loaded from one (for messages)

    def __init__(self, chars):
        chars = list(chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise VocabularyError("a character vocabulary holds single characters")
        if len(set(chars)) != len(chars):
            raise VocabularyError("a character vocabulary holds each character once")
        if not chars:
            raise VocabularyError("a character vocabulary cannot be empty")
        self.chars = chars
        self.n_vocab = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text):
        """The vocabulary of `text`: its distinct characters, sorted."""
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, folder):
        """Read `chars.json` from a model folder: a regular file of bounded size. A missing one is
        a MissingFileError (also a FileNotFoundError), anything else a VocabularyError naming it."""
        path = Path(folder) / FILENAME
        if not path.exists():
            raise MissingFileError(f"{path}: the character vocabulary does not exist", path)
        chars = files.load_json(path, LIMIT, FILENAME, error=VocabularyError)
        if not isinstance(chars, list):
            raise VocabularyError(f"{path}: expected a JSON list of characters")
        try:
            tokenizer = cls(chars)
        except VocabularyError as e:
            raise VocabularyError(f"{path}: not a character vocabulary: {e}") from e
        tokenizer.path = path
        return tokenizer

    def file_bytes(self):
        """The file that holds this tokenizer in a model folder: name -> bytes."""
        return {FILENAME: (json.dumps(self.chars, ensure_ascii=False) + "\n").encode("utf-8")}

    def save(self, folder):
        """Write chars.json into `folder`, atomically (a reader never sees half a file)."""
        path = Path(folder) / FILENAME
        files.atomic_write(path, self.file_bytes()[FILENAME])
        return path

    def encode(self, text):
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._ids.keys())
            shown = ", ".join(repr(c) for c in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ValueError(
                f"{len(unknown)} character(s) outside this model's vocabulary of {self.n_vocab}: "
                f"{shown}{more}"
            ) from None

    def decode(self, ids):
        out = []
        for i in ids:
            try:
                if not 0 <= i < self.n_vocab:
                    raise IndexError
                out.append(self.chars[i])
            except (IndexError, TypeError):
                raise ValueError(
                    f"token id {i!r} is outside the vocabulary (0..{self.n_vocab - 1})"
                ) from None
        return "".join(out)

    def decoder(self):
        return _Decoder(self)

    def __repr__(self):
        return f"CharTokenizer({self.n_vocab} characters)"


class _Decoder:
    """Streaming decoding: every id is a whole character, so nothing is ever held back."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def feed(self, token_id):
        return self._tokenizer.decode([token_id])

    def flush(self):
        return ""
