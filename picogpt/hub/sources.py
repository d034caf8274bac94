"""Where GPT-2's files come from: its sizes and their aliases, the two sources (OpenAI's server
and the HuggingFace hub) with their addresses and files, the pinned digests, the most bytes each
file can be, and the weights folder models are downloaded into."""

import os
from pathlib import Path
from urllib.parse import urlsplit

from picogpt.errors import DownloadError

# OpenAI's folder names, and the HuggingFace-style names people also use for them.
SIZES = ("124M", "355M", "774M", "1558M")
ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}

SOURCES = ("openai", "huggingface")
BASE_URLS = {
    "openai": "https://openaipublic.blob.core.windows.net/gpt-2/models",  # {base}/{size}/{file}
    "huggingface": "https://huggingface.co",  # {base}/{repo}/resolve/main/{file}
}
DEFAULT_BASE_URL = BASE_URLS["openai"]
HF_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
            "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}

DATA = "model.ckpt.data-00000-of-00001"
# Everything OpenAI publishes per size. model.ckpt.meta (the TF graph) is not needed to load.
FILES = ("checkpoint", "encoder.json", "hparams.json", DATA, "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe")
NEEDED = tuple(f for f in FILES if f != "model.ckpt.meta")
HF_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
LAYOUTS = {"openai": (FILES, NEEDED), "huggingface": (HF_FILES, HF_FILES)}  # fetched, needed
# The files that make a folder one layout's model: a folder holds one model, never two.
WEIGHTS = {"openai": ("hparams.json", "model.ckpt.index", DATA),
           "huggingface": ("config.json", "model.safetensors")}

# GPT-2's tokenizer is one pair of files for every size; the hub's vocab.json and merges.txt are
# the same bytes as OpenAI's encoder.json and vocab.bpe (sha256 as tiktoken pins them).
GPT2_VOCAB = 50257
PINNED = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
PINNED["vocab.json"] = PINNED["encoder.json"]
PINNED["merges.txt"] = PINNED["vocab.bpe"]

KB, MB = 1 << 10, 1 << 20
# The most bytes each file can be (GPT-2's real files are well inside these).
MAX_BYTES = {"checkpoint": 64 * KB, "hparams.json": 64 * KB, "config.json": MB,
             "encoder.json": 4 * MB, "vocab.json": 4 * MB, "vocab.bpe": 2 * MB,
             "merges.txt": 2 * MB, "model.ckpt.index": 16 * MB, "model.ckpt.meta": 64 * MB}


def canonical_size(name):
    """'gpt2-medium' -> '355M'; '124M' -> '124M'; anything else -> None."""
    name = ALIASES.get(name, name)
    return name if name in SIZES else None


def max_bytes(size, name):
    """The most bytes file `name` of GPT-2 `size` can be: the weights are 4 bytes a parameter
    (the size names the millions of parameters), with a quarter to spare (the hub's file also
    holds each layer's attention mask)."""
    return MAX_BYTES.get(name, int(size[:-1]) * 5_000_000)


def weights_dir(override=None):
    """The folder that holds downloaded models: an explicit override, else $PICOGPT_WEIGHTS,
    else ./weights when it exists (a clone of this repository), else ~/.cache/picogpt."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("PICOGPT_WEIGHTS")
    if env:
        return Path(env).expanduser()
    if Path("weights").is_dir():
        return Path("weights")
    return Path.home() / ".cache" / "picogpt"


def source_name(override=None):
    """--source, else $PICOGPT_SOURCE, else 'openai'."""
    source = override or os.environ.get("PICOGPT_SOURCE") or "openai"
    if source not in SOURCES:
        raise DownloadError(f"unknown download source {source!r}: expected one of "
                            f"{', '.join(SOURCES)} (--source or $PICOGPT_SOURCE)")
    return source


def check_base_url(url):
    """`url` without its trailing slash, when it is an http(s) URL with a host and a valid port;
    otherwise a DownloadError saying what is wrong."""
    text = str(url)

    def bad(reason):
        return DownloadError(f"not an http(s) URL: {text!r} ({reason})")

    if any(c.isspace() or not c.isprintable() for c in text):
        raise bad("it contains spaces or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port  # a ValueError when it is not a number in 0-65535
    except ValueError as e:
        raise bad(str(e)) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("it must start with http:// or https://")
    if not parts.hostname:
        raise bad("no host name")
    if port == 0:
        raise bad("port 0")
    if parts.query or parts.fragment:
        raise bad("a base URL has no ?query or #fragment")
    return text.rstrip("/")


def base_url(override=None, source="openai"):
    """--base-url, else $PICOGPT_BASE_URL, else the source's own address; checked."""
    return check_base_url(override or os.environ.get("PICOGPT_BASE_URL") or BASE_URLS[source])


def file_url(source, base, size, name):
    """Where file `name` of GPT-2 `size` is under `base`, in the source's URL layout."""
    if source == "huggingface":
        return f"{base}/{HF_REPOS[size]}/resolve/main/{name}"
    return f"{base}/{size}/{name}"
