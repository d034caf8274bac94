"""`picogpt serve`: OpenAI's own Python client against a real server on 127.0.0.1, every answer
compared with picogpt's API on the same model (the TF-written tiny GPT-2 fixture, and the bundled
character-level model); raw HTTP for the errors; many clients at once; a client that leaves
mid-stream; and the page in a real browser (headless Chromium)."""

import codecs
import http.client
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _browser import Browser, chromium_path
from _damaged import with_a_nan

import picogpt
from picogpt.serve import transport as srv
from picogpt.serve.fields import MAX_TOKENS
from picogpt.serve.openai_api import FifoLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "gpt2-tiny"
N_CTX = 64  # the fixture's context


@pytest.fixture(scope="module")
def tiny():
    return picogpt.load(TINY)


@pytest.fixture(scope="module")
def reference():
    """A second copy of the model: picogpt's API answers, with a KV cache of its own."""
    return picogpt.load(TINY)


@pytest.fixture(scope="module")
def server(tiny):
    lines = []
    with srv.Server(tiny, "gpt2-tiny", port=0, log=lines.append) as s:
        s.lines = lines
        yield s


def openai_client(server, key="unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(server):
    return openai_client(server)


def request(server, method, path, body=None, headers=None, host=None):
    """(status, headers, body bytes) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(server, path, obj, headers=None):
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return request(server, "POST", path, data,
                   {"Content-Type": "application/json", **(headers or {})})


def error_of(status, body):
    """The OpenAI-shaped error in a response, checked to be one."""
    assert b"Traceback" not in body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else
                             "authentication_error" if status == 401 else
                             "invalid_request_error")
    return error


# --- completions, compared with Model.complete -------------------------------------------------

def test_models_lists_the_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["gpt2-tiny"]
    assert client.models.retrieve("gpt2-tiny").id == "gpt2-tiny"


@pytest.mark.parametrize("options", [
    dict(temperature=1.0, seed=3),
    dict(temperature=0.7, top_p=0.9, seed=11, top_k=0),
    dict(temperature=0.0),
    dict(temperature=1.2, seed=5, presence_penalty=1.5, frequency_penalty=0.8),
])
def test_completion_is_the_api_s(client, reference, options):
    top_k = options.pop("top_k", 40)
    out = client.completions.create(model="gpt2-tiny", prompt="The quick brown fox",
                                    max_tokens=12, extra_body={"top_k": top_k}, **options)
    want = reference.complete("The quick brown fox", 12, top_k=top_k, **options)
    (choice,) = out.choices
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == want.prompt_tokens == len(reference.encode("The quick "
                                                                                 "brown fox"))
    assert out.usage.completion_tokens == len(want.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == "gpt2-tiny"


def test_default_max_tokens_is_16(client, reference):
    out = client.completions.create(model="gpt2-tiny", prompt="Hello", seed=1)
    want = reference.complete("Hello", 16, seed=1)
    assert out.choices[0].text == want.text
    assert out.usage.completion_tokens == len(want.tokens) <= 16


def test_stop_strings(client, reference):
    # Greedy text first, then a stop string taken from inside it: the answer ends before it.
    free = reference.complete("Once upon", 30, temperature=0)
    stop = free.text[len(free.text) // 2:][:2]
    assert stop
    for given in (stop, [stop, "\x00never"]):
        out = client.completions.create(model="gpt2-tiny", prompt="Once upon", max_tokens=30,
                                        temperature=0, stop=given)
        want = reference.complete("Once upon", 30, temperature=0, stop=given)
        assert out.choices[0].text == want.text == free.text[:free.text.index(stop)]
        assert out.choices[0].finish_reason == "stop"


def test_n_samples_are_one_batch_of_the_api(client, reference):
    out = client.completions.create(model="gpt2-tiny", prompt="Hello", max_tokens=10, n=3,
                                    seed=7)
    want = reference.complete("Hello", 10, seed=7, samples=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [w.text for w in want]
    assert len({c.text for c in out.choices}) > 1  # three samples, not one thrice
    assert out.usage.completion_tokens == sum(len(w.tokens) for w in want)


def test_seed_repeats_and_differs(client):
    def text(seed):
        return client.completions.create(model="gpt2-tiny", prompt="A", max_tokens=12,
                                         seed=seed).choices[0].text
    assert text(42) == text(42)
    assert len({text(s) for s in (1, 2, 3, 4)}) > 1


def test_prompt_lists_and_token_ids(client, reference):
    out = client.completions.create(model="gpt2-tiny", prompt=["One", "Two"], max_tokens=6,
                                    n=2, seed=4)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts == [w.text for p in ("One", "Two")
                     for w in reference.complete(p, 6, seed=4, samples=2)]
    ids = reference.encode("One")
    by_ids = client.completions.create(model="gpt2-tiny", prompt=ids, max_tokens=6, seed=4)
    assert by_ids.choices[0].text == reference.complete(ids, 6, seed=4).text


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def test_logprobs_are_the_api_s(client, reference):
    prompt = "It was a bright cold day"
    out = client.completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=8, seed=2,
                                    logprobs=3)
    want = reference.complete(prompt, 8, seed=2, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [reference.token_text(t) for t in want.tokens]
    np.testing.assert_allclose(lp.token_logprobs, want.token_logprobs, atol=1e-6)
    # OpenAI's rule: the K likeliest, and the token itself where it is not among them.
    for got, expected, token, token_lp in zip(lp.top_logprobs, want.top_logprobs, lp.tokens,
                                              lp.token_logprobs):  # fmt: skip
        assert set(got) == set(expected) | {token} and len(expected) == 3
        assert all(math.isclose(got[t], expected[t], abs_tol=1e-6) for t in expected)
        assert math.isclose(got[token], token_lp, abs_tol=1e-6)
    zero = client.completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=8, seed=2,
                                     logprobs=0).choices[0].logprobs  # the token's own alone
    assert zero.top_logprobs == [{t: lp} for t, lp in zip(zero.tokens, zero.token_logprobs)]
    # text_offset: where each token's text begins in prompt + text, as an incremental UTF-8
    # decoder releases it (a token that completes a character begins where the character does).
    utf8, offsets, at = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], len(prompt)
    for token in want.tokens:
        offsets.append(at)
        at += len(utf8.decode(reference.tokenizer.decode_bytes([token])))
    assert lp.text_offset == offsets
    # And they are the model's own: log-softmax of its logits after prompt + tokens so far.
    ids = reference.encode(prompt) + want.tokens
    rows = log_softmax(reference.logits(ids[:-1]))[len(ids) - 1 - len(want.tokens):]
    np.testing.assert_allclose(lp.token_logprobs, rows[np.arange(len(want.tokens)),
                                                       want.tokens], atol=1e-4)


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    prompt = "Hello there, general"
    out = client.completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=4, seed=1,
                                    echo=True, logprobs=2)
    want = reference.complete(prompt, 4, seed=1, logprobs=2)
    choice = out.choices[0]
    assert choice.text == prompt + want.text
    ids = reference.encode(prompt)
    lp = choice.logprobs
    assert lp.tokens[:len(ids)] == [reference.token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = log_softmax(reference.logits(ids))
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)],
                               rows[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    for top, token, token_lp in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]):
        assert len(top) in (2, 3) and math.isclose(top[token], token_lp, abs_tol=1e-9)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)
    echo_only = client.completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=0,
                                          echo=True)
    assert echo_only.choices[0].text == prompt and echo_only.usage.completion_tokens == 0


def test_echo_of_an_empty_prompt(client, reference):
    out = client.completions.create(model="gpt2-tiny", prompt="", max_tokens=3, seed=1,
                                    echo=True, logprobs=1)
    want = reference.complete("", 3, seed=1, logprobs=1)
    assert out.choices[0].text == want.text
    assert out.choices[0].logprobs.tokens == [reference.token_text(t) for t in want.tokens]


def test_a_request_that_extends_the_last_one_reuses_the_kv_cache():
    """The next chat turn's prompt begins with the last one's: only its new tokens run. (The
    character model: the tiny GPT-2's 64-token context drops the preamble between turns.)"""
    tiny = picogpt.load("shakespeare-char")
    with srv.Server(tiny, "shakespeare-char", port=0, log=lambda line: None) as s:
        c = openai_client(s)
        first = [{"role": "user", "content": "Hi!"}]
        reply = c.chat.completions.create(model="m", messages=first, max_tokens=8,
                                          temperature=0).choices[0].message.content
        before = list(tiny.context)
        turn = [*first, {"role": "assistant", "content": reply},
                {"role": "user", "content": "And?"}]
        from picogpt.generation import chat

        ids = tiny.encode(chat.chat_prompt(tiny, turn, 8))
        shared = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b),
                      min(len(before), len(ids)))
        assert shared > len(ids) // 2  # the test means something: most of the prompt is shared
        positions, forward = [], tiny.gpt.forward
        tiny.gpt.forward = lambda x, *a, **k: (positions.append(np.shape(x)[1]),
                                               forward(x, *a, **k))[1]
        try:
            c.chat.completions.create(model="m", messages=turn, max_tokens=8, temperature=0)
        finally:
            del tiny.gpt.forward
        assert positions[0] == len(ids) - min(shared, len(ids) - 1)  # the prefill: new tokens


def test_stream_is_the_api_s(client, reference):
    chunks = list(client.completions.create(model="gpt2-tiny", prompt="Stream me", max_tokens=14,
                                            seed=9, stream=True, logprobs=1,
                                            stream_options={"include_usage": True}))
    want = reference.complete("Stream me", 14, seed=9, logprobs=1)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == [reference.token_text(t) for t in want.tokens]
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it streamed
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_stream_n_rows_each_the_api_s(client, reference):
    chunks = client.completions.create(model="gpt2-tiny", prompt="Rows", max_tokens=8, seed=3,
                                       n=2, stream=True)
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [w.text for w in reference.complete("Rows", 8, seed=3, samples=2)]


def test_stream_bytes_on_the_wire(server):
    """The raw stream: `data: {json}` events and the closing `data: [DONE]`."""
    status, headers, body = post(server, "/v1/completions",
                                 {"prompt": "x", "max_tokens": 3, "stream": True, "seed": 1})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "text_completion"


# --- chat ------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is two and two?"}]


def chat_reference(model, messages, max_tokens, **options):
    from picogpt.generation import chat

    prompt = chat.chat_prompt(model, messages, max_tokens)
    return model.complete(prompt, max_tokens, stop=[chat.REPLY_STOP], **options)


@pytest.mark.parametrize("options", [dict(seed=1), dict(temperature=0.0)])
def test_chat_is_picogpt_chat_s(client, reference, options):
    out = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES, max_tokens=20,
                                         **options)
    want = chat_reference(reference, MESSAGES, 20, **options)
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text.lstrip()
    assert "\n" not in choice.message.content  # the turn ends with its line
    assert choice.finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == want.prompt_tokens
    assert out.usage.completion_tokens == len(want.tokens)


def test_chat_stream_deltas(client, reference):
    out = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES,
                                         max_completion_tokens=20, seed=8, n=2, stream=True)
    texts, roles, finish = ["", ""], [], {}
    for chunk in out:
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    want = chat_reference(reference, MESSAGES, 20, seed=8, samples=2)
    assert roles == ["assistant", "assistant"]
    assert texts == [w.text.lstrip() for w in want]
    assert finish == {0: want[0].finish_reason, 1: want[1].finish_reason}


@pytest.mark.parametrize("seed", [0, 31])  # replies ' al'..., and ' ', 'pt', ...
def test_chat_logprobs(client, reference, seed):
    out = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES, max_tokens=10,
                                         seed=seed, logprobs=True, top_logprobs=4)
    want = chat_reference(reference, MESSAGES, 10, seed=seed, logprobs=4)
    content = out.choices[0].logprobs.content
    # The reply loses its leading space, and its logprobs with it: their bytes joined are the
    # reply (a token that is part of a character has the text "bytes:\\x..", as OpenAI's).
    reply = out.choices[0].message.content
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == reply
    texts = [reference.token_text(t) for t in want.tokens]
    lost = next(i for i, t in enumerate(texts) if t.strip())  # whitespace tokens before the first
    assert texts[0] != texts[0].lstrip()  # (this reply does begin with whitespace)
    assert [c.token for c in content] == [texts[lost].lstrip(), *texts[lost + 1:]]
    np.testing.assert_allclose([c.logprob for c in content], want.token_logprobs[lost:],
                               atol=1e-6)  # fmt: skip
    for c, top in zip(content, want.top_logprobs[lost:]):
        assert {t.token for t in c.top_logprobs} == set(top)
        assert [t.logprob for t in c.top_logprobs] == sorted(top.values(), reverse=True)
    raw = [reference.tokenizer.decode_bytes([t]) for t in want.tokens[lost:]]
    assert [bytes(c.bytes) for c in content] == [raw[0].lstrip(), *raw[1:]]
    stream = client.chat.completions.create(model="gpt2-tiny", messages=MESSAGES, max_tokens=10,
                                            seed=seed, logprobs=True, top_logprobs=4, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    assert text == reply
    assert [e.token for c in chunks if c.logprobs for e in c.logprobs.content] == \
        [c.token for c in content]


def test_chat_on_the_bundled_char_model(reference):
    """The character-level model (no <|endoftext|>, its own alphabet) through the same API."""
    model = picogpt.load("shakespeare-char")
    ref = picogpt.load("shakespeare-char")
    messages = [{"role": "user", "content": "Good morrow, my lord!"}]
    with srv.Server(model, "shakespeare-char", port=0, log=lambda line: None) as s:
        c = openai_client(s)
        out = c.chat.completions.create(model="shakespeare-char", messages=messages,
                                        max_tokens=40, seed=1)
        assert out.choices[0].message.content == \
            chat_reference(ref, messages, 40, seed=1).text.lstrip()
        done = c.completions.create(model="shakespeare-char", prompt="ROMEO:", max_tokens=30,
                                    seed=2, temperature=0.8)
        assert done.choices[0].text == ref.complete("ROMEO:", 30, seed=2, temperature=0.8).text
        status, _, body = post(s, "/v1/completions", {"prompt": "ROMEO: \u20ac"})
        assert status == 400 and error_of(status, body)["param"] == "prompt"


# --- errors, in OpenAI's shape ------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"max_tokens": "16"}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": 3}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"seed": -1}, "seed"),
    ({"seed": "1"}, "seed"), ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [{"a": 1}]}, "prompt"), ({"prompt": [99999]}, "prompt"),
    ({"stream": "yes"}, "stream"), ({"echo": 1}, "echo"), ({"bogus": 1}, "bogus"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"best_of": 2}, "best_of"), ({"logit_bias": {"1": 5}}, "logit_bias"),
]
BAD_CHATS = [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MESSAGES, "max_tokens": N_CTX}, "max_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": -2}, "max_completion_tokens"),
    ({"messages": MESSAGES, "stop": ["."] * 16}, "stop"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MESSAGES, "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": MESSAGES, "store": True}, "store"),
    ({"messages": MESSAGES, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": MESSAGES, "metadata": "x"}, "metadata"),
]
NO_OP_CHAT_FIELDS = {"response_format": {"type": "text"}, "logit_bias": {}, "tools": [],
                     "tool_choice": "none", "parallel_tool_calls": False, "store": False,
                     "metadata": {"user": "me"}, "service_tier": "auto",
                     "modalities": ["text"]}  # fmt: skip


def test_chat_fields_that_ask_nothing_of_gpt2_are_taken(server):
    body = {"messages": MESSAGES, "max_tokens": 4, "seed": 3}
    status, _, plain = post(server, "/v1/chat/completions", body)
    status_too, _, with_them = post(server, "/v1/chat/completions", {**body, **NO_OP_CHAT_FIELDS})
    assert status == status_too == 200, with_them
    reply = [json.loads(d)["choices"][0]["message"]["content"] for d in (plain, with_them)]
    assert reply[0] == reply[1]


def test_bad_fields_are_400_naming_the_field(server):
    cases = [("/v1/completions", {"prompt": "Hi", **f}, p) for f, p in BAD_COMPLETIONS]
    cases += [("/v1/chat/completions", f, p) for f, p in BAD_CHATS]
    for path, body, param in cases:
        status, headers, data = post(server, path, body)
        assert status == 400, (body, data)
        assert headers["content-type"] == "application/json"
        assert error_of(status, data)["param"] == param, (body, data)
    status, _, _ = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200  # and it keeps serving


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe{}",
                                  b'{"prompt": "a", "max_tokens": NaN}',
                                  b'{"temperature": Infinity}', b"[" * 100_000, b""],
                         ids=["cut", "array", "string", "not-utf8", "nan", "infinity",
                              "nested-100k", "empty"])
def test_bodies_that_are_not_a_json_object_are_400(server, body):
    status, _, data = post(server, "/v1/completions", body)
    assert status == 400
    error_of(status, data)


def test_body_over_1_mb_is_413_before_it_is_read(server):
    # Only the headers go out: the server answers from Content-Length alone.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 * srv.BODY_LIMIT))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    error_of(413, r.read())
    conn.close()
    body = json.dumps({"prompt": "a" * (srv.BODY_LIMIT - 100), "max_tokens": 0}).encode()
    assert len(body) <= srv.BODY_LIMIT
    assert post(server, "/v1/completions", body)[0] == 200  # just under the limit: answered


def test_chunked_bodies_are_read_and_bounded(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert read_response(s).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"1000000\r\n")  # a 16 MB chunk announced: refused before it is sent
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 413")
        error_of(413, answer.split(b"\r\n\r\n", 1)[1])


def read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"the server closed the connection after {data[:200]!r}")
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("the server closed the connection mid-body")
        body += more
    return head + b"\r\n\r\n" + body


def test_http_level_errors(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/completions")  # no Content-Length, not chunked
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411
    error_of(411, r.read())
    conn.close()
    status, _, data = request(server, "POST", "/v1/completions", b'{"prompt": "x"}',
                              {"Content-Type": "text/plain"})
    assert status == 415 and error_of(status, data)
    for method, path, want in [("GET", "/v1/nope", 404), ("GET", "/nope", 404),
                               ("POST", "/v1/models", 405), ("GET", "/v1/completions", 405),
                               ("DELETE", "/v1/models", 405), ("GET", "/v1/models/gpt5", 404),
                               ("OPTIONS", "/v1/completions", 405)]:
        status, headers, data = request(server, method, path)
        assert status == want, (method, path)
        error_of(status, data)
        assert "access-control-allow-origin" not in headers  # no CORS without --cors
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(garbage)
            answer = read_response(s)
        status = int(answer.split()[1])
        assert 400 <= status < 500
        error_of(status, answer.split(b"\r\n\r\n", 1)[1])
    assert request(server, "GET", "/v1/models")[0] == 200


def test_an_error_before_the_body_is_read_closes_the_connection(server):
    """With keep-alive, an unread body would be parsed as the next request: the server closes
    the connection after such an error, and keeps it when the body was read."""
    status, headers, _ = post(server, "/v1/nope", {"prompt": "x"})
    assert status == 404 and headers["connection"] == "close"
    status, headers, _ = post(server, "/v1/completions", {"prompt": "x", "n": 0})
    assert status == 400 and "connection" not in headers
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        body = b'{"prompt": "GET /v1/models HTTP/1.1"}'
        s.sendall(b"POST /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert read_response(s).startswith(b"HTTP/1.1 404")
        assert s.recv(100) == b""  # closed: the body was not taken for a request


def test_no_path_reaches_the_file_system(server):
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert page == (ROOT / "picogpt" / "serve" / "page" / "index.html").read_bytes()
    assert "default-src 'self'" in headers["content-security-policy"]
    assert request(server, "GET", "/index.html?x=1")[2] == page
    for path in ("/../setup.cfg", "/%2e%2e/setup.cfg", "/index.html/../../server.py",
                 "//etc/passwd", "/server.py", "/page/index.html", "/..%2fserver.py",
                 "/%2fetc%2fpasswd", "/index.html%00", "/.", "/page"):
        status, _, data = request(server, "GET", path)
        assert status == 404, path
        error_of(status, data)


def test_host_must_be_a_loopback_name(server):
    status, _, data = request(server, "GET", "/v1/models", host="evil.example")
    assert status == 403 and error_of(status, data)["code"] == "host_not_allowed"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]:80"):
        assert request(server, "GET", "/v1/models", host=host)[0] == 200


def test_api_key(tiny):
    openai = pytest.importorskip("openai")
    with srv.Server(tiny, "gpt2-tiny", port=0, api_key="sekrit", log=lambda line: None) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                        {"Authorization": "Basic sekrit"}):
            status, h, data = post(s, "/v1/completions", {"prompt": "x"}, headers)
            assert status == 401 and h["www-authenticate"] == "Bearer"
            assert error_of(status, data)["code"] == "invalid_api_key"
        assert request(s, "GET", "/v1/models")[0] == 401
        assert request(s, "GET", "/")[0] == 200  # the page itself holds no secret
        with pytest.raises(openai.AuthenticationError):
            openai_client(s, "wrong").models.list()
        out = openai_client(s, "sekrit").completions.create(model="gpt2-tiny", prompt="x",
                                                            max_tokens=2)
        assert out.usage.completion_tokens <= 2


def test_cors_only_when_asked(tiny):
    with srv.Server(tiny, "gpt2-tiny", port=0, cors=True, log=lambda line: None) as s:
        status, headers, _ = request(s, "OPTIONS", "/v1/chat/completions",
                                     headers={"Origin": "http://example.com"})
        assert status == 204
        assert headers["access-control-allow-origin"] == "*"
        assert "Authorization" in headers["access-control-allow-headers"]
        assert request(s, "GET", "/v1/models")[1]["access-control-allow-origin"] == "*"
        asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count"
        status, headers, _ = request(s, "OPTIONS", "/v1/chat/completions",
                                     headers={"Origin": "http://example.com",
                                              "Access-Control-Request-Headers": asked})
        assert status == 204 and headers["access-control-allow-headers"] == asked
        status, headers, _ = request(s, "OPTIONS", "/v1/chat/completions",
                                     headers={"Access-Control-Request-Headers": "a b, (c)"})
        assert headers["access-control-allow-headers"] == "Authorization, Content-Type"


def test_connections_beyond_the_limit_get_503(tiny):
    with srv.Server(tiny, "gpt2-tiny", port=0, log=lambda line: None, max_connections=2) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(2)]
        time.sleep(0.2)  # both are being served (each thread waits for its request line)
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as third:
            answer = read_response(third)
        assert answer.startswith(b"HTTP/1.1 503")
        error_of(503, answer.split(b"\r\n\r\n", 1)[1])
        idle.pop().close()  # a slot frees up when its connection ends
        deadline = time.monotonic() + 5
        while True:
            try:
                assert request(s, "GET", "/v1/models")[0] == 200
                break
            except (ConnectionError, AssertionError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for sock in idle:
            sock.close()


def test_bind_address_checks():
    assert srv.is_loopback("127.0.0.1") and srv.is_loopback("::1")
    assert srv.is_loopback("localhost") and srv.is_loopback("127.0.0.2")
    assert not srv.is_loopback("0.0.0.0") and not srv.is_loopback("192.168.1.2")
    assert not srv.is_loopback("::")


def test_one_log_line_per_request(server):
    before = len(server.lines)
    request(server, "GET", "/v1/models")
    post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": "x"})
    deadline = time.monotonic() + 5  # a line is written just after its answer has gone out
    while len(server.lines) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    lines = server.lines[before:]
    assert len(lines) == 3, lines
    # Each request's line, once. Not necessarily in order: a line is written after its answer
    # has gone out, so on a busy host the next request's handler may log first.
    for expected in (" GET /v1/models 200 0 tokens ", " POST /v1/completions 200 3 tokens ",
                     " POST /v1/completions 400 0 tokens "):  # fmt: skip
        assert sum(expected in line for line in lines) == 1, (expected, lines)


# --- load: one generation at a time, in order; clients that leave -------------------------------

def test_fifo_lock_serves_in_arrival_order():
    lock, order = FifoLock(), []
    lock.acquire()
    threads = []
    for k in range(6):
        def work(k=k):
            with lock:
                order.append(k)
        t = threading.Thread(target=work)
        t.start()
        threads.append(t)
        while lock.waiting < k + 1:  # k is queued before k + 1 starts
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == list(range(6))


def client_session(c, k):
    """Client k's requests: completions, a stream, a chat; all seeded."""
    out = []
    a = c.completions.create(model="gpt2-tiny", prompt=f"Client {k} says", max_tokens=10,
                             seed=k)
    out.append(a.choices[0].text)
    s = c.completions.create(model="gpt2-tiny", prompt="Shared prompt", max_tokens=10, seed=k,
                             stream=True, n=2)
    texts = ["", ""]
    for chunk in s:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    out.append(texts)
    m = c.chat.completions.create(model="gpt2-tiny", messages=[
        {"role": "user", "content": f"I am client {k}."}], max_tokens=10, seed=k)
    out.append(m.choices[0].message.content)
    return out


def test_eight_clients_at_once_get_the_single_client_answers(server):
    alone = [client_session(openai_client(server), k) for k in range(8)]
    together, errors = [None] * 8, []

    def run(k):
        try:
            together[k] = client_session(openai_client(server), k)
        except Exception as e:  # reported below, with the client's number
            errors.append((k, e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert together == alone


def test_a_client_that_leaves_mid_stream_frees_the_model():
    model = picogpt.load("shakespeare-char")  # large enough that 4096 tokens take seconds
    lines = []
    with srv.Server(model, "shakespeare-char", port=0, log=lines.append) as s:
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": MAX_TOKENS, "stream": True,
                           "top_k": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += sock.recv(65536)
        sock.close()  # leave mid-stream
        t0 = time.monotonic()
        out = openai_client(s).completions.create(model="shakespeare-char", prompt="JULIET:",
                                                  max_tokens=5, seed=1)
        waited = time.monotonic() - t0
        assert out.usage.completion_tokens == 5
        assert waited < 5, f"the next request waited {waited:.1f} s"
        deadline = time.monotonic() + 5
        while not any(" 499 " in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        (left,) = [line for line in lines if " 499 " in line]
        assert int(left.split(" 499 ")[1].split()[0]) < MAX_TOKENS / 4, left


def test_a_client_that_leaves_before_its_whole_answer_frees_the_model():
    """A non-streaming request's client is asked for between tokens too: one that leaves stops
    its generation, long before max_tokens."""
    model = picogpt.load("shakespeare-char")
    lines = []
    with srv.Server(model, "shakespeare-char", port=0, log=lines.append) as s:
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": MAX_TOKENS, "top_k": 0}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        t0 = time.monotonic()  # left at once, without waiting for the answer
        out = openai_client(s).completions.create(model="shakespeare-char", prompt="JULIET:",
                                                  max_tokens=5, seed=1)
        waited = time.monotonic() - t0
        assert out.usage.completion_tokens == 5
        deadline = time.monotonic() + 5
        while not any(" 499 " in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        (left,) = [line for line in lines if " 499 " in line]
        assert int(left.split(" 499 ")[1].split()[0]) < MAX_TOKENS / 4, left
        assert waited < 5, f"the next request waited {waited:.1f} s"


def trickle(sock, data, every=0.05, limit=5.0):
    """Send `data` a byte every `every` seconds until the server answers or closes (or `limit`
    seconds pass); then its answer."""
    start = time.monotonic()
    for byte in data:
        if select.select([sock], [], [], every)[0] or time.monotonic() - start > limit:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed on us
            break
    return read_response(sock)


TRICKLED = b'{"prompt": "Hi", "max_tokens": 1}'
TRICKLED_HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(TRICKLED))


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_request_that_trickles_in_is_cut_off_at_its_deadline(tiny, part):
    """Bytes that each come well within the idle timeout still must all come within the
    request's deadline of the first: else a 408, and the connection is closed."""
    lines = []
    with srv.Server(tiny, "gpt2-tiny", port=0, log=lines.append, request_timeout=0.3) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            t0 = time.monotonic()
            if part == "headers":
                answer = trickle(sock, TRICKLED_HEAD + TRICKLED)
            else:
                sock.sendall(TRICKLED_HEAD)
                answer = trickle(sock, TRICKLED)
            took = time.monotonic() - t0
            assert answer.split(b"\r\n")[0].split()[1] == b"408", answer[:200]
            assert error_of(408, answer.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
            assert sock.recv(100) == b""  # closed
        assert took < 3, f"cut off after {took:.1f} s"
        (line,) = [line for line in lines if " 408 " in line]
        assert float(line.split()[-2]) >= 0.25, line  # seconds since the request's first byte


def test_the_deadline_runs_from_a_request_s_first_byte(tiny):
    """A keep-alive connection may idle between requests for longer than the deadline."""
    with srv.Server(tiny, "gpt2-tiny", port=0, log=lambda line: None, request_timeout=0.3) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        for k in range(2):
            time.sleep(0.4 * k)
            conn.request("POST", "/v1/completions", TRICKLED, {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 1
        conn.close()

# --- the command line --------------------------------------------------------------------------

def test_picogpt_serve_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1", PYTHONIOENCODING="utf-8")
    p = subprocess.Popen([sys.executable, "-m", "picogpt", "serve", "--model", str(TINY),
                          "--port", "0"], env=env, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    try:
        banner = p.stderr.readline()
        assert "picogpt serve: gpt2-tiny (float32) at http://127.0.0.1:" in banner, banner
        url = banner.split(" at ", 1)[1].split("/ ", 1)[0]
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "gpt2-tiny"
        assert " GET /v1/models 200 0 tokens " in p.stderr.readline()  # its log line
        p.send_signal(signal.SIGINT)  # with the connection still open, as a browser keeps it
        try:
            status = p.wait(90)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"picogpt serve did not stop on SIGINT: {p.stderr.read()}")
        assert status == 130
        assert "Traceback" not in p.stderr.read()
        conn.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    # Another address than loopback without a key: a warning. (192.0.2.1 is TEST-NET-1, never
    # this machine's: the bind fails, with one line, and no public interface is opened.)
    out = subprocess.run([sys.executable, "-m", "picogpt", "serve", "--model", str(TINY),
                          "--host", "192.0.2.1", "--port", "0"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    warning, failure = out.stderr.strip().splitlines()
    assert "warning: --host 192.0.2.1 without --api-key" in warning
    assert failure.startswith("picogpt: cannot listen on 192.0.2.1:0: ")
    out = subprocess.run([sys.executable, "-m", "picogpt", "serve", "--model", str(TINY),
                          "--host", "192.0.2.1", "--api-key", "k"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "warning" not in out.stderr
    for args in (["--port", "70000"], ["--api-key", ""], ["--model", "no-such-model"]):
        out = subprocess.run([sys.executable, "-m", "picogpt", "serve", *args], env=env,
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


# --- the page, in a real browser ---------------------------------------------------------------

needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="chromium is not installed (apt-get install chromium)")


FINISHED = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"


def visible(text):
    """The page's way of showing a token's blanks."""
    text = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return text or "(empty)"


def expected_spans(model, stream):
    """The page's spans for a stream of chunks: (text, probability, tokens' top lists); a text
    piece held back (an unfinished character, a possible stop) carries its tokens with it."""
    spans, pending = [], []
    for c in stream:
        pending += [(math.exp(lp), top) for lp, top in zip(c.token_logprobs, c.top_logprobs)]
        if c.text:
            spans.append((c.text, math.prod(p for p, _ in pending), [t for _, t in pending]))
            pending = []
    return spans


@needs_chromium
def test_the_page_streams_shaded_tokens_with_alternatives(server, reference, tmp_path):
    prompt, options = "The meaning of life is", dict(temperature=0.9, top_k=40, seed=3)
    query = "&".join([f"prompt={prompt.replace(' ', '%20')}", "max_tokens=16", "temperature=0.9",
                      "top_k=40", "seed=3", "run=1"])
    want = expected_spans(reference, reference.stream_completion(
        prompt, 16, **options, logprobs=5))
    with Browser(tmp_path / "profile") as b:
        b.goto(f"{server.url}/?{query}")
        assert b.wait_for(FINISHED) == "done"
        spans = b.evaluate("[...document.querySelectorAll('#output .tok')].map(s => "
                           "[s.textContent, +s.dataset.p, s.style.background])")
        assert b.evaluate("document.querySelector('#output .prompt').textContent") == prompt
        assert [s[0] for s in spans] == [w[0] for w in want]
        np.testing.assert_allclose([s[1] for s in spans], [w[1] for w in want], atol=2e-6)
        assert all(s[2].startswith("rgb") for s in spans)  # shaded
        assert len({s[2] for s in spans}) > 1  # by probability
        # Hover three tokens: the popup lists each one's 5 likeliest alternatives. (Tokens that
        # are only a newline have no area to hover.)
        boxes = b.evaluate("[...document.querySelectorAll('#output .tok')].map(s => { "
                           "const r = s.getClientRects()[0]; return r && r.width > 2 ? "
                           "[r.x + r.width / 2, r.y + r.height / 2] : null; })")
        hoverable = [i for i, box in enumerate(boxes) if box]
        assert len(hoverable) > len(spans) // 2
        for i in (hoverable[0], hoverable[len(hoverable) // 2], hoverable[-1]):
            box = boxes[i]
            b.mouse_move(*box)
            rows = b.wait_for("!document.getElementById('popup').hidden && "
                              "[...document.querySelectorAll('#popup tr')].map(r => "
                              "[r.cells[0].textContent, r.cells[2].textContent])")
            tops = [kv for top in want[i][2] for kv in
                    sorted(top.items(), key=lambda kv: -kv[1])[:5]]
            assert len(rows) == len(tops) == 5 * len(want[i][2])
            assert [r[0] for r in rows] == [visible(t) for t, _ in tops]
            for (_, shown), (_, lp) in zip(rows, tops):
                assert abs(float(shown.rstrip("%")) - 100 * math.exp(lp)) < 0.051 + 1e-9
            b.mouse_move(1, 1)
        # Tap (a touch screen's click) pins the popup; a second tap unpins it.
        x, y = box
        b.tap(x, y)
        b.mouse_move(1, 1)
        assert b.evaluate("!document.getElementById('popup').hidden")
        b.tap(x, y)
        assert b.evaluate("document.getElementById('popup').hidden")


@needs_chromium
def test_the_page_chat_tab(server, reference, tmp_path):
    with Browser(tmp_path / "profile") as b:
        b.goto(f"{server.url}/?tab=chat&message=Hello%20there&max_tokens=12&seed=4&run=1")
        assert b.wait_for(FINISHED) == "done"
        reply = b.evaluate("[...document.querySelectorAll('.msg.assistant .tok')]"
                           ".map(s => s.textContent).join('')")
        assert not b.evaluate("document.getElementById('chat').hidden")
    messages = [{"role": "user", "content": "Hello there"}]
    want = chat_reference(reference, messages, 12, seed=4, temperature=0.8)
    assert reply == want.text.lstrip()


def test_a_model_whose_weights_give_nan_logits_is_a_500_and_the_server_goes_on(tmp_path):
    model = picogpt.load(with_a_nan(tmp_path / "damaged"))
    lines = []
    with srv.Server(model, "damaged", port=0, log=lines.append) as server:
        for path, body in [("/v1/completions", {"prompt": "x", "max_tokens": 3}),
                           ("/v1/completions", {"prompt": "x y", "max_tokens": 3, "echo": True,
                                                "logprobs": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                    "content": "Hi"}]})]:
            status, _, data = post(server, path, body)
            assert status == 500, data
            error = error_of(status, data)
            assert error["code"] == "model_error" and "look damaged" in error["message"]
            status, _, data = post(server, path, dict(body, stream=True))
            assert status == 200  # sent before the first token: the error is an event
            events = data.decode().split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            error = error_of(500, events[-3][len("data: "):].encode())
            assert error["code"] == "model_error" and "look damaged" in error["message"]
        assert request(server, "GET", "/v1/models")[0] == 200
    assert not any("Traceback" in line or "internal error" in line for line in lines), lines
