"""`picogpt serve`: OpenAI's HTTP API for one model, standard library only, and the page at `/`
that shows each generated token shaded by its probability, with the alternatives the model weighed.

    GET  /                       the page (picogpt/serve/page/index.html)
    GET  /v1/models              the one model served
    POST /v1/completions         prompt -> text, OpenAI's request and response shapes
    POST /v1/chat/completions    messages -> the assistant's reply, as `picogpt chat` would say it

How it behaves:
- One generation runs at a time (a Model has one KV cache); the others wait in arrival order
  (`FifoLock`). `n` > 1 runs as one batch. A request that extends the previous context (the next
  chat turn) reuses the KV cache: `Model` keeps the longest common prefix.
- Streams are server-sent events, `data: {json}\\n\\n` per chunk, ending with `data: [DONE]`. When a
  client leaves mid-stream (a write fails, or its socket reads as closed) the generation is closed
  before the next token and the next request in line starts.
- Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a body
  that is not a JSON object, a field of the wrong type or out of range; 413 for a body over 1 MB
  (refused from Content-Length, before any of it is read; chunked bodies are counted as they come);
  401 for a missing or wrong key when the server has one; 404 for an unknown path. Never a traceback
  to the client; an unexpected failure is a 500 and the server goes on.
- Safety: it binds 127.0.0.1 unless told otherwise; it serves files only from the package's page
  folder, by their listed names (no path ever reaches the file system); no CORS headers unless
  asked for; POST bodies must say `Content-Type: application/json`, so another site's page cannot
  post to it without a CORS preflight; on a loopback address it answers only requests whose Host
  is a loopback name (a rebinding DNS name cannot reach it from a browser).
- One log line per request: time, client, method, path, status, tokens generated, seconds.
"""

import hmac
import json
import math
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from picogpt import files
from picogpt.errors import PicogptError
from picogpt.generation.options import MAX_LOGPROBS
from picogpt.generation.stops import MAX_STOP_CHARS
from picogpt.generation.stops import MAX_STOPS as MAX_STOP  # a chat's turn end is one of them

PAGE = Path(__file__).parent / "page"
BODY_LIMIT = files.MB  # bytes of a request body
PAGE_FILE_LIMIT = 4 * files.MB
MAX_TOKENS = 4096  # per request and sample: a bound on how long one request may hold the model
MAX_N = 16  # samples per prompt (one batch)
MAX_PROMPTS = 16  # prompts per completions request
MAX_MESSAGES = 1024
IDLE_TIMEOUT = 60.0  # seconds a connection may sit idle or half-sent
MAX_CONNECTIONS = 64  # open at once (each a thread, most waiting their turn at the model)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".png": "image/png",
                 ".svg": "image/svg+xml", ".ico": "image/x-icon"}


class APIError(PicogptError):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code
        self.kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _invalid(param, message, code="invalid_value"):
    return APIError(400, message, param=param, code=code)


# --- one generation at a time, in arrival order -------------------------------------------------

class FifoLock:
    """A lock that hands itself to waiters in the order they asked (threading.Lock promises no
    order, so under load a request could wait for ever). A context manager."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._busy = False
        self._waiters = deque()  # one Event per waiting thread, oldest first

    def acquire(self):
        with self._mutex:
            if not self._busy:
                self._busy = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() hands the lock over: _busy stays True for us

    def release(self):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._busy = False

    @property
    def waiting(self):
        return len(self._waiters)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# --- request fields -------------------------------------------------------------------------------

def _only(body, allowed):
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")


def _integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"{name} must be an integer, got {json.dumps(value)[:40]}",
                       code="invalid_type")
    if not low <= value <= high:
        raise _invalid(name, f"{name} must be in [{low}, {high}], got {value}")
    return value


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"{name} must be a number, got {json.dumps(value)[:40]}",
                       code="invalid_type")
    value = float(value)
    above_low = low < value if low_open else low <= value
    if not (math.isfinite(value) and above_low and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(name, f"{name} must be in {interval}, got {value:g}")
    return value


def _boolean(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(name, f"{name} must be true or false, got {json.dumps(value)[:40]}",
                       code="invalid_type")
    return value


def _string(body, name, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _invalid(name, f"{name} must be a string", code="invalid_type")
    return value


def _stop(body):
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop", "stop must be a string or a list of strings", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise _invalid("stop", f"stop takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise _invalid("stop", f"a stop string must have 1 to {MAX_STOP_CHARS} characters")
    return stops or None


def _stream_options(body, stream):
    value = body.get("stream_options")
    if value is None:
        return False
    if not stream:
        raise _invalid("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(value, dict):
        raise _invalid("stream_options", "stream_options must be an object", code="invalid_type")
    _only({f"stream_options.{k}": v for k, v in value.items()}, ("stream_options.include_usage",))
    return _boolean(value, "include_usage")


SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
                   "stream_options", "stop", "presence_penalty", "frequency_penalty", "seed",
                   "user")


def _sampling(body, default_max_tokens, max_tokens_name="max_tokens"):
    """The options every generation request shares, checked, as Model.complete's keywords."""
    _string(body, "model")
    _string(body, "user")
    return dict(
        n=_integer(body, max_tokens_name, default_max_tokens, 0, MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", None, 0, 1, low_open=True),
        top_k=_integer(body, "top_k", 40, 0, 1 << 31),
        stop=_stop(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        seed=_integer(body, "seed", None, 0, (1 << 64) - 1),
    )


# --- the API over one model -----------------------------------------------------------------------

class Stats:
    """What one request did, for its log line."""

    def __init__(self):
        self.tokens = 0


class Service:
    """OpenAI's completions and chat completions over one `Model`: the checks, the generation
    lock, and the response shapes. Knows nothing of HTTP; the handler below speaks that."""

    def __init__(self, model, name):
        self.model, self.name = model, name
        self.lock = FifoLock()
        self.created = int(time.time())
        self.n_ctx = model.hparams["n_ctx"]

    # --- models

    def model_card(self):
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "picogpt", "context_length": self.n_ctx}

    def models(self):
        return {"object": "list", "data": [self.model_card()]}

    def get_model(self, name):
        if name != self.name:
            raise APIError(404, f"The model '{name}' does not exist (this server has "
                                f"'{self.name}')", param="model", code="model_not_found")
        return self.model_card()

    # --- completions

    COMPLETION_FIELDS = SAMPLING_FIELDS + ("prompt", "logprobs", "echo", "best_of", "suffix",
                                           "logit_bias")

    def completion_request(self, body):
        """The checked request: a dict the generation below reads. Raises APIError (400)."""
        _only(body, self.COMPLETION_FIELDS)
        options = _sampling(body, 16)
        n = _integer(body, "n", 1, 1, MAX_N)
        stream = _boolean(body, "stream")
        request = dict(
            prompts=self._prompts(body.get("prompt")), n=n, stream=stream,
            include_usage=_stream_options(body, stream), echo=_boolean(body, "echo"),
            logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS), options=options)
        best_of = _integer(body, "best_of", n, 1, MAX_N)
        if best_of != n:
            raise _invalid("best_of", "best_of is not supported (only best_of == n)")
        if _string(body, "suffix"):
            raise _invalid("suffix", "suffix (insertion) is not supported")
        if body.get("logit_bias"):
            raise _invalid("logit_bias", "logit_bias is not supported")
        if request["echo"] and request["logprobs"] is not None:
            for _, ids in request["prompts"]:
                if len(ids) > self.n_ctx:
                    raise _invalid("prompt", f"echo with logprobs takes prompts of at most "
                                             f"{self.n_ctx} tokens, got {len(ids)}")
        return request

    def _prompts(self, value):
        """[(text, ids)] for `prompt`: a string, a list of strings, a list of token ids, or a
        list of lists of token ids, as OpenAI takes it."""
        if value is None:
            value = ""
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(_is_id(v) for v in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _invalid("prompt", "prompt must be a string, a list of strings, or a list of "
                                     "token ids", code="invalid_type")
        if len(value) > MAX_PROMPTS:
            raise _invalid("prompt", f"prompt takes at most {MAX_PROMPTS} prompts, got "
                                     f"{len(value)}")
        prompts = []
        for item in value:
            if isinstance(item, str):
                try:
                    ids = self.model.encode(item)
                except ValueError as e:  # a character-level model that never saw a character
                    raise _invalid("prompt", str(e)) from None
                prompts.append((item, ids))
            elif isinstance(item, list) and all(_is_id(v) for v in item):
                n_vocab = self.model.hparams["n_vocab"]
                bad = [i for i in item if not 0 <= i < n_vocab]
                if bad:
                    raise _invalid("prompt", f"token id {bad[0]} is outside the vocabulary "
                                             f"(0..{n_vocab - 1})")
                prompts.append((self.model.decode(item), list(item)))
            else:
                raise _invalid("prompt", "each prompt must be a string or a list of token ids",
                               code="invalid_type")
        return prompts

    def completions(self, request, stats):
        """The response to a checked non-streaming completions request."""
        options, n = request["options"], request["n"]
        with self.lock:
            results = []
            for text, ids in request["prompts"]:
                out = self._complete(ids, options, request["logprobs"], n)
                prompt_lp = None
                if request["echo"] and request["logprobs"] is not None:
                    prompt_lp = self._prompt_logprobs(ids, request)
                results.append((text, out, prompt_lp))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, (text, out, prompt_lp) in enumerate(results):
            prompt_tokens += out[0].prompt_tokens
            for k, c in enumerate(out):
                completion_tokens += len(c.tokens)
                logprobs = None
                if request["logprobs"] is not None:
                    logprobs = self._text_logprobs(c.tokens, c.token_logprobs,
                                                   c.top_logprobs,
                                                   TextOffsets(self.model, len(text)), prompt_lp)
                choices.append({"text": (text if request["echo"] else "") + c.text,
                                "index": p * n + k, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
        stats.tokens = completion_tokens
        return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    def stream_completions(self, request, stats):
        """The chunks (dicts) of a checked streaming completions request; closing the generator
        stops the generation and frees the model for the next request."""
        cid, created, n = _new_id("cmpl"), int(time.time()), request["n"]
        options = request["options"]

        def chunk(index, text, logprobs=None, finish_reason=None):
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": self.name, "choices": [{"text": text, "index": index,
                                                     "logprobs": logprobs,
                                                     "finish_reason": finish_reason}]}

        # Model.stream_completion checks its options when called, before any work: a problem
        # is a 400 here, not an error event after the 200.
        streams = [self._stream(ids, options, request["logprobs"], n)
                   for _, ids in request["prompts"]]
        return self._completion_events(request, streams, chunk, stats)

    def _completion_events(self, request, streams, chunk, stats):
        n, want_lp = request["n"], request["logprobs"] is not None
        prompt_tokens = 0
        with self.lock:
            for p, ((text, ids), stream) in enumerate(zip(request["prompts"], streams)):
                offsets = [TextOffsets(self.model, len(text)) for _ in range(n)]
                if request["echo"]:
                    lp = self._prompt_logprobs(ids, request) if want_lp else None
                    for k in range(n):
                        yield chunk(p * n + k, text, lp)
                try:
                    for c in stream:
                        stats.tokens += len(c.tokens)
                        logprobs = None
                        if want_lp and c.tokens:
                            logprobs = self._text_logprobs(c.tokens, c.token_logprobs,
                                                           c.top_logprobs, offsets[c.index])
                        if c.text or logprobs or c.finish_reason:
                            yield chunk(p * n + c.index, c.text, logprobs, c.finish_reason)
                finally:
                    stream.close()
                prompt_tokens += max(len(ids), 1)  # an empty prompt is <|endoftext|>
        if request["include_usage"]:
            first = chunk(0, "")
            yield dict(first, choices=[], usage=_usage(prompt_tokens, stats.tokens))

    def _complete(self, ids, options, logprobs, n):
        try:
            out = self.model.complete(ids, **options, logprobs=logprobs, samples=n)
        except ValueError as e:  # an option the checks above let through: say, as a 400
            raise APIError(400, str(e)) from None
        return [out] if n == 1 else out

    def _stream(self, ids, options, logprobs, n):
        try:
            return self.model.stream_completion(ids, **options, logprobs=logprobs, samples=n)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _text_logprobs(self, tokens, token_logprobs, top_logprobs, offsets, prompt=None):
        """OpenAI's completions `logprobs`: tokens (their text), token_logprobs, top_logprobs,
        text_offset (from `offsets`, a TextOffsets); `prompt`'s lists first (echo)."""
        out = {"tokens": [self.model.token_text(t) for t in tokens],
               "token_logprobs": list(token_logprobs or []),
               "top_logprobs": list(top_logprobs or []), "text_offset": offsets.of(tokens)}
        if prompt is not None:
            out = {key: prompt[key] + out[key] for key in out}
        return out

    def _prompt_logprobs(self, ids, request):
        """The echoed prompt's logprobs: each token's log-probability given the ones before it
        (the first has none), from one forward pass over the prompt."""
        if not ids:  # an empty prompt has no tokens to score
            return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        token_lp, top_lp = [None], [None]
        k = request["logprobs"]
        if len(ids) > 1:
            logits = self.model.logits(ids[:-1]).astype(np.float64)  # [T-1, n_vocab]
            peak = logits.max(axis=1, keepdims=True)
            lsm = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
            for row, token in zip(lsm, ids[1:]):
                token_lp.append(float(row[token]))
                top = np.argsort(-row, kind="stable")[:k]
                top_lp.append({self.model.token_text(int(t)): float(row[t]) for t in top})
        return {"tokens": [self.model.token_text(t) for t in ids], "token_logprobs": token_lp,
                "top_logprobs": top_lp, "text_offset": TextOffsets(self.model, 0).of(ids)}

    # --- chat completions

    CHAT_FIELDS = SAMPLING_FIELDS + ("messages", "max_completion_tokens", "logprobs",
                                     "top_logprobs")

    def chat_request(self, body):
        _only(body, self.CHAT_FIELDS)
        default = min(60, self.n_ctx // 2)  # `picogpt chat`'s reply length, in a tiny context
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        options = _sampling(body, default, name)
        if options["n"] >= self.n_ctx:
            raise _invalid(name, f"{name} {options['n']} leaves no room for the conversation "
                                 f"(the context is {self.n_ctx} tokens)")
        n = _integer(body, "n", 1, 1, MAX_N)
        stream = _boolean(body, "stream")
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not logprobs:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
        messages = _messages(body.get("messages"))
        from picogpt.generation import chat

        try:
            prompt = chat.chat_prompt(self.model, messages, options["n"])
        except ValueError as e:  # a character-level model that never saw a character
            raise _invalid("messages", str(e)) from None
        stops = [s for s in options["stop"] or [] if s != chat.REPLY_STOP]
        if len(stops) >= MAX_STOP:
            raise _invalid("stop", f"a chat takes at most {MAX_STOP - 1} stop strings (its turn "
                                   "ends at a newline too)")
        options["stop"] = [chat.REPLY_STOP, *stops]
        return dict(prompt=prompt, ids=self.model.encode(prompt), n=n, stream=stream,
                    include_usage=_stream_options(body, stream),
                    logprobs=(top or 0) if logprobs else None, options=options)

    def chat_completions(self, request, stats):
        n = request["n"]
        with self.lock:
            out = self._complete(request["ids"], request["options"], request["logprobs"], n)
        choices = []
        for k, c in enumerate(out):
            logprobs = None
            if request["logprobs"] is not None:
                logprobs = {"content": self._chat_logprobs(c.tokens, c.token_logprobs,
                                                           c.top_logprobs, request["logprobs"]),
                            "refusal": None}
            choices.append({"index": k, "message": {"role": "assistant",
                                                    "content": c.text.lstrip(),
                                                    "refusal": None},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        stats.tokens = sum(len(c.tokens) for c in out)
        return {"id": _new_id("chatcmpl"), "object": "chat.completion",
                "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": _usage(out[0].prompt_tokens, stats.tokens)}

    def stream_chat_completions(self, request, stats):
        cid, created, n = _new_id("chatcmpl"), int(time.time()), request["n"]

        def chunk(index, delta, logprobs=None, finish_reason=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.name, "choices": [{"index": index, "delta": delta,
                                                     "logprobs": logprobs,
                                                     "finish_reason": finish_reason}]}

        stream = self._stream(request["ids"], request["options"], request["logprobs"], n)
        return self._chat_events(request, stream, chunk, stats)

    def _chat_events(self, request, stream, chunk, stats):
        n = request["n"]
        with self.lock:
            for k in range(n):
                yield chunk(k, {"role": "assistant", "content": ""})
            started = [False] * n  # the reply's leading space is not part of it
            try:
                for c in stream:
                    stats.tokens += len(c.tokens)
                    text = c.text if started[c.index] else c.text.lstrip()
                    started[c.index] = started[c.index] or bool(text)
                    logprobs = None
                    if request["logprobs"] is not None and c.tokens:
                        logprobs = {"content": self._chat_logprobs(
                            c.tokens, c.token_logprobs, c.top_logprobs, request["logprobs"]),
                            "refusal": None}
                    if text or logprobs:
                        yield chunk(c.index, {"content": text}, logprobs)
                    if c.finish_reason:
                        yield chunk(c.index, {}, None, c.finish_reason)
            finally:
                stream.close()
        if request["include_usage"]:
            first = chunk(0, {})
            yield dict(first, choices=[], usage=_usage(len(request["ids"]), stats.tokens))

    def _chat_logprobs(self, tokens, token_logprobs, top_logprobs, k):
        """OpenAI's chat `logprobs.content`: per token its text, logprob, UTF-8 bytes and the k
        likeliest alternatives."""
        content = []
        for token, lp, top in zip(tokens, token_logprobs, top_logprobs):
            top = sorted(top.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": self.model.token_text(token), "logprob": lp,
                            "bytes": list(self._token_bytes(token)),
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes_of(t)}
                                             for t, v in top]})
        return content

    def _token_bytes(self, token):
        decode_bytes = getattr(self.model.tokenizer, "decode_bytes", None)
        if decode_bytes is not None:
            return decode_bytes([token])
        return self.model.decode([token]).encode("utf-8")


def _messages(value):
    """OpenAI's chat `messages`, checked: [(role, text)]."""
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "messages must be a non-empty list", code="invalid_type")
    if len(value) > MAX_MESSAGES:
        raise _invalid("messages", f"messages takes at most {MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, f"{where} must be an object", code="invalid_type")
        _only({f"{where}.{k}": v for k, v in message.items()},
              (f"{where}.role", f"{where}.content", f"{where}.name"))
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _invalid(f"{where}.role", f"{where}.role must be system, developer, user or "
                                            f"assistant, got {json.dumps(role)[:40]}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones mean anything to GPT-2
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise _invalid(f"{where}.content", f"{where}.content parts must be "
                                                   '{"type": "text", "text": "..."}')
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _invalid(f"{where}.content", f"{where}.content must be a string",
                           code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class TextOffsets:
    """Where each generated token's text begins, in characters from the start of the prompt:
    a token that only completes a character split across tokens begins where that character
    does."""

    def __init__(self, model, start):
        self.decoder, self.at = model.tokenizer.decoder(), start

    def of(self, tokens):
        out = []
        for token in tokens:
            out.append(self.at)
            self.at += len(self.decoder.feed(token))
        return out


def _bytes_of(token_text):
    """The UTF-8 bytes of a token's text as Model.token_text gives it ("bytes:\\xe2\\x80" for
    part of a character)."""
    if token_text.startswith("bytes:"):
        try:
            return list(bytes.fromhex(token_text[len("bytes:"):].replace("\\x", "")))
        except ValueError:  # a token whose text really begins with "bytes:"
            pass
    return list(token_text.encode("utf-8"))


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _new_id(prefix):
    return f"{prefix}-{secrets.token_hex(12)}"


def parse_json(data):
    """A request body as a JSON object; anything else is a 400."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8 (byte offset {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply") from None
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


# --- HTTP -----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams
    server_version = "picogpt"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    # --- routing

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def _handle(self, method):
        self._started, self._status, self._stats = time.monotonic(), None, Stats()
        self._in_request, self._body_read = True, False
        try:
            self._route(method, urlsplit(self.path).path)
        except APIError as e:
            if not self._body_read and self._has_body():
                self.close_connection = True  # its unread body would be read as a request
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            self._status = self._status or 499  # the client left
        except Exception:  # a bug of ours: the client gets a 500, the operator the traceback
            self.app.log(f"internal error on {method} {self.path}:\n{traceback.format_exc()}")
            self.close_connection = True
            self._send_error(APIError(500, "internal server error", code="internal_error"))
        finally:
            self._in_request = False
            self._log_line()

    def _route(self, method, path):
        app = self.app
        if not self._host_allowed():
            raise APIError(403, f"Host {self.headers.get('Host')!r} is not allowed: this server "
                                "answers loopback names only", code="host_not_allowed")
        if method == "OPTIONS":
            if not app.cors:
                raise APIError(405, "OPTIONS is only answered with --cors",
                               code="method_not_allowed")
            return self._send(204, b"", None)
        if path.startswith("/v1/"):
            self._authorize()
        routes = {"/v1/models": ("GET",), "/v1/completions": ("POST",),
                  "/v1/chat/completions": ("POST",)}
        if method not in ("GET", "POST"):
            raise APIError(405, f"{method} is not allowed here", code="method_not_allowed")
        if path.startswith("/v1/models/") and method == "GET":
            return self._send_json(200, app.service.get_model(path[len("/v1/models/"):]))
        if path in routes and method not in routes[path]:
            raise APIError(405, f"{method} is not allowed on {path} (use {routes[path][0]})",
                           code="method_not_allowed")
        if path == "/v1/models":
            return self._send_json(200, app.service.models())
        if path == "/v1/completions":
            request = app.service.completion_request(self._json_body())
            if request["stream"]:
                return self._send_events(app.service.stream_completions(request, self._stats))
            return self._send_json(200, app.service.completions(request, self._stats))
        if path == "/v1/chat/completions":
            request = app.service.chat_request(self._json_body())
            if request["stream"]:
                return self._send_events(app.service.stream_chat_completions(request,
                                                                             self._stats))
            return self._send_json(200, app.service.chat_completions(request, self._stats))
        if method == "GET" and path in app.page_files:
            return self._send_file(app.page_files[path])
        raise APIError(404, f"Invalid URL ({method} {path})", code="not_found")

    # --- checks

    def _host_allowed(self):
        if not self.app.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in LOOPBACK_NAMES

    def _authorize(self):
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key",
                           kind="authentication_error")

    def _json_body(self):
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self._read_body()  # read first: the connection stays usable after the error
        if kind != "application/json":
            raise APIError(415, "the body must be JSON, sent with Content-Type: "
                                "application/json", code="unsupported_media_type")
        return parse_json(body)

    def _has_body(self):
        length = (self.headers.get("Content-Length") or "0").strip()
        return length != "0" or "Transfer-Encoding" in self.headers

    def _read_body(self):
        """The request body, at most BODY_LIMIT bytes: refused from Content-Length before any of
        it is read, and counted chunk by chunk for a chunked body."""
        self._body_read = True  # from here on, any error closes the connection or reads it all
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            self.close_connection = True
            raise APIError(411, "a body needs a Content-Length (or chunked encoding)",
                           code="length_required")
        length = lengths.pop().strip()
        if lengths or not length.isdigit():
            self.close_connection = True
            raise APIError(400, "the Content-Length header is malformed")
        size = int(length)
        if size > BODY_LIMIT:
            self.close_connection = True  # the body is never read: this connection is done
            raise APIError(413, f"the body is {size:,} bytes, more than the {BODY_LIMIT:,} "
                                "a request can be", code="request_too_large")
        data = self.rfile.read(size)
        if len(data) < size:
            self.close_connection = True
            raise APIError(400, "the body is shorter than its Content-Length")
        return data

    def _read_chunked(self):
        self.close_connection = True  # errors leave the stream mid-chunk: never reuse it
        data = bytearray()
        while True:
            line = self.rfile.readline(64)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise APIError(400, "malformed chunked body") from None
            if size < 0:
                raise APIError(400, "malformed chunked body")
            if len(data) + size > BODY_LIMIT:
                raise APIError(413, f"the body is more than the {BODY_LIMIT:,} bytes a request "
                                    "can be", code="request_too_large")
            if size == 0:
                break
            chunk = self.rfile.read(size + 2)
            if len(chunk) < size + 2 or chunk[-2:] != b"\r\n":
                raise APIError(400, "malformed chunked body")
            data += chunk[:-2]
        for _ in range(100):  # trailers, up to the blank line
            if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                self.close_connection = False
                return bytes(data)
        raise APIError(400, "malformed chunked body (too many trailers)")

    # --- answers

    def _common_headers(self):
        if self.app.cors:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        if self.close_connection:
            self.send_header("Connection", "close")

    def _send(self, status, data, content_type, headers=()):
        self._status = status
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self._common_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, data, "application/json", headers)

    def _send_error(self, error):
        headers = [("WWW-Authenticate", "Bearer")] if error.status == 401 else []
        try:
            self._send_json(error.status, error.body(), headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, an unknown
        method), in OpenAI's shape instead of an HTML page."""
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # a garbled request line: still answer with headers
        if not getattr(self, "_in_request", False):
            self._started, self._stats = time.monotonic(), Stats()
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_error(APIError(code, message or phrase, code=phrase.lower().replace(" ", "_")))
        if not getattr(self, "_in_request", False):
            self._log_line()

    def _send_file(self, path):
        data = files.read_bytes(path, PAGE_FILE_LIMIT, "page file")
        self._send(200, data, CONTENT_TYPES.get(path.suffix, "application/octet-stream"), [
            ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                        "style-src 'self' 'unsafe-inline'; img-src 'self' data:"),
        ])

    def _send_events(self, events):
        """Server-sent events, one `data: {json}` per chunk, then `data: [DONE]`. Before each
        chunk is computed the client's socket is checked; a client that left (or a failed
        write) closes `events`, which ends the generation and frees the model."""
        self._status = 200
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self._common_headers()
        self.end_headers()
        self.wfile.flush()

        def write(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        try:
            while True:
                if self._client_gone():
                    raise BrokenPipeError("the client left")
                try:
                    event = next(events)
                except StopIteration:
                    break
                except APIError as e:  # mid-stream, the status is sent: an error event
                    write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
                    break
                except Exception:  # a bug of ours, after the 200: an error event, then the end
                    self.app.log(f"internal error streaming {self.path}:\n"
                                 f"{traceback.format_exc()}")
                    error = APIError(500, "internal server error", code="internal_error")
                    write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
                    break
                write(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8")
                      + b"\n\n")
            write(b"data: [DONE]\n\n")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            self._status = 499  # nginx's "client closed request", for the log line
        finally:
            events.close()

    def _client_gone(self):
        """True when the client closed its end: its socket reads as end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- logging

    def _log_line(self):
        seconds = time.monotonic() - getattr(self, "_started", time.monotonic())
        command = self.command or "-"
        path = urlsplit(self.path).path if getattr(self, "path", None) else "-"
        tokens = self._stats.tokens if getattr(self, "_stats", None) else 0
        self.app.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {command} "
                     f"{path} {self._status or '-'} {tokens} tokens {seconds:.3f} s")

    def log_message(self, format, *args):  # http.server's own lines: ours are above
        pass

    @property
    def app(self):
        return self.server.app


class _HTTPServer(ThreadingHTTPServer):
    """The standard library's threading server, one thread per connection, at most
    `max_connections` of them: beyond, a connection is answered 503 at once and closed."""

    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def server_activate(self):
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.app.log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client_address[0]} - - 503 "
                         f"(more than {self.max_connections} connections)")
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """An exception that escaped a handler (a client that reset its connection): one line,
        not a traceback."""
        kind, error, _ = sys.exc_info()
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.app.log(f"error serving {client_address[0]}: {kind.__name__}: {error}")


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _busy_response():
    body = json.dumps(APIError(503, "the server has too many connections; try again",
                               code="too_many_connections").body()).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


_BUSY = _busy_response()


class Server:
    """`picogpt serve`'s server for one Model: `serve_forever()` from the command line, or
    `with Server(model, port=0) as s:` (a background thread) from tests and benchmarks; `s.url`
    is where it listens."""

    def __init__(self, model, name="model", host="127.0.0.1", port=8080, api_key=None,
                 cors=False, log=None, max_connections=MAX_CONNECTIONS):
        self.service = Service(model, name)
        self.api_key = api_key or None
        self.cors = cors
        self.log = log or _stderr_line
        self.page_files = page_files()
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self.httpd = server_class((host, port), _Handler, bind_and_activate=False)
        self.httpd.app, self.httpd.max_connections = self, max_connections
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except BaseException:
            self.httpd.server_close()
            raise
        self.host, self.port = host, self.httpd.server_address[1]
        self.loopback = is_loopback(host)
        self._thread = None

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self):
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="picogpt-serve")
        self._thread.start()
        return self

    def close(self):
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def page_files():
    """URL path -> file for the page folder's own files (by name, listed once): the only files
    the server reads, so no request path ever reaches the file system."""
    out = {}
    if PAGE.is_dir():
        for p in sorted(PAGE.iterdir()):
            if p.is_file() and p.suffix in CONTENT_TYPES:
                out[f"/{p.name}"] = p
    if "/index.html" in out:
        out["/"] = out["/index.html"]
    return out


def is_loopback(host):
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stderr_line(line):
    print(line, file=sys.stderr, flush=True)
