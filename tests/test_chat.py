"""The chat prompt (picogpt/generation/chat.py) that `picogpt chat` and the server share, and a
reply that ends at its line end."""

import io
from pathlib import Path

import numpy as np
import pytest

import picogpt
from picogpt.cli.chat import _reply
from picogpt.generation import chat
from picogpt.gpt2.engine import GPT
from picogpt.gpt2.params import param_shapes

TINY = Path(__file__).parent / "fixtures" / "gpt2-tiny"


@pytest.fixture(scope="module")
def tiny():
    return picogpt.load(TINY)


@pytest.fixture(scope="module")
def wide(tiny):
    """GPT-2's vocabulary (the fixture's) and random weights with a context the preamble fits."""
    hparams = dict(tiny.hparams, n_ctx=512, n_embd=16, n_head=2, n_layer=1)
    rng = np.random.default_rng(0)
    params = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
              for name, shape in param_shapes(hparams).items()}
    return picogpt.Model(GPT(params, hparams), tiny.tokenizer)


@pytest.fixture(scope="module")
def chars():
    return picogpt.load("shakespeare-char")


def test_messages_make_the_prompt_the_cli_builds_turn_by_turn(wide):
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke."}]
    prompt = chat.chat_prompt(wide, messages, reply_tokens=8)
    assert prompt == (chat.CHAT_PREAMBLE + "User: Hi there\nAssistant: Hello! How can I help?\n"
                      "User: Tell me a joke.\nAssistant:")
    turns = chat.Conversation(wide, 8)
    turns.add("Hi there", " Hello! How can I help?")  # a reply as generated: its leading space
    assert turns.prompt("Tell me a joke.") == prompt


def test_system_messages_replace_the_introduction(wide):
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": [{"type": "text", "text": "Ahoy"}]}]
    prompt = chat.chat_prompt(wide, messages, reply_tokens=4)
    assert prompt == "You are a pirate.\n\n" + chat.CHAT_EXAMPLE + "User: Ahoy\nAssistant:"


def test_a_long_conversation_keeps_its_newest_turns_within_the_context(tiny):
    messages = []
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i}"},
                     {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last one"})
    prompt = chat.chat_prompt(tiny, messages, reply_tokens=8)
    assert len(tiny.encode(prompt)) <= tiny.hparams["n_ctx"] - 8
    assert prompt.endswith("answer 19\nUser: last one\nAssistant:") and "question 0" not in prompt


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\].content"),
])  # fmt: skip
def test_bad_messages_are_value_errors_naming_the_message(tiny, messages, needle):
    with pytest.raises(ValueError, match=needle):
        chat.chat_prompt(tiny, messages, reply_tokens=8)


def test_a_reply_too_long_for_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match="no room"):
        chat.Conversation(tiny, reply_tokens=tiny.hparams["n_ctx"])


def newline_seed(model, prompt, n):
    """A seed whose continuation holds a newline after some text, and that continuation."""
    for seed in range(50):
        text = model.generate(prompt, n, seed=seed, stop_at_eos=False)
        if text.find("\n") > 1:
            return seed, text
    pytest.fail("no continuation with a newline")


def test_the_reply_ends_at_its_line_end(chars):
    prompt = chat.Conversation(chars, 60).prompt("What news?")
    seed, full = newline_seed(chars, prompt, 60)
    expected = full[: full.find("\n")]
    c = chars.complete(prompt, 60, seed=seed, stop=chat.REPLY_STOP, stop_at_eos=False)
    assert c.text == expected and c.finish_reason == "stop"
    out = io.StringIO()
    reply = _reply(chars, prompt, out, n=60, seed=seed, stop_at_eos=False)
    assert reply == expected and out.getvalue() == expected.lstrip() + "\n"


def test_a_stop_string_of_the_user_ends_the_reply_sooner(chars):
    prompt = chat.Conversation(chars, 60).prompt("Speak!")
    seed, full = newline_seed(chars, prompt, 60)
    line = full[: full.find("\n")]
    stop = line.strip()[:2]  # occurs within the line, across characters (tokens)
    out = io.StringIO()
    reply = _reply(chars, prompt, out, stop=[stop], n=60, seed=seed, stop_at_eos=False)
    assert reply == line[: line.find(stop)]
