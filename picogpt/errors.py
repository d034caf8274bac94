"""picogpt's exceptions: one family, so a caller can catch `PicogptError` for anything picogpt
reports about its input (a folder, a file, a download, an option).

Each class names what went wrong; the message names the file (or option) and the problem, and the
underlying cause, where there is one, is chained (`raise ... from e`)."""

import errno


class PicogptError(Exception):
    """The base of every error picogpt raises about its input or environment."""


class ModelError(PicogptError, ValueError):
    """A model folder that cannot be used: missing or malformed hparams, tokenizer or weights."""


class CheckpointError(PicogptError):
    """A checkpoint (TensorFlow bundle or safetensors file) that is missing or malformed."""


class VocabularyError(PicogptError, ValueError):
    """A tokenizer file (encoder.json, vocab.bpe, chars.json, ...) that is malformed."""


class DownloadError(PicogptError):
    """A download that failed: no network, a server that misbehaves, a corrupt file."""


class ModelNotFoundError(DownloadError, ModelError, FileNotFoundError):
    """A model that is not there: a name that is not a GPT-2 size, a bundled model or a folder,
    or a GPT-2 size that is not on disk and could not be fetched."""


class UnknownModelError(ModelNotFoundError):
    """A model name that names nothing: not a folder, a GPT-2 size or a bundled model."""


class TrainingError(PicogptError):
    """A training run that cannot start or continue: bad data, a folder that is not ours, ..."""


class OutputExistsError(PicogptError, FileExistsError):
    """A folder or file to be written that is already there: picogpt never overwrites a user's
    files."""


class FileReadError(PicogptError, OSError):
    """A file that cannot be read safely: missing, not a regular file, too large, not UTF-8."""


class MissingFileError(FileReadError, FileNotFoundError):
    """A file that is not there (a FileNotFoundError too, for callers that catch that): its
    message names the file; `filename` is the path, where the raiser gave it."""

    def __init__(self, message, filename=None):
        super().__init__(message)
        if filename is not None:
            self.errno, self.filename = errno.ENOENT, str(filename)

    def __str__(self):
        return str(self.args[0])  # the message alone, not OSError's "[Errno 2] ...: 'path'"
