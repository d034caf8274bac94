"""picogpt: GPT-2 end to end in plain Python and NumPy.

    import picogpt
    picogpt.generate("Once upon a time", n=40)       # GPT-2 124M, downloaded once
    m = picogpt.load("124M")     # or "gpt2-medium", "shakespeare-char", a folder
    for piece in m.stream("Once upon a time", n=40):
        print(piece, end="", flush=True)
"""

__version__ = "0.1.0"

# Public names and the modules that define them, imported on first use: `import picogpt` (and so
# the command line, before it can hold Ctrl-C back) imports nothing, and never waits for NumPy.
_LAZY = {
    "load": "picogpt.generation.model", "resolve": "picogpt.hub.resolve",
    "BUNDLED": "picogpt.hub.resolve", "Model": "picogpt.generation.model",
    "LogLikelihood": "picogpt.generation.model", "Completion": "picogpt.generation.model",
    "set_threads": "picogpt.gpt2.parallel", "Chunk": "picogpt.generation.decoding",
}  # fmt: skip
# The exceptions (picogpt/errors.py), every one: a caller catches what README's Errors names.
_ERRORS = ("PicogptError", "ModelError", "CheckpointError", "VocabularyError", "DownloadError",
          "ModelNotFoundError", "UnknownModelError", "TrainingError", "OutputExistsError",
          "FileReadError", "MissingFileError")  # fmt: skip
_LAZY.update(dict.fromkeys(_ERRORS, "picogpt.errors"))
__all__ = ["load", "resolve", "generate", "Model", "Completion", "Chunk", "LogLikelihood",
           "BUNDLED", "set_threads", *_ERRORS]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'picogpt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


_loaded = {}


def generate(prompt, n=40, model="124M", **options):
    """The continuation of `prompt` by `model` (loaded once, then kept); options as
    Model.generate: temperature, top_k, top_p, seed, stop_at_eos, samples, stop,
    frequency_penalty, presence_penalty."""
    from picogpt.generation.model import load

    key = str(model)
    if key not in _loaded:
        _loaded[key] = load(model)
    return _loaded[key].generate(prompt, n=n, **options)
