"""`Model`: a GPT-2 engine tied to its tokenizer, with a KV cache it remembers between calls.

`load(name)` builds one (hub/resolve.py finds the folder, hub/folder.py reads it); this module
is what it can do: logits, generation (batched, streamed, with stop strings, penalties and
log-probabilities, as OpenAI's completions define them), and the sliding-window log-likelihood of
a text. It checks the options once (options.py, stops.py) and hands them, whole, to the decode
loop (decoding.py)."""

import contextlib
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from picogpt.errors import ModelError, PicogptError
from picogpt.formats import tf_checkpoint
from picogpt.generation import decoding
from picogpt.generation.options import Options, check_logprobs, check_sampling, check_seed
from picogpt.generation.sampling import is_integer
from picogpt.generation.stops import check_stop
from picogpt.gpt2 import parallel
from picogpt.gpt2.compact import DTYPES
from picogpt.gpt2.engine import GPT
from picogpt.hub.folder import read_folder
from picogpt.hub.resolve import resolve


class Completion(NamedTuple):
    """One sample of `Model.complete`.

    text: the generated text, ending before the stop string that ended it (if one did).
    tokens: the generated ids, through the one that completed the stop string (<|endoftext|>
      itself is not included).
    token_logprobs: each token's log-probability (with logprobs=K), else None.
    top_logprobs: per token, the K likeliest tokens' text -> log-probability, else None.
    finish_reason: "stop" (a stop string or <|endoftext|>) or "length" (n tokens).
    prompt_tokens: how many ids the prompt was."""

    text: str
    tokens: list
    token_logprobs: Optional[list]
    top_logprobs: Optional[list]
    finish_reason: str
    prompt_tokens: int


def completions_of(chunks, samples, with_logprobs, prompt_tokens):
    """The `Completion` of each of `samples` samples, a list, from their chunks (a generation
    from `Model.stream_completion`)."""
    completions, parts = [None] * samples, {}
    for chunk in chunks:
        text, tokens, lps, tops = parts.setdefault(chunk.index, ([], [], [], []))
        text.append(chunk.text)
        tokens.extend(chunk.tokens)
        if with_logprobs:
            lps.extend(chunk.token_logprobs)
            tops.extend(chunk.top_logprobs)
        if chunk.finish_reason is not None:
            completions[chunk.index] = Completion(
                "".join(text), tokens, lps if with_logprobs else None,
                tops if with_logprobs else None, chunk.finish_reason, prompt_tokens)
    return completions


def _texts(chunks):
    """The non-empty texts of a sample's chunks; closing this closes the generation."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


class LogLikelihood(NamedTuple):
    """How well a model predicts a text: `nll` nats over `tokens` scored tokens (`n_bytes` of
    UTF-8), taken with windows of `window` tokens that each score `stride` new ones."""

    nll: float
    tokens: int
    n_bytes: int
    window: int
    stride: int

    @property
    def cross_entropy(self):
        """Nats per token."""
        return self.nll / self.tokens

    @property
    def perplexity(self):
        return math.exp(self.cross_entropy)

    @property
    def bits_per_byte(self):
        return self.nll / math.log(2) / self.n_bytes


class Model:
    """A GPT-2 engine tied to its tokenizer, remembering what its KV cache holds.

    Each call reuses the longest prefix of its input that the cache already holds, so a prompt
    that extends the previous context (a chat turn, say) costs only its new tokens."""

    def __init__(self, gpt, tokenizer, folder=None):
        self.gpt, self.tokenizer, self.folder = gpt, tokenizer, folder
        self.n_ctx = gpt.n_ctx
        self._kv = decoding.KVContext(gpt, folder)

    def reset(self):
        """Forget the context: the next call prefills its whole prompt."""
        self._kv.reset()

    @property
    def context(self):
        """The ids whose keys and values the KV cache holds (what the last logits followed)."""
        return tuple(self._kv.ids)

    @property
    def hparams(self):
        return dict(self.gpt.hparams)

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def logits(self, ids):
        """float32 [len(ids), n_vocab]: the logits after each position, in one forward pass."""
        ids = self._check_ids(ids)
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"logits takes 1 to {self.n_ctx} ids, got {len(ids)}")
        cache = self.gpt.new_cache(length=len(ids))
        return decoding.forward(self.gpt, np.array([ids]), cache, self.folder, all_logits=True)[0]

    def generate_tokens(self, ids, n, temperature=1.0, top_k=40, top_p=None, seed=None,
                        stop_at_eos=True, samples=1, *, frequency_penalty=0.0,
                        presence_penalty=0.0):
        """The n new ids (fewer if <|endoftext|> ends them); a list of such lists if samples > 1."""
        out = self.complete(ids, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty, samples=samples,
                            stop_at_eos=stop_at_eos)  # fmt: skip
        return out.tokens if samples == 1 else [c.tokens for c in out]

    def generate(self, prompt, n=40, temperature=1.0, top_k=40, top_p=None, seed=None,
                 stop_at_eos=True, samples=1, *, stop=None, frequency_penalty=0.0,
                 presence_penalty=0.0):
        """The continuation of `prompt` (the prompt itself not included), ending before the first
        stop string; a list if samples > 1."""
        out = self.complete(self._prompt_ids(prompt), n, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=stop,
                            frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty, samples=samples,
                            stop_at_eos=stop_at_eos)  # fmt: skip
        return out.text if samples == 1 else [c.text for c in out]

    def stream(self, prompt, n=40, temperature=1.0, top_k=40, top_p=None, seed=None,
               stop_at_eos=True, *, stop=None, frequency_penalty=0.0, presence_penalty=0.0):
        """Yield the continuation of `prompt` as text pieces, as each token is generated.
        A character split across tokens is held back until complete, and so is text that may
        be the beginning of a stop string, until it is certain that it is not."""
        chunks = self.stream_completion(
            self._prompt_ids(prompt), n, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, stop_at_eos=stop_at_eos)  # fmt: skip
        return _texts(chunks)

    def complete(self, prompt, n=16, *, temperature=1.0, top_k=40, top_p=None, seed=None,
                 stop=None, frequency_penalty=0.0, presence_penalty=0.0, logprobs=None,
                 samples=1, stop_at_eos=True):
        """Up to n new tokens after `prompt` (a str, or a list of ids), as a `Completion`; a list
        of `samples` Completions if samples > 1.

        stop: a string or up to 16 strings; the text ends before the first occurrence of any
        (found in the text, also across tokens), and finish_reason is then "stop".
        frequency_penalty, presence_penalty: OpenAI's penalties in [-2, 2] (see
        sampling.penalize), each sample counting its own tokens.
        logprobs: None, or K in 0..20: each token's log-probability and the K likeliest
        alternatives', from log-softmax of the raw logits (temperature 1, no penalties).
        seed: sample k (from 0) draws from seed + k, so the samples of one call are independent
        and repeatable, and `complete(p, samples=4, seed=s)[k]` is `complete(p, seed=s + k)`.
        Batched samples run in groups whose cache fits SAMPLES_MEMORY (see `sample_groups`)."""
        job = self._prepare(prompt, n, temperature, top_k, top_p, seed, stop, frequency_penalty,
                            presence_penalty, logprobs, samples, stop_at_eos)  # fmt: skip
        chunks = decoding.chunks(self._kv, self.tokenizer, *job)
        completions = completions_of(chunks, samples, logprobs is not None, len(job[0]))
        return completions[0] if samples == 1 else completions

    def stream_completion(self, prompt, n=16, *, temperature=1.0, top_k=40, top_p=None,
                          seed=None, stop=None, frequency_penalty=0.0, presence_penalty=0.0,
                          logprobs=None, samples=1, stop_at_eos=True):
        """`complete` as it happens: a generator of `Chunk`s, one per generated token and sample
        (its text "" while held back: an unfinished character, or what may begin a stop string),
        then for each sample a last chunk with its finish_reason and the rest of its text.
        Closing the generator stops the generation. Options are checked before it starts."""
        return decoding.chunks(self._kv, self.tokenizer, *self._prepare(
            prompt, n, temperature, top_k, top_p, seed, stop, frequency_penalty, presence_penalty,
            logprobs, samples, stop_at_eos))  # fmt: skip

    def sample_groups(self, samples, positions):
        """How many samples run together in one batch: as many as keep their KV cache within
        SAMPLES_MEMORY bytes (for `positions` positions each) and MAX_GROUP rows; at least one.
        A larger `samples` runs group after group, so memory stays bounded."""
        return decoding.sample_groups(self.gpt.hparams, samples, positions)

    def log_likelihood(self, text, stride=None, progress=None):
        """The negative log-likelihood of `text` under the model, as a `LogLikelihood`.

        A text longer than the context is scored with a sliding window: the first window scores
        all its tokens, each later one `stride` new tokens (default half the context) with the
        rest of the window as context. GPT-2 texts begin after <|endoftext|>, so with it as
        context every token is scored; without one (a character-level model) the first token has
        no context and is not. `progress(done, total, nll)` is called after each window."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.encode(text)
        eot = getattr(self.tokenizer, "eot_id", None)
        if eot is not None:
            ids, n_bytes = [eot, *ids], len(text.encode("utf-8"))
        else:
            n_bytes = len(self.decode(ids[1:]).encode("utf-8"))
        if len(ids) < 2:
            raise ValueError("the text is too short to score (it needs at least 2 tokens)")
        window = self.n_ctx
        if stride is not None and (not isinstance(stride, int) or stride < 1):
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        stride = min(stride or max(window // 2, 1), max(window - 1, 1))
        total = len(ids) - 1
        nll, scored = 0.0, 1  # ids[scored] is the next token to score
        while scored < len(ids):
            # This window scores ids[scored:end]: all it can the first time, then stride new ones.
            end = min(scored + (window if scored == 1 else stride), len(ids))
            begin = max(0, end - 1 - window)  # inputs ids[begin:end-1] predict ids[begin+1:end]
            logits = self.logits(ids[begin : end - 1])[scored - 1 - begin :].astype(np.float64)
            peak = logits.max(axis=1)
            log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
            nll += float((log_z - logits[np.arange(len(logits)), ids[scored:end]]).sum())
            scored = end
            if progress is not None:
                progress(scored - 1, total, nll)
        return LogLikelihood(nll, total, n_bytes, window, stride)

    # --- generation ------------------------------------------------------------------------

    def _prepare(self, prompt, n, temperature, top_k, top_p, seed, stop, frequency_penalty,
                 presence_penalty, logprobs, samples, stop_at_eos):
        """Check every option before any work: (prompt ids, n, options, base seed, samples)."""
        options = Options(
            check_sampling(temperature, top_k, top_p, frequency_penalty, presence_penalty),
            check_stop(stop), check_logprobs(logprobs), bool(stop_at_eos))  # fmt: skip
        if not is_integer(n) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if not is_integer(samples) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        n, samples = int(n), int(samples)
        base = check_seed(seed)
        ids = self._prompt_ids(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        return ids or self._start_ids(), n, options, base, samples

    def _prompt_ids(self, prompt):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.encode(prompt)

    def _check_ids(self, ids):
        """ids (a list, a NumPy array: any iterable of integers) as a list of ints, each checked
        to be a token of the vocabulary."""
        if isinstance(ids, (str, bytes, bytearray)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"a prompt is a str or a list of token ids, got {type(ids).__name__}")
        ids = list(ids)
        for i in ids:
            if not is_integer(i):
                raise TypeError(f"token ids are integers, got {i!r}")
        ids = [int(i) for i in ids]
        n_vocab = self.gpt.hparams["n_vocab"]
        bad = [i for i in ids if not 0 <= i < n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
        return ids

    def _start_ids(self):
        """What an empty prompt means: <|endoftext|>, as GPT-2 was trained; else a newline."""
        if getattr(self.tokenizer, "eot_id", None) is not None:
            return [self.tokenizer.eot_id]
        try:
            return self.encode("\n")[:1]
        except ValueError:
            raise ValueError("an empty prompt needs <|endoftext|> or a newline") from None

    def token_text(self, token):
        """One token's text; a token that is not whole UTF-8 (part of a character) as
        "bytes:\\xe2\\x80" (OpenAI's convention), so every token has a distinct text."""
        return decoding.token_text(self.tokenizer, token)


def load(name="124M", weights_dir=None, base_url=None, source=None, dtype=None):
    """A Model from a GPT-2 size ('124M', 'gpt2-medium', ...), a bundled model name, or a folder
    (see `resolve`). `dtype` is what its weight matrices are kept in: float32, float16,
    bfloat16 or int8 (widened inside the products: gpt2/compact.py); None, the folder's own
    (float32, or an HF folder's float16 / bfloat16). Anything wrong in the folder is a
    ModelError naming it, the cause chained. A bad $PICOGPT_THREADS is a ValueError here,
    before any download, not at the first forward that splits."""
    dtype = check_dtype(dtype)
    parallel.threads()
    return load_folder(resolve(name, weights_dir, base_url, source), dtype)


def check_dtype(dtype):
    """dtype by its name, one of DTYPES (a NumPy dtype, np.dtype('float16') or np.float16, by
    its name), or None; a ValueError for anything else."""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = np.dtype(dtype).name
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)} (or None: the folder's "
                         "own)")
    return dtype


def load_folder(folder, dtype=None):
    """A Model from a model folder, its weight matrices in `dtype` (see load). Everything is
    checked before anything is built from it: the hparams against the checkpoint's own tensors,
    the tokenizer against the vocabulary size. Anything wrong is a ModelError naming the folder
    or the file, the cause chained."""
    dtype = check_dtype(dtype)
    folder = Path(folder)
    try:
        hparams, tokenizer, params = read_folder(folder, compact_matrices=dtype != "float32")
        gpt = GPT(params, hparams, release=tf_checkpoint.release, dtype=dtype)
    except ModelError:
        raise
    except (PicogptError, OSError, ValueError) as e:
        named = str(e).startswith((f"{folder}{os.sep}", f"{folder}: "))  # it or a file of it
        raise ModelError(str(e) if named else f"{folder}: {e}") from e
    return Model(gpt, tokenizer, folder)
