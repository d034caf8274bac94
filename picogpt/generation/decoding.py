"""The decode loop: a prompt prefilled into the KV cache (reusing what it already holds), then a
token per step for each sample, the samples of a group in one batch, the window sliding past
n_ctx; each token's text released through its sample's stop strings, with its log-probabilities.
`Model` checks the options (options.py, stops.py) and calls `chunks`."""

from typing import NamedTuple, Optional

import numpy as np

from picogpt.errors import ModelError
from picogpt.generation import sampling
from picogpt.generation.stops import StopText

# Batched samples run in groups whose KV caches together stay within this many bytes (and at
# most MAX_GROUP rows): samples=10**4 then needs the memory of one group, not of 10**4 rows.
SAMPLES_MEMORY = 1 << 30
MAX_GROUP = 256


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


class Row:
    """One sample being generated: its random draws, its penalty counts, its text."""

    def __init__(self, index, rng, n_vocab, tokenizer, options):
        self.index, self.rng = index, rng
        s = options.sampling
        penalized = s.frequency_penalty != 0 or s.presence_penalty != 0
        self.counts = np.zeros(n_vocab, np.int64) if penalized else None
        self.decoder = tokenizer.decoder()
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


def forward(gpt, ids, cache, folder=None, all_logits=False):
    """gpt.forward(ids, cache, all_logits), its logits checked: weights that give a NaN or an
    infinity (a damaged file, data read in the wrong byte order) are a ModelError naming the
    folder, here, once, instead of NumPy's warnings and a failure deep in sampling."""
    with np.errstate(all="ignore"):  # the error below says what the warnings would
        logits = gpt.forward(ids, cache, all_logits)
        # min and max propagate a NaN and reach either infinity: two passes, no temporary.
        finite = np.isfinite(logits.max()) and np.isfinite(logits.min())
    if not finite:
        where = folder if folder is not None else "the model"
        raise ModelError(f"{where}: its weights give logits that are not finite numbers (NaN or "
                         f"infinity), so they look damaged: `picogpt verify {where}` checks its "
                         "files")
    return logits


class KVContext:
    """A network's KV cache and the ids whose keys and values it holds. Each prefill reuses the
    longest prefix the cache already holds; past n_ctx the window slides: the newest
    window_keep ids are kept and prefilled again."""

    def __init__(self, gpt, folder=None):
        self.gpt, self.folder = gpt, folder  # the folder names the model in its errors
        self.n_ctx = gpt.n_ctx
        # Past n_ctx, generation keeps this many of the newest tokens and re-prefills them.
        self.window_keep = max(1, gpt.n_ctx * 3 // 4)
        self.cache = gpt.new_cache()
        self.ids = []  # the ids whose keys and values self.cache holds

    def reset(self):
        """Forget the context: the next prefill runs its whole input."""
        self.cache.length = 0
        self.ids = []

    def prefill(self, ids):
        """Bring the cache to hold `ids`, reusing the longest common prefix; the last logits."""
        if len(ids) > self.n_ctx:
            ids = ids[-self.n_ctx :]
        reuse = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(ids) - 1)  # at least one position must run to give logits
        self.cache.length = reuse
        self.ids = ids[:reuse]
        logits = forward(self.gpt, np.array([ids[reuse:]]), self.cache, self.folder)
        self.ids = list(ids)
        return logits

    def advance(self, token):
        """Feed one new token; past n_ctx, slide the window and re-prefill what is kept."""
        if self.cache.length == self.n_ctx:
            kept = (self.ids + [token])[-self.window_keep :]
            self.cache.length, self.ids = 0, []
            return self.prefill(kept)
        logits = forward(self.gpt, np.array([[token]]), self.cache, self.folder)
        self.ids.append(token)
        return logits


def sample_groups(hparams, samples, positions):
    """How many samples run together in one batch: as many as keep their KV cache within
    SAMPLES_MEMORY bytes (for `positions` positions each) and MAX_GROUP rows; at least one.
    A larger `samples` runs group after group, so memory stays bounded."""
    per_row = 2 * hparams["n_layer"] * positions * hparams["n_embd"] * 4
    per_row += 8 * hparams["n_vocab"] * 8  # logits, penalties, probabilities
    return max(1, min(samples, MAX_GROUP, SAMPLES_MEMORY // per_row))


def chunks(kv, tokenizer, ids, n, options, base, samples):
    """Every sample's chunks, running the samples in groups of bounded memory."""
    group = sample_groups(kv.gpt.hparams, samples, min(kv.n_ctx, len(ids) + n))
    for first in range(0, samples, group):
        rows = [Row(k, np.random.default_rng(base + k), kv.gpt.hparams["n_vocab"], tokenizer,
                    options)
                for k in range(first, min(first + group, samples))]
        yield from _group_chunks(kv, tokenizer, ids, n, options, rows)


def _group_chunks(kv, tokenizer, ids, n, options, rows):
    """The chunks of one group of samples generated together."""
    with_logprobs = options.logprobs is not None
    for step in _steps(kv, tokenizer, ids, n, options, rows):
        for row, token, logits in step:
            if token is None:  # <|endoftext|>
                yield row.last_chunk("stop", with_logprobs)
                continue
            lp = top = None
            if with_logprobs:
                lp, top = _logprobs(tokenizer, logits, token, options.logprobs)
            text = row.add(token)
            yield Chunk(row.index, text, [token], None if lp is None else [lp],
                        None if top is None else [top], None)
            if row.stop.stopped:
                yield row.last_chunk("stop", with_logprobs)
    for row in rows:
        if row.finish is None:
            yield row.last_chunk("length", with_logprobs)


def _steps(kv, tokenizer, ids, n, options, rows):
    """Generate up to n tokens for each row, all rows in one batch. Yield per step a list of
    (row, token, raw logits [n_vocab]) for the rows that drew a token, or (row, None, None)
    for a row that drew <|endoftext|> (it ends there). A row whose .finish is set (here, or
    by the caller for a stop string) draws no more."""
    eot = getattr(tokenizer, "eot_id", None) if options.stop_at_eos else None
    if n == 0:
        return
    logits = kv.prefill(ids)  # [1, V]
    if len(rows) > 1:
        # The prompt ran once; its cache is copied into one row per sample, and every step
        # then runs all rows together, sharing each read of the weights.
        cache = kv.cache.expand(len(rows))
        logits = np.repeat(logits, len(rows), axis=0)  # [B, V]
        contexts = [list(kv.ids) for _ in rows]
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
            logits = kv.advance(int(tokens[0]))
            continue
        for context, token in zip(contexts, tokens):
            context.append(int(token))
        if cache.length == kv.n_ctx:  # slide every row's window, as KVContext.advance does
            kept = np.array([c[-kv.window_keep :] for c in contexts])
            cache.length = 0
            logits = forward(kv.gpt, kept, cache, kv.folder)
        else:
            logits = forward(kv.gpt, tokens[:, None], cache, kv.folder)


def _logprobs(tokenizer, logits, token, k):
    """The chosen token's log-probability and the k likeliest tokens' text -> log-probability,
    from the raw logits (temperature 1, no penalties)."""
    lp = sampling.log_softmax(logits)
    return float(lp[token]), {token_text(tokenizer, int(j)): float(lp[j])
                              for j in sampling.top_ids(lp, k)}


def token_text(tokenizer, token):
    """One token's text; a token that is not whole UTF-8 (part of a character) as
    "bytes:\\xe2\\x80" (OpenAI's convention), so every token has a distinct text."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is None:
        return tokenizer.decode([token])
    raw = decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
