"""`Model`: a GPT-2 engine tied to its tokenizer, with a KV cache it remembers between calls.

`load(name)` builds one (hub/resolve.py finds the folder, hub/folder.py reads it); this module
is what it can do: logits, generation (batched, streamed, with stop strings, penalties and
log-probabilities, as OpenAI's completions define them), and the sliding-window log-likelihood of
a text."""

import contextlib
import math
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from picogpt.errors import ModelError, PicogptError
from picogpt.formats import tf_checkpoint
from picogpt.generation import sampling
from picogpt.gpt2.engine import GPT
from picogpt.hub.folder import read_folder
from picogpt.hub.resolve import resolve

MAX_STOPS = 16
MAX_STOP_CHARS = 1000  # per stop string: the hold-back search costs its length per token
MAX_LOGPROBS = 20
# Batched samples run in groups whose KV caches together stay within this many bytes (and at
# most MAX_GROUP rows): samples=10**4 then needs the memory of one group, not of 10**4 rows.
SAMPLES_MEMORY = 1 << 30
MAX_GROUP = 256


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


class Chunk(NamedTuple):
    """One piece of `Model.stream_completion`: sample `index`'s text released at this step
    ("" while held back), the token(s) of this step with their log-probabilities (lists, empty
    in a sample's last chunk; None without logprobs), and finish_reason in its last chunk."""

    index: int
    text: str
    tokens: list
    token_logprobs: Optional[list]
    top_logprobs: Optional[list]
    finish_reason: Optional[str]


class Sampling(NamedTuple):
    """How one token is drawn from a row of logits (checked by check_sampling)."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    frequency_penalty: float
    presence_penalty: float


class _Options(NamedTuple):
    sampling: Sampling
    stop: tuple
    logprobs: Optional[int]
    stop_at_eos: bool


def check_sampling(temperature, top_k, top_p, frequency_penalty=0.0, presence_penalty=0.0):
    """The sampling options, or ValueError naming the one that means nothing."""
    sampling.check_options(temperature, top_k, top_p)
    sampling.check_penalties(frequency_penalty, presence_penalty)
    return Sampling(temperature, top_k, top_p, float(frequency_penalty), float(presence_penalty))


def check_stop(stop):
    """`stop` as a tuple of strings: None (none), one string, or a list of up to 16 non-empty
    strings; anything else is a ValueError naming `stop`."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r} in it")
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, "
                             f"got {len(s)}")
    return tuple(dict.fromkeys(stops))


def check_logprobs(logprobs):
    """None, or an integer K in 0..20 (how many alternatives to report)."""
    if logprobs is None:
        return None
    if not isinstance(logprobs, (int, np.integer)) or isinstance(logprobs, bool) or \
            not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, "
                         f"got {logprobs!r}")
    return int(logprobs)


def check_seed(seed):
    """The base seed: an integer >= 0 as given; None draws one from the OS."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    return int(seed)


class StopText:
    """A sample's text as it grows, cut before the first stop string, and how much of it is safe
    to show: never a tail that may turn out to be the start of a stop string."""

    def __init__(self, stops):
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.text = ""
        self.released = 0  # text[:released] has been shown
        self.stopped = False

    def add(self, piece):
        """Append `piece`; return the text that became safe to show (maybe "")."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a new match ends inside `piece`
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.release_all()
        return self._release(len(self.text) - self._held())

    def release_all(self):
        """The rest of the text: there is no more to come."""
        return self._release(len(self.text))

    def _held(self):
        """The length of the longest end of the text that is the beginning of a stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, end):
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece


def _texts(chunks):
    """The non-empty texts of a sample's chunks; closing this closes the generation."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


class _Row:
    """One sample being generated: its random draws, its penalty counts, its text."""

    def __init__(self, index, rng, model, options):
        self.index, self.rng = index, rng
        s = options.sampling
        penalized = s.frequency_penalty != 0 or s.presence_penalty != 0
        self.counts = np.zeros(model.gpt.hparams["n_vocab"], np.int64) if penalized else None
        self.decoder = model.tokenizer.decoder()
        self.stop = StopText(options.stop)
        self.finish = None  # "stop" or "length" once the row has ended

    def choose(self, logits, s):
        """The next token from this row's raw logits: penalties, then temperature/top-k/top-p."""
        if self.counts is not None:
            logits = sampling.penalize(logits, self.counts, s.frequency_penalty,
                                       s.presence_penalty)
        token = int(sampling.sample(logits[None], self.rng, s.temperature, s.top_k, s.top_p)[0])
        if self.counts is not None:
            self.counts[token] += 1
        return token

    def add(self, token):
        """Take a generated token; the text now safe to show. A stop string ends the row."""
        piece = self.stop.add(self.decoder.feed(token))
        if self.stop.stopped:
            self.finish = "stop"
        return piece

    def last_chunk(self, reason, with_logprobs):
        """End the row: the rest of its text (a held-back tail, an unfinished character)."""
        text = "" if self.stop.stopped else self.stop.add(self.decoder.flush())
        text += self.stop.release_all()
        self.finish = "stop" if self.stop.stopped else reason
        return Chunk(self.index, text, [], [] if with_logprobs else None,
                     [] if with_logprobs else None, self.finish)


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
        # Past n_ctx, generation keeps this many of the newest tokens and re-prefills them.
        self.window_keep = max(1, gpt.n_ctx * 3 // 4)
        self._cache = gpt.new_cache()
        self._context = []  # the ids whose keys and values self._cache holds

    def reset(self):
        """Forget the context: the next call prefills its whole prompt."""
        self._cache.length = 0
        self._context = []

    @property
    def context(self):
        """The ids whose keys and values the KV cache holds (what the last logits followed)."""
        return tuple(self._context)

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
        return self.gpt.forward(np.array([ids]), cache, all_logits=True)[0]

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
        completions, parts = [None] * samples, {}
        for chunk in self._chunks(*job):
            text, tokens, lps, tops = parts.setdefault(chunk.index, ([], [], [], []))
            text.append(chunk.text)
            tokens.extend(chunk.tokens)
            if logprobs is not None:
                lps.extend(chunk.token_logprobs)
                tops.extend(chunk.top_logprobs)
            if chunk.finish_reason is not None:
                completions[chunk.index] = Completion(
                    "".join(text), tokens, lps if logprobs is not None else None,
                    tops if logprobs is not None else None, chunk.finish_reason, len(job[0]))
        return completions[0] if samples == 1 else completions

    def stream_completion(self, prompt, n=16, *, temperature=1.0, top_k=40, top_p=None,
                          seed=None, stop=None, frequency_penalty=0.0, presence_penalty=0.0,
                          logprobs=None, samples=1, stop_at_eos=True):
        """`complete` as it happens: a generator of `Chunk`s, one per generated token and sample
        (its text "" while held back: an unfinished character, or what may begin a stop string),
        then for each sample a last chunk with its finish_reason and the rest of its text.
        Closing the generator stops the generation. Options are checked before it starts."""
        return self._chunks(*self._prepare(prompt, n, temperature, top_k, top_p, seed, stop,
                                           frequency_penalty, presence_penalty, logprobs, samples,
                                           stop_at_eos))  # fmt: skip

    def sample_groups(self, samples, positions):
        """How many samples run together in one batch: as many as keep their KV cache within
        SAMPLES_MEMORY bytes (for `positions` positions each) and MAX_GROUP rows; at least one.
        A larger `samples` runs group after group, so memory stays bounded."""
        per_row = 2 * self.gpt.hparams["n_layer"] * positions * self.gpt.hparams["n_embd"] * 4
        per_row += 8 * self.gpt.hparams["n_vocab"] * 8  # logits, penalties, probabilities
        return max(1, min(samples, MAX_GROUP, SAMPLES_MEMORY // per_row))

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
        options = _Options(
            check_sampling(temperature, top_k, top_p, frequency_penalty, presence_penalty),
            check_stop(stop), check_logprobs(logprobs), bool(stop_at_eos))  # fmt: skip
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        base = check_seed(seed)
        ids = self._prompt_ids(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        return ids or self._start_ids(), n, options, base, samples

    def _prompt_ids(self, prompt):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.encode(prompt)

    def _check_ids(self, ids):
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

    def _prefill(self, ids):
        """Bring the cache to hold `ids`, reusing the longest common prefix; the last logits."""
        if len(ids) > self.n_ctx:
            ids = ids[-self.n_ctx :]
        reuse = 0
        for a, b in zip(self._context, ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(ids) - 1)  # at least one position must run to give logits
        self._cache.length = reuse
        self._context = ids[:reuse]
        logits = self.gpt.forward(np.array([ids[reuse:]]), self._cache)
        self._context = list(ids)
        return logits

    def _chunks(self, ids, n, options, base, samples):
        """Every sample's chunks, running the samples in groups of bounded memory."""
        group = self.sample_groups(samples, min(self.n_ctx, len(ids) + n))
        for first in range(0, samples, group):
            rows = [_Row(k, np.random.default_rng(base + k), self, options)
                    for k in range(first, min(first + group, samples))]
            yield from self._group_chunks(ids, n, options, rows)

    def _group_chunks(self, ids, n, options, rows):
        """The chunks of one group of samples generated together."""
        with_logprobs = options.logprobs is not None
        for step in self._steps(ids, n, options, rows):
            for row, token, logits in step:
                if token is None:  # <|endoftext|>
                    yield row.last_chunk("stop", with_logprobs)
                    continue
                lp = top = None
                if with_logprobs:
                    lp, top = self._logprobs(logits, token, options.logprobs)
                text = row.add(token)
                yield Chunk(row.index, text, [token], None if lp is None else [lp],
                            None if top is None else [top], None)
                if row.stop.stopped:
                    yield row.last_chunk("stop", with_logprobs)
        for row in rows:
            if row.finish is None:
                yield row.last_chunk("length", with_logprobs)

    def _logprobs(self, logits, token, k):
        """The chosen token's log-probability and the k likeliest tokens' text -> log-probability,
        from the raw logits (temperature 1, no penalties)."""
        lp = sampling.log_softmax(logits)
        return float(lp[token]), {self.token_text(int(j)): float(lp[j])
                                  for j in sampling.top_ids(lp, k)}

    def token_text(self, token):
        """One token's text; a token that is not whole UTF-8 (part of a character) as
        "bytes:\\xe2\\x80" (OpenAI's convention), so every token has a distinct text."""
        decode_bytes = getattr(self.tokenizer, "decode_bytes", None)
        if decode_bytes is None:
            return self.decode([token])
        raw = decode_bytes([token])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _steps(self, ids, n, options, rows):
        """Generate up to n tokens for each row, all rows in one batch. Yield per step a list of
        (row, token, raw logits [n_vocab]) for the rows that drew a token, or (row, None, None)
        for a row that drew <|endoftext|> (it ends there). A row whose .finish is set (here, or
        by the caller for a stop string) draws no more."""
        eot = getattr(self.tokenizer, "eot_id", None) if options.stop_at_eos else None
        if n == 0:
            return
        logits = self._prefill(ids)  # [1, V]
        if len(rows) > 1:
            # The prompt ran once; its cache is copied into one row per sample, and every step
            # then runs all rows together, sharing each read of the weights.
            cache = self._cache.expand(len(rows))
            logits = np.repeat(logits, len(rows), axis=0)  # [B, V]
            contexts = [list(self._context) for _ in rows]
        for step in range(n):
            events, tokens = [], np.zeros(len(rows), dtype=np.int64)
            for r, row in enumerate(rows):
                if row.finish is not None:
                    continue  # an ended row still runs (its slot in the batch); output ignored
                token = row.choose(logits[r], options.sampling)
                if token == eot:
                    row.finish = "stop"
                    events.append((row, None, None))
                    continue
                tokens[r] = token
                events.append((row, token, logits[r]))
            yield events
            if step == n - 1 or all(row.finish is not None for row in rows):
                return
            if len(rows) == 1:
                logits = self._advance(int(tokens[0]))
                continue
            for context, token in zip(contexts, tokens):
                context.append(int(token))
            if cache.length == self.n_ctx:  # slide every row's window, as _advance does
                kept = np.array([c[-self.window_keep :] for c in contexts])
                cache.length = 0
                logits = self.gpt.forward(kept, cache)
            else:
                logits = self.gpt.forward(tokens[:, None], cache)

    def _advance(self, token):
        """Feed one new token; past n_ctx, slide the window and re-prefill what is kept."""
        if self._cache.length == self.n_ctx:
            kept = (self._context + [token])[-self.window_keep :]
            self._cache.length, self._context = 0, []
            return self._prefill(kept)
        logits = self.gpt.forward(np.array([[token]]), self._cache)
        self._context.append(token)
        return logits


def load(name="124M", weights_dir=None, base_url=None, source=None):
    """A Model from a GPT-2 size ('124M', 'gpt2-medium', ...), a bundled model name, or a folder
    (see `resolve`). Anything wrong in the folder is a ModelError naming it, the cause chained."""
    return load_folder(resolve(name, weights_dir, base_url, source))


def load_folder(folder):
    """A Model from a model folder. Everything is checked before anything is built from it: the
    hparams against the checkpoint's own tensors, the tokenizer against the vocabulary size.
    Anything wrong is a ModelError naming the folder or the file, the cause chained."""
    folder = Path(folder)
    try:
        hparams, tokenizer, params = read_folder(folder)
        gpt = GPT(params, hparams, release=tf_checkpoint.release)
    except ModelError:
        raise
    except (PicogptError, OSError, ValueError) as e:
        raise ModelError(f"{folder}: {e}") from e
    return Model(gpt, tokenizer, folder)
