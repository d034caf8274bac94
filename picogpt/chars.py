"""A character-level tokenizer: one id per character, the vocabulary of a trained model.

The vocabulary is the sorted set of characters of the training text (65 for Tiny Shakespeare),
saved in the model folder as `chars.json`, a JSON list of one-character strings.
"""

import json
import os
from pathlib import Path

FILENAME = "chars.json"


class CharTokenizer:
    """Characters <-> ids, with the interface the engine expects of a tokenizer."""

    eot_id = None  # a character model has no <|endoftext|>

    def __init__(self, chars):
        chars = list(chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a character vocabulary holds single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary holds each character once")
        if not chars:
            raise ValueError("a character vocabulary cannot be empty")
        self.chars = chars
        self.n_vocab = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text):
        """The vocabulary of `text`: its distinct characters, sorted."""
        return cls(sorted(set(text)))

    @classmethod
    def load(cls, folder):
        path = Path(folder) / FILENAME
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(chars, list):
                raise ValueError("expected a JSON list of characters")
            return cls(chars)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no character vocabulary") from None
        except ValueError as e:  # also json's JSONDecodeError
            raise ValueError(f"{path}: not a character vocabulary: {e}") from None

    def save(self, folder):
        """Write chars.json into `folder`, atomically (a reader never sees half a file)."""
        path = Path(folder) / FILENAME
        tmp = path.with_name(f"{FILENAME}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.chars, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
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
