"""picogpt: GPT-2 end to end in plain Python and NumPy.

    import picogpt
    picogpt.generate("Once upon a time", n=40)       # GPT-2 124M, downloaded once
    m = picogpt.load("124M")     # or "gpt2-medium", "shakespeare-char", a folder
    for piece in m.stream("Once upon a time", n=40):
        print(piece, end="", flush=True)
"""

from picogpt.api import Chunk, Completion, LogLikelihood, Model
from picogpt.errors import ModelError, PicogptError
from picogpt.loading import BUNDLED, load, resolve

__version__ = "0.1.0"
__all__ = ["load", "resolve", "generate", "Model", "Completion", "Chunk", "LogLikelihood",
           "BUNDLED", "ModelError", "PicogptError"]

_loaded = {}


def generate(prompt, n=40, model="124M", **options):
    """The continuation of `prompt` by `model` (loaded once, then kept); options as
    Model.generate: temperature, top_k, top_p, seed, stop_at_eos, samples, stop,
    frequency_penalty, presence_penalty."""
    key = str(model)
    if key not in _loaded:
        _loaded[key] = load(model)
    return _loaded[key].generate(prompt, n=n, **options)
