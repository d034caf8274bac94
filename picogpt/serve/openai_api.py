"""OpenAI's API over one `Model`, HTTP apart: each request's fields checked (fields.py), the
Model called (one generation at a time, in arrival order: `FifoLock`), and the answer in OpenAI's
response shapes, whole or as a stream of events (their logprobs: logprobs.py). transport.py
carries it over HTTP."""

import contextlib
import json
import secrets
import threading
import time
from collections import deque

from picogpt.errors import ModelError
from picogpt.generation.model import completions_of
from picogpt.generation.options import MAX_LOGPROBS
from picogpt.generation.stops import MAX_STOPS as MAX_STOP  # a chat's turn end is one of them
from picogpt.serve import fields
from picogpt.serve.fields import SAMPLING_FIELDS, APIError
from picogpt.serve.logprobs import (
    TextOffsets,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    without_leading_space,
)

MAX_N = 16  # samples per prompt (one batch)
MAX_PROMPTS = 16  # prompts per completions request
MAX_MESSAGES = 1024


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


# --- the API over one model -----------------------------------------------------------------------

class Stats:
    """What one request did, for its log line."""

    def __init__(self):
        self.tokens = 0


class ClientGone(ConnectionAbortedError):
    """The client closed its connection before its answer was ready: the generation stopped."""


class Service:
    """OpenAI's completions and chat completions over one `Model`: the checks, the generation
    lock, and the response shapes. Knows nothing of HTTP; transport.py's handler speaks that."""

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
        fields.only(body, self.COMPLETION_FIELDS)
        options = fields.sampling(body, 16)
        n = fields.integer(body, "n", 1, 1, MAX_N)
        stream = fields.boolean(body, "stream")
        request = dict(
            prompts=self._prompts(body.get("prompt")), n=n, stream=stream,
            include_usage=fields.stream_options(body, stream), echo=fields.boolean(body, "echo"),
            logprobs=fields.integer(body, "logprobs", None, 0, MAX_LOGPROBS), options=options)
        best_of = fields.integer(body, "best_of", n, 1, MAX_N)
        if best_of != n:
            raise fields.invalid("best_of", "best_of is not supported (only best_of == n)")
        if fields.string(body, "suffix"):
            raise fields.invalid("suffix", "suffix (insertion) is not supported")
        if body.get("logit_bias"):
            raise fields.invalid("logit_bias", "logit_bias is not supported")
        if request["echo"] and request["logprobs"] is not None:
            for _, ids in request["prompts"]:
                if len(ids) > self.n_ctx:
                    raise fields.invalid("prompt", f"echo with logprobs takes prompts of at most "
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
            raise fields.invalid("prompt", "prompt must be a string, a list of strings, or a list "
                                           "of token ids", code="invalid_type")
        if len(value) > MAX_PROMPTS:
            raise fields.invalid("prompt", f"prompt takes at most {MAX_PROMPTS} prompts, got "
                                           f"{len(value)}")
        prompts = []
        for item in value:
            if isinstance(item, str):
                try:
                    ids = self.model.encode(item)
                except ValueError as e:  # a character-level model that never saw a character
                    raise fields.invalid("prompt", str(e)) from None
                prompts.append((item, ids))
            elif isinstance(item, list) and all(_is_id(v) for v in item):
                n_vocab = self.model.hparams["n_vocab"]
                bad = [i for i in item if not 0 <= i < n_vocab]
                if bad:
                    raise fields.invalid("prompt", f"token id {bad[0]} is outside the vocabulary "
                                                   f"(0..{n_vocab - 1})")
                prompts.append((self.model.decode(item), list(item)))
            else:
                raise fields.invalid("prompt", "each prompt must be a string or a list of token "
                                               "ids", code="invalid_type")
        return prompts

    def completions(self, request, stats, gone=None):
        """The response to a checked non-streaming completions request. `gone()`, asked before
        each token, says the client has left: the generation then stops (ClientGone)."""
        options, n = request["options"], request["n"]
        with _model_failures(), self.lock:
            results = []
            for text, ids in request["prompts"]:
                out = self._complete(ids, options, request["logprobs"], n, stats, gone)
                prompt_lp = None
                if request["echo"] and request["logprobs"] is not None:
                    prompt_lp = prompt_logprobs(self.model, ids, request["logprobs"])
                results.append((text, out, prompt_lp))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, (text, out, prompt_lp) in enumerate(results):
            prompt_tokens += out[0].prompt_tokens
            for k, c in enumerate(out):
                completion_tokens += len(c.tokens)
                logprobs = None
                if request["logprobs"] is not None:
                    logprobs = completion_logprobs(self.model, c.tokens, c.token_logprobs,
                                                   c.top_logprobs,
                                                   TextOffsets(self.model, len(text)), prompt_lp)
                choices.append({"text": (text if request["echo"] else "") + c.text,
                                "index": p * n + k, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
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
        with _model_failures(), self.lock:
            for p, ((text, ids), stream) in enumerate(zip(request["prompts"], streams)):
                offsets = [TextOffsets(self.model, len(text)) for _ in range(n)]
                if request["echo"]:
                    lp = prompt_logprobs(self.model, ids, request["logprobs"]) if want_lp else None
                    for k in range(n):
                        yield chunk(p * n + k, text, lp)
                try:
                    for c in stream:
                        stats.tokens += len(c.tokens)
                        logprobs = None
                        if want_lp and c.tokens:
                            logprobs = completion_logprobs(self.model, c.tokens, c.token_logprobs,
                                                           c.top_logprobs, offsets[c.index])
                        if c.text or logprobs or c.finish_reason:
                            yield chunk(p * n + c.index, c.text, logprobs, c.finish_reason)
                finally:
                    stream.close()
                prompt_tokens += max(len(ids), 1)  # an empty prompt is <|endoftext|>
        if request["include_usage"]:
            first = chunk(0, "")
            yield dict(first, choices=[], usage=_usage(prompt_tokens, stats.tokens))

    def _complete(self, ids, options, logprobs, n, stats, gone):
        """Model.complete's n Completions, collected from its stream: between tokens the
        client can be asked whether it is still there (`gone`), and the tokens counted."""
        chunks = _watched(self._stream(ids, options, logprobs, n), stats, gone)
        try:
            return completions_of(chunks, n, logprobs is not None, max(len(ids), 1))
        except ModelError:  # the model's failure, not the request's: see _model_failures
            raise
        except ValueError as e:  # an option the checks above let through: say, as a 400
            raise APIError(400, str(e)) from None

    def _stream(self, ids, options, logprobs, n):
        try:
            return self.model.stream_completion(ids, **options, logprobs=logprobs, samples=n)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # --- chat completions

    CHAT_FIELDS = SAMPLING_FIELDS + ("messages", "max_completion_tokens", "logprobs",
                                     "top_logprobs", "metadata", *fields.CHAT_NO_OPS)

    def chat_request(self, body):
        fields.only(body, self.CHAT_FIELDS)
        fields.no_ops(body, fields.CHAT_NO_OPS)
        default = min(60, self.n_ctx // 2)  # `picogpt chat`'s reply length, in a tiny context
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        options = fields.sampling(body, default, name)
        if options["n"] >= self.n_ctx:
            raise fields.invalid(name, f"{name} {options['n']} leaves no room for the conversation "
                                       f"(the context is {self.n_ctx} tokens)")
        n = fields.integer(body, "n", 1, 1, MAX_N)
        stream = fields.boolean(body, "stream")
        logprobs = fields.boolean(body, "logprobs")
        top = fields.integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not logprobs:
            raise fields.invalid("top_logprobs", "top_logprobs needs logprobs: true")
        messages = _messages(body.get("messages"))
        from picogpt.generation import chat

        try:
            prompt = chat.chat_prompt(self.model, messages, options["n"])
        except ValueError as e:  # a character-level model that never saw a character
            raise fields.invalid("messages", str(e)) from None
        stops = [s for s in options["stop"] or [] if s != chat.REPLY_STOP]
        if len(stops) >= MAX_STOP:
            raise fields.invalid("stop", f"a chat takes at most {MAX_STOP - 1} stop strings (its "
                                         "turn ends at a newline too)")
        options["stop"] = [chat.REPLY_STOP, *stops]
        return dict(prompt=prompt, ids=self.model.encode(prompt), n=n, stream=stream,
                    include_usage=fields.stream_options(body, stream),
                    logprobs=(top or 0) if logprobs else None, options=options)

    def chat_completions(self, request, stats, gone=None):
        """The response to a checked non-streaming chat request; `gone` as in completions."""
        n = request["n"]
        with _model_failures(), self.lock:
            out = self._complete(request["ids"], request["options"], request["logprobs"], n,
                                 stats, gone)
        choices = []
        for k, c in enumerate(out):
            logprobs = None
            if request["logprobs"] is not None:
                content = chat_logprobs(self.model, c.tokens, c.token_logprobs,
                                        c.top_logprobs, request["logprobs"])
                logprobs = {"content": without_leading_space(content, [False]), "refusal": None}
            choices.append({"index": k, "message": {"role": "assistant",
                                                    "content": c.text.lstrip(),
                                                    "refusal": None},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
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
        with _model_failures(), self.lock:
            for k in range(n):
                yield chunk(k, {"role": "assistant", "content": ""})
            started = [False] * n  # the reply's leading space is not part of it
            spoke = [[False] for _ in range(n)]  # ... nor of its logprobs (without_leading_space)
            try:
                for c in stream:
                    stats.tokens += len(c.tokens)
                    text = c.text if started[c.index] else c.text.lstrip()
                    started[c.index] = started[c.index] or bool(text)
                    logprobs = None
                    if request["logprobs"] is not None and c.tokens:
                        content = chat_logprobs(self.model, c.tokens, c.token_logprobs,
                                                c.top_logprobs, request["logprobs"])
                        logprobs = {"content": without_leading_space(content, spoke[c.index]),
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


def _watched(chunks, stats, gone):
    """`chunks`, their tokens counted into `stats`; before each, `gone()` (if given) is asked,
    and once the client has gone the generation is closed and ClientGone raised."""
    with contextlib.closing(chunks):
        while True:
            if gone is not None and gone():
                raise ClientGone("the client left")
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            stats.tokens += len(chunk.tokens)
            yield chunk


def _messages(value):
    """OpenAI's chat `messages`, checked: [(role, text)]."""
    if not isinstance(value, list) or not value:
        raise fields.invalid("messages", "messages must be a non-empty list", code="invalid_type")
    if len(value) > MAX_MESSAGES:
        raise fields.invalid("messages", f"messages takes at most {MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise fields.invalid(where, f"{where} must be an object", code="invalid_type")
        fields.only({f"{where}.{k}": v for k, v in message.items()},
                    (f"{where}.role", f"{where}.content", f"{where}.name"))
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise fields.invalid(f"{where}.role", f"{where}.role must be system, developer, user "
                                                  f"or assistant, got {json.dumps(role)[:40]}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones mean anything to GPT-2
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise fields.invalid(f"{where}.content", f"{where}.content parts must be "
                                                         '{"type": "text", "text": "..."}')
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise fields.invalid(f"{where}.content", f"{where}.content must be a string",
                                 code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _new_id(prefix):
    return f"{prefix}-{secrets.token_hex(12)}"


@contextlib.contextmanager
def _model_failures():
    """Within: a model that fails as it computes (weights that give NaN logits, a ModelError) is
    the server's failure, not the request's: a 500 with the error's one line (mid-stream, an
    error event), and the server goes on."""
    try:
        yield
    except ModelError as e:
        raise APIError(500, str(e), code="model_error") from None
