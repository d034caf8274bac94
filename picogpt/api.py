"""`Model`: a GPT-2 engine tied to its tokenizer, with a KV cache it remembers between calls.

`picogpt.load(name)` builds one (picogpt/loading.py); this module is what it can do: logits,
generation (batched, streamed), and the sliding-window log-likelihood of a text."""

import math
from typing import NamedTuple

import numpy as np

from picogpt import sampling


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
                        stop_at_eos=True, samples=1):
        """The n new ids (fewer if <|endoftext|> ends them); a list of such lists if samples > 1."""
        rows = [[] for _ in range(samples if isinstance(samples, int) else 1)]
        for step in self._steps(ids, n, temperature, top_k, top_p, seed, stop_at_eos, samples):
            for row, token in zip(rows, step):
                if token is not None:
                    row.append(token)
        return rows[0] if samples == 1 else rows

    def generate(self, prompt, n=40, temperature=1.0, top_k=40, top_p=None, seed=None,
                 stop_at_eos=True, samples=1):
        """The continuation of `prompt` (the prompt itself not included); a list if samples > 1."""
        out = self.generate_tokens(self._prompt_ids(prompt), n, temperature, top_k, top_p, seed,
                                   stop_at_eos, samples)  # fmt: skip
        return self.decode(out) if samples == 1 else [self.decode(row) for row in out]

    def stream(self, prompt, n=40, temperature=1.0, top_k=40, top_p=None, seed=None,
               stop_at_eos=True):
        """Yield the continuation of `prompt` as text pieces, as each token is generated.
        A character split across tokens is held back until complete."""
        decoder = self.tokenizer.decoder()
        steps = self._steps(self._prompt_ids(prompt), n, temperature, top_k, top_p, seed,
                            stop_at_eos, 1)  # fmt: skip
        for (token,) in steps:
            if token is not None:
                piece = decoder.feed(token)
                if piece:
                    yield piece
        tail = decoder.flush()
        if tail:
            yield tail

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

    def _steps(self, ids, n, temperature, top_k, top_p, seed, stop_at_eos, samples):
        """Yield, per step, a tuple with each row's new id (None once a row has ended)."""
        sampling.check_options(temperature, top_k, top_p)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        ids = self._check_ids(ids) or self._start_ids()
        if n == 0:
            return
        rng = np.random.default_rng(seed)
        eot = getattr(self.tokenizer, "eot_id", None) if stop_at_eos else None
        logits = self._prefill(ids)
        if samples == 1:
            for step in range(n):
                token = int(sampling.sample(logits, rng, temperature, top_k, top_p)[0])
                if token == eot:
                    return
                yield (token,)
                if step == n - 1:
                    return
                logits = self._advance(token)
            return
        # Batched: the prompt ran once; its cache is copied into one row per sample, and every
        # step then runs all rows together, sharing each read of the weights.
        cache = self._cache.expand(samples)
        logits = np.repeat(logits, samples, axis=0)
        contexts = [list(self._context) for _ in range(samples)]
        live = [True] * samples
        for step in range(n):
            tokens = sampling.sample(logits, rng, temperature, top_k, top_p)
            for r, token in enumerate(tokens):
                if token == eot:
                    live[r] = False
            yield tuple(int(t) if alive else None for t, alive in zip(tokens, live))
            if step == n - 1 or not any(live):
                return
            for context, token in zip(contexts, tokens):
                context.append(int(token))
            if cache.length == self.n_ctx:
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
